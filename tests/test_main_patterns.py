"""End to end: structured patterns (`search.pattern`) through the command line.

The tiny 2:4 job (`configs/default.py:2of4_tiny`): the checks are numpy counts on the exported
masks (exactly N of every group of M along each kernel's input axis, written out here, not taken
from the library), the files of the export, and the errors a user meets (a sparsity that disagrees
with N:M, a leaf the pattern does not fit, a resume with another pattern), each an exit 2.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_main import check_ok, results, run_here, run_main

from jackpots_jax.io.nm_export import read_nm

# The command line or another program in a process of its own: `-m 'not e2e'` skips them.
pytestmark = pytest.mark.e2e


def nm_group_counts(mask: np.ndarray, m: int) -> np.ndarray:
    """Kept weights of every group of `m` consecutive entries along the input axis (HWIO's I,
    `[in, out]`'s in): the second-to-last axis of a conv or dense kernel."""
    moved = np.moveaxis(np.asarray(mask, bool), -2, -1)  # input axis last
    assert moved.shape[-1] % m == 0
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m).sum(-1)


@pytest.fixture(scope="module")
def job_2of4(tmp_path_factory, fmnist_source):
    """The tiny 2:4 default job, on random weights (what is checked is structure, not accuracy;
    it saves a pre-training)."""
    root = tmp_path_factory.mktemp("pattern")
    common = [
        f"--config.dataset.data_dir={root / 'tfds'}",
        f"--config.dataset.source_dir={fmnist_source}",
        "--config.weights.random=True",
    ]
    proc = run_main("default.py:2of4_tiny", root / "work", *common)
    check_ok(proc)
    return root / "work", common, proc


@pytest.mark.slow
def test_2of4_job_keeps_two_of_every_four(job_2of4):
    workdir, _, proc = job_2of4
    rows = results(workdir)
    assert set(rows) == {
        "dense",
        "magnitude pruning",
        "magnitude pruning + BN re-estimation",
        "jackpot (search)",
    }
    for name in ("magnitude pruning", "jackpot (search)"):
        assert rows[name]["sparsity"] == 0.5  # over the masked layers: exactly half
        assert "pattern 2:4" in rows[name]["note"]
    with np.load(workdir / "export" / "masks.npz") as f:
        masks = dict(f)
    # conv1 (1 input channel) is held dense; the classifier too; the rest is 2:4.
    assert sorted(masks) == ["conv2/kernel", "fc1/kernel"]
    for name, mask in masks.items():
        counts = nm_group_counts(mask, 4)
        assert (counts == 2).all(), (name, np.unique(counts))

    summary = json.loads((workdir / "export" / "jackpot.json").read_text())
    assert summary["pattern"] == "2:4"
    assert summary["config"]["search"]["pattern"] == "2:4"
    assert summary["budget"] == {n: m.size // 2 for n, m in masks.items()}
    # The PyTorch [out, in] file holds the same masks and W * M, and every row keeps 2 of 4.
    kernels, nm_masks, info = read_nm(workdir / "export" / "jackpot_2of4.safetensors")
    assert info["pattern"] == "2:4" and sorted(nm_masks) == sorted(masks)
    from safetensors.numpy import load_file

    raw = load_file(workdir / "export" / "jackpot_2of4.safetensors")
    for key in ("conv2.b_mask", "fc1.b_mask"):
        rows_of_4 = raw[key].reshape(raw[key].shape[0], -1, 4)
        assert (rows_of_4.sum(-1) == 2).all(), key
    for name in masks:
        np.testing.assert_array_equal(nm_masks[name], masks[name])
        assert np.count_nonzero(kernels[name][~masks[name]]) == 0
    report = (workdir / "report.md").read_text()
    assert "pattern 2:4" in report and "conv1/kernel (dense)" in report
    assert "jackpot (search)" in proc.stdout


@pytest.mark.slow
def test_resume_with_another_pattern_is_refused(job_2of4):
    """4:8 at 50% prunes the same counts per leaf as 2:4: only the pattern tells them apart."""
    workdir, common, _ = job_2of4
    proc = run_here(
        "default.py:2of4_tiny",
        workdir,
        *common,
        "--config.mode=search",
        "--config.search.pattern=4:8",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "belongs to another run" in proc.stderr and "pattern" in proc.stderr
    assert 'pattern: checkpoint "2:4", now "4:8"' in proc.stderr
    assert "Traceback" not in proc.stderr


def test_block_export_writes_masks_not_tile_scores(tmp_path):
    """block:4 keeps one score per 4x4 tile: the state dict gets the masks, not those scores."""
    from safetensors.numpy import load_file

    import jackpots_jax as jj
    from jackpots_jax import models
    from jackpots_jax.io.export import export_jackpot

    params, stats = models.network("fmnist_cnn", 10).init(jax.random.key(0))
    budget = jj.layer_budgets(params, 0.75, "uniform", pattern="block:4", indivisible="dense")
    scores, masks = jj.init_scores(params, budget, "magnitude")
    assert scores["fc1"]["kernel"].shape == (392, 32)  # [1568, 128] in 4x4 tiles
    paths = export_jackpot(
        tmp_path,
        variables={"params": params, "batch_stats": stats},
        masks=masks,
        model_name="fmnist_cnn",
        budget=budget,
        config={},
        metrics={},
        scores=scores,
    )
    state = load_file(paths["safetensors"])
    assert "fc1.b_mask" in state and "conv2.b_mask" in state and "conv1.b_mask" not in state
    assert not any(k.endswith(".mask") for k in state)
    assert json.loads(open(paths["json"]).read())["pattern"] == "block:4"
    assert "nm" not in paths
    # Every aligned 4x4 tile of the exported [out, in] weight's mask is kept or pruned whole.
    tiles = state["fc1.b_mask"].reshape(32, 4, 392, 4).sum(axis=(1, 3))
    assert set(np.unique(tiles)) == {0.0, 16.0}
    assert tiles.sum() == 16 * (392 * 32 - budget["fc1"]["kernel"].pruned // 16)


@pytest.mark.parametrize(
    "variant, overrides, message",
    [
        (
            "2of4_tiny",
            ["--config.search.sparsity=0.9"],
            "`search.sparsity` is 0.9 but `search.pattern` '2:4' keeps 2 of every 4 weights, "
            "which is sparsity 0.5",
        ),
        (
            "2of4_tiny",
            ["--config.search.indivisible=error"],
            "pattern 2:4 does not fit 'conv1/kernel'",
        ),
    ],
)
def test_bad_pattern_is_a_config_error(tmp_path, fmnist_source, variant, overrides, message):
    proc = run_here(
        f"default.py:{variant}",
        tmp_path / "work",
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        f"--config.dataset.source_dir={fmnist_source}",
        *overrides,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "work" / "pretrain").exists()  # nothing started


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("pattern", "2:2", "`search.pattern` is '2:2'; allowed: unstructured, N:M"),
        ("pattern", "block:1", "`search.pattern` is 'block:1'"),
        ("indivisible", "drop", "`search.indivisible` is 'drop'; allowed: 'error', 'dense'"),
    ],
)
def test_pattern_fields_are_checked(field, value, message):
    from jackpots_jax.experiment import config as config_lib

    config = config_lib.base_config()
    config.search[field] = value
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.check(config, num_devices=1, modes=("jackpot",))
    assert message in str(e.value)


def test_nm_sparsity_must_agree_with_the_pattern():
    """2:4 needs 0.5 and 3:8 0.625; 1:3 takes 0.6666666666666666 (2/3 has no exact decimal: the
    check allows 1e-9, as `layer_budgets` does); 0.9 with 2:4 is refused naming both."""
    from jackpots_jax.experiment import config as config_lib

    config = config_lib.base_config()
    for pattern, sparsity in (("2:4", 0.5), ("3:8", 0.625), ("1:3", 0.6666666666666666)):
        config.search.pattern, config.search.sparsity = pattern, sparsity
        config_lib.check(config, num_devices=1, modes=("jackpot",))
    config.search.pattern, config.search.sparsity = "1:3", 0.67
    with pytest.raises(config_lib.ConfigError, match="`search.sparsity` is 0.67 but"):
        config_lib.check(config, num_devices=1, modes=("jackpot",))
    config.search.pattern, config.search.sparsity = "2:4", 0.9
    with pytest.raises(config_lib.ConfigError, match="which is sparsity 0.5"):
        config_lib.check(config, num_devices=1, modes=("jackpot",))
