"""End to end: the ViT (`configs/fmnist_vit.py:tiny`) through the command line.

A 1-block, width-32 `vit_fmnist` with random weights (a timm safetensors file written here)
searched on tiny Fashion-MNIST IDX files. Checks independent of the code under test: the exported
masks prune, per leaf, exactly the counts of a numpy global-magnitude budget written here; a
search killed after a checkpoint and restarted ends bit-identical; 4 CPU devices find the masks
of 1; a CNN checkpoint given to the ViT is an exit 2 that says what it looks like.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_main import KILL_DRIVER, ROOT, check_ok, results, run_here, run_main

from jackpots_jax.io import weights

# The command line or another program in a process of its own: `-m 'not e2e'` skips them.
pytestmark = pytest.mark.e2e

CONFIG = "fmnist_vit.py:tiny"
TINY = {"depth": 1, "width": 32, "mlp_dim": 64}
# What `vit.DENSE` leaves masked, in a 1-block ViT.
MASKED = ["embedding/kernel"] + [
    f"blocks/0/{k}"
    for k in (
        "attn/query/kernel",
        "attn/key/kernel",
        "attn/value/kernel",
        "attn/out/kernel",
        "mlp/fc1/kernel",
        "mlp/fc2/kernel",
    )
]


def global_magnitude_counts(params: dict, sparsity: float) -> dict[str, int]:
    """Pruned weights per leaf: every |w| below the floor(N (1 - s))-th largest pooled |w|."""
    pooled = np.sort(np.concatenate([np.abs(params[n]).ravel() for n in MASKED]))[::-1]
    keep = math.floor(pooled.size * (1 - sparsity) + 1e-9)
    threshold = pooled[keep - 1]
    return {n: int(np.count_nonzero(np.abs(params[n]) < threshold)) for n in MASKED}


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        out.update(flat(v, name + "/") if isinstance(v, dict) else {name: np.asarray(v)})
    return out


def write_weights(path) -> None:
    """Random tiny-ViT weights as a timm state dict; the head is made non-zero (the ViT
    initialises it to zero, which would leave the scores without gradient)."""
    from jackpots_jax import models

    params, stats = models.network("vit_fmnist", 10, **TINY).init(jax.random.key(0))
    head = jax.random.normal(jax.random.key(1), params["head"]["kernel"].shape)
    params["head"]["kernel"] = 0.5 * np.asarray(head)
    weights.export_state_dict(
        {"params": params, "batch_stats": stats}, None, "vit_fmnist", path, **TINY
    )


@pytest.fixture(scope="module")
def vit_runs(tmp_path_factory, fmnist_source):
    """Tiny ViT weights (a timm file), the search flags, and a jackpot run never stopped."""
    root = tmp_path_factory.mktemp("vit")
    (root / "pre").mkdir()
    write_weights(root / "pre" / "model.safetensors")
    common = [
        f"--config.dataset.data_dir={root / 'tfds'}",
        f"--config.dataset.source_dir={fmnist_source}",
    ]
    search = [
        *common,
        f"--config.weights.path={root / 'pre' / 'model.safetensors'}",
        "--config.search.epochs=2",  # 8 steps of 16 images
        "--config.checkpoint.every_steps=3",
        "--config.search.rate.schedule=cosine",
    ]
    proc = run_main(CONFIG, root / "straight", *search)
    check_ok(proc)
    return root, search


@pytest.mark.slow
def test_vit_jackpot_exact_counts_and_report(vit_runs):
    root, _ = vit_runs
    straight = root / "straight"
    # The weights file is a timm state dict (fused qkv), read back as `weights.path` reads it.
    variables, _, _ = weights.import_checkpoint(
        root / "pre" / "model.safetensors", "vit_fmnist", 10, **TINY
    )
    params = flat(variables["params"])
    expected = global_magnitude_counts(params, 0.9)
    with np.load(straight / "export" / "masks.npz") as f:
        masks = dict(f)
    assert sorted(masks) == sorted(MASKED)  # head, position embedding, biases, norms dense
    for name, pruned in expected.items():
        assert masks[name].size - int(masks[name].sum()) == pruned, name
    summary = json.loads((straight / "export" / "jackpot.json").read_text())
    assert summary["budget"] == expected and summary["pattern"] == "unstructured"

    rows = results(straight)
    assert set(rows) == {"dense", "magnitude pruning", "jackpot (search)"}  # no BN row
    assert (
        "no BN re-estimation: the model has no running statistics"
        in (rows["magnitude pruning"]["note"])
    )
    assert rows["jackpot (search)"]["count"] == 32
    report = (straight / "report.md").read_text()
    assert "## Sparsity by block" in report and "## Sparsity by kind" in report
    # The kind table's attention row: q, k, v (32 x 32 each) and out (32 x 32), summed by hand.
    attention = ["blocks/0/attn/query/kernel", "blocks/0/attn/key/kernel"]
    attention += ["blocks/0/attn/value/kernel", "blocks/0/attn/out/kernel"]
    kept = sum(int(masks[n].sum()) for n in attention)
    assert f"| attention | 4 | {4 * 32 * 32} | {kept} |" in report
    mlp = ["blocks/0/mlp/fc1/kernel", "blocks/0/mlp/fc2/kernel"]
    assert f"| MLP | 2 | {2 * 32 * 64} | {sum(int(masks[n].sum()) for n in mlp)} |" in report
    # The search moved the masks away from magnitude pruning's (the overlap's total IoU < 1).
    overlap = report.split("## Overlap with the magnitude mask")[1].split("##")[0]
    total = next(line for line in overlap.splitlines() if line.startswith("| **total**"))
    assert float(total.split("|")[5]) < 0.9, total
    # The export is a timm state dict: fused qkv weight and mask.
    from safetensors.numpy import load_file

    state = load_file(straight / "export" / "jackpot.safetensors")
    assert state["blocks.0.attn.qkv.b_mask"].shape == (96, 32)
    assert "blocks.0.attn.qkv.mask" in state  # the scores


@pytest.mark.slow
def test_vit_search_killed_and_restarted_ends_bit_identical(tmp_path, vit_runs):
    from safetensors.numpy import load_file

    root, search = vit_runs
    killed = tmp_path / "killed"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [
        sys.executable,
        KILL_DRIVER,
        "4",  # one step past the checkpoint of step 3
        f"--config={os.path.join(ROOT, 'configs', CONFIG)}",
        f"--workdir={killed}",
        *search,
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert sorted(int(p.name) for p in (killed / "search" / "checkpoints").glob("[0-9]*")) == [3]
    check_ok(run_main(CONFIG, killed, *search))
    a = load_file(root / "straight" / "export" / "jackpot.safetensors")
    b = load_file(killed / "export" / "jackpot.safetensors")
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_vit_masks_on_four_devices_equal_one(tmp_path, vit_runs):
    root, search = vit_runs
    four = tmp_path / "four"
    check_ok(run_main(CONFIG, four, *search, "--config.mode=search", devices=4))
    with (
        np.load(root / "straight" / "export" / "masks.npz") as a,
        np.load(four / "export" / "masks.npz") as b,
    ):
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_cnn_checkpoint_given_to_the_vit_is_a_clear_error(tmp_path, fmnist_source):
    from jackpots_jax import models

    params, stats = models.network("fmnist_cnn", 10).init(jax.random.key(0))
    cnn = tmp_path / "cnn.safetensors"
    weights.export_state_dict({"params": params, "batch_stats": stats}, None, "fmnist_cnn", cnn)
    proc = run_here(
        CONFIG,
        tmp_path / "work",
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        f"--config.dataset.source_dir={fmnist_source}",
        "--config.mode=search",
        f"--config.weights.path={cnn}",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "checkpoint does not match the ViT" in proc.stderr
    assert "looks like a CNN checkpoint" in proc.stderr and "conv1.weight" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "work" / "search").exists()


def test_adamw_pretrain_recipe_warms_up_and_decays_kernels_only():
    """Worked by hand: 2 warm-up steps of 10 to 1e-3, then cosine to 0; with zero gradients
    AdamW's only move is the decay `lr * wd * w`, applied to kernels, not to biases or the
    position embedding; clipping is the outermost link."""
    import jax.numpy as jnp

    from jackpots_jax.experiment import recipes

    recipe = recipes.TrainRecipe(
        epochs=2,
        batch_size=16,
        learning_rate=1e-3,
        momentum=0.9,
        nesterov=False,
        weight_decay=0.5,
        label_smoothing=0.0,
        augment=False,
        optimizer="adamw",
        warmup_epochs=1,
        clip_norm=1.0,
    )
    tx, lr = recipe.transform(total_steps=10, steps_per_epoch=2)
    assert [float(lr(t)) for t in (0, 1, 2)] == pytest.approx([0.0, 5e-4, 1e-3])
    assert float(lr(6)) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert float(lr(10)) == pytest.approx(0.0)
    params = {
        "k": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)},
        "pos_embedding": jnp.full((1, 2, 2), 2.0),
    }
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(3):
        updates, state = tx.update(zeros, state, params)
    # Step 2's learning rate is 1e-3: the kernel moves by -1e-3 * 0.5 * 2 = -1e-3.
    assert np.asarray(updates["k"]["kernel"]) == pytest.approx(np.full((2, 2), -1e-3))
    assert not np.asarray(updates["k"]["bias"]).any()
    assert not np.asarray(updates["pos_embedding"]).any()


def test_vit_2of4_budget_groups_along_each_kernels_input_axis(tmp_path):
    """The runner's 2:4 budget on the ViT (the spec's input axes): magnitude 2:4 masks keep 2 of
    every 4 consecutive weights along the contracted axis, counted here with numpy (q/k/v
    `[D, H, D/H]`: D, axis 0; out `[H, D/H, D]`: D/H, axis 1; MLP `[in, out]`: axis 0); the patch
    embedding (1 input channel) is held dense; the export writes the N:M file."""
    import jackpots_jax as jj
    from jackpots_jax import models
    from jackpots_jax.experiment import recipes
    from jackpots_jax.io.export import export_jackpot

    net = models.network("vit_fmnist", 10, **TINY)
    params, stats = net.init(jax.random.key(0))
    recipe = recipes.SearchRecipe(
        *(0.5, "global_magnitude", None, "magnitude", 0.01, 1, 0, 16, 0.1, 0.9, 5e-4, 0.0),
        augment=False,
        rank_by="score",
        rate=recipes.RateRecipe("constant", 1.0, 1.0),
        pattern="2:4",
        indivisible="dense",
    )
    budget = recipe.budget(params, net.spec)
    _, masks = jj.init_scores(params, budget, "magnitude")
    flat_masks = {n: np.asarray(m) for n, m in jj._tree.named_leaves(masks) if m is not None}
    assert sorted(flat_masks) == sorted(MASKED[1:])
    axis = {"query": 0, "key": 0, "value": 0, "out": 1, "fc1": 0, "fc2": 0}
    for name, mask in flat_masks.items():
        moved = np.moveaxis(mask, axis[name.split("/")[-2]], -1)
        groups = moved.reshape(*moved.shape[:-1], -1, 4).sum(-1)
        assert (groups == 2).all(), name
    paths = export_jackpot(
        tmp_path,
        variables={"params": params, "batch_stats": stats},
        masks=masks,
        model_name="vit_fmnist",
        budget=budget,
        config={},
        metrics={},
        **TINY,
    )
    assert json.loads(open(paths["json"]).read())["pattern"] == "2:4"
    assert paths["nm"].endswith("jackpot_2of4.safetensors")
