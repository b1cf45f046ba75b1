"""The README's own loop, run as written: Linen and NNX, sharded over a mesh of 8 devices.

The block is taken from README.md (the first Python block after "## The API in one screen"), so
the README cannot drift from the API. Checked against the same loop on one device with no mesh:
the masks equal and the scores and batch-norm statistics to float tolerance (the batch split over
devices reorders float sums); every layer keeps exactly its budget; the statistics move.
"""

import json
import pathlib
import re

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_loop() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The API in one screen") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_loop(model: str, sharded: bool) -> dict:
    """The README's block run for `model`; unsharded: without its mesh lines (one device)."""
    code = readme_loop().replace('"fmnist_cnn"', f'"{model}"', 1)
    if not sharded:
        code = re.sub(r"\nmesh = .*?\nfor batch", "\nfor batch", code, flags=re.S)
        code = code.replace("    batch = jj.parallel.shard_batch(batch, mesh)\n", "")
    code = code.replace("print(", "table = (")
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.normal(size=(16, 28, 28, 1)).astype(np.float32),
            "label": rng.integers(0, 10, size=16).astype(np.int32),
        }
        for _ in range(3)
    ]
    scope = {"steps": 3, "batches": batches}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    return scope


@pytest.mark.parametrize("model", ["fmnist_cnn", "fmnist_cnn_nnx"])
def test_the_readme_loop_sharded_equals_one_device(model):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
    one = run_loop(model, sharded=False)
    got = run_loop(model, sharded=True)  # as written: ('data', 'fsdp') = (4, 2)
    assert dict(got["mesh"].shape) == {"data": 4, "fsdp": 2}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got["masks"]), one["masks"])
    for key in ("scores", "stats"):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
            jax.device_get(got[key]),
            jax.device_get(one[key]),
        )
    # Exactly the budget's count kept per masked leaf, and the statistics re-estimated.
    for name, m in _named(one["masks"]).items():
        pruned = _named(one["budget"])[name]
        assert int(np.sum(m)) == np.size(m) - int(pruned), name
    _, initial = one["net"].init(jax.random.key(0))
    moved = [
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(one["stats"]), strict=True)
    ]
    assert any(moved)
    assert np.isfinite(float(one["loss"]))


def _named(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {jax.tree_util.keystr(p): v for p, v in flat if v is not None}


def engine_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("The engine's steps in your loop") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_engine_loop_on_four_fsdp_shards_equals_one_device():
    """`jj.parallel.fsdp_step` places state, weights and batches itself: the masks of one device."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
    import functools

    import jackpots_jax as jj

    scope = run_loop("fmnist_cnn", sharded=False)
    net, budget = scope["net"], scope["budget"]
    # Host copies: the block donates its state, whose placed arrays may share these buffers.
    params, stats = jax.device_get((scope["params"], scope["stats"]))
    scores = jax.device_get(jj.init_scores(params, budget, method="magnitude")[0])
    scope.update(params=params, stats=stats, scores=scores)
    exec(compile(engine_block(), "README.md", "exec"), scope)  # noqa: S102
    state = scope["state"]
    assert state.masks is not None and scope["metrics"]["loss"].shape == ()
    held = jj.parallel.state_bytes(state.scores)
    whole = sum(np.asarray(x).nbytes for x in jax.tree.leaves(scores))
    assert len(held) == 8 and max(held.values()) < whole / 2  # split over 'fsdp'

    tx = jj.search_optimizer(budget, learning_rate=0.1, total_steps=scope["steps"])
    want = jj.engine.create_search_state(scores, tx, batch_stats=stats)
    step = jax.jit(functools.partial(jj.engine.search_step, apply_fn=net.apply_fn, tx=tx))
    for batch in scope["batches"]:
        want, _ = step(want, params, batch)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.masks), want.masks)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        jax.device_get(state.scores),
        jax.device_get(want.scores),
    )


def test_the_readme_results_table_is_the_committed_results_file():
    """Every row of the README's default-job table, read back from the `results.json` of the run
    directory the README names under it (accuracy, top-5 and loss as the runner rounds them)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("| model | sparsity | accuracy | top-5 | loss |") :]
    table = section[: section.index("\n\n")].splitlines()[2:]
    run_dir = re.search(r"`(docs/results/[^`]+)/`", section).group(1)
    rows = {r["model"]: r for r in json.loads((ROOT / run_dir / "results.json").read_text())}
    bn = "magnitude pruning + BN re-estimation"
    names = {
        "dense": "dense",
        "one-shot magnitude pruning, no search": "magnitude pruning",
        f"{bn} (100 batches)": bn,
        "**jackpot (search), weights unchanged**": "jackpot (search)",
    }
    assert len(table) == len(names)
    for line in table:
        label, sparsity, accuracy, top5, loss = (c.strip() for c in line.strip("|").split("|"))
        row = rows[names[label]]
        assert sparsity == f"{100 * row['sparsity']:.2f}%"
        assert accuracy.strip("*") == f"{100 * row['accuracy']:.2f}%"
        assert top5 == f"{100 * row['top5_accuracy']:.2f}%"
        assert loss == f"{row['loss']:.4f}"


def test_the_readme_language_model_table_is_the_committed_study():
    """The README's SmolLM2 table, read back from the study's `results.json` (the mean over seeds
    of each row, and of the best jackpot's gap closed), and the seeds' per-seed files agree."""
    text = (ROOT / "README.md").read_text()
    head = "| pattern | dense | magnitude | Wanda | SparseGPT mask |"
    section = text[text.index(head) :]
    table = section[: section.index("\n\n")].splitlines()[2:]
    study_dir = re.findall(r"`(docs/results/lm_2of4_study[^`]+)/`", text[: text.index(head)])[-1]
    study = json.loads((ROOT / study_dir / "results.json").read_text())
    assert study["finished_seeds"] == [0, 1, 2]
    assert [line.split("|")[1].strip() for line in table] == list(study["tables"])
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        pattern = cells[0]
        rows = {r["model"]: r for r in study["tables"][pattern]}
        names = ["dense"] + [
            f"{m} ({pattern})"
            for m in (
                "magnitude pruning",
                "Wanda",
                "SparseGPT mask, weights frozen",
                "SparseGPT, weights changed",
            )
        ]
        jackpots = [f"jackpot ({pattern}, from {i})" for i in ("magnitude", "wanda", "sparsegpt")]
        for cell, name in zip(cells[1:6], names, strict=True):
            assert cell == f"{rows[name]['perplexity_mean']:,.2f}", (pattern, name)
        assert cells[6] == " / ".join(f"{rows[j]['perplexity_mean']:,.2f}" for j in jackpots)
        best = max(rows[j]["gap_closed_mean"] for j in jackpots)
        assert cells[7] == f"{100 * best:.1f}%"
        # The means are those of the seeds' own results files.
        for name in names + jackpots:
            per_seed = [
                {
                    r["model"]: r
                    for r in json.loads(
                        (ROOT / study_dir / f"seed_{s}" / "results.json").read_text()
                    )
                }[name]["perplexity"]
                for s in (0, 1, 2)
            ]
            assert rows[name]["perplexity"] == per_seed
            assert rows[name]["perplexity_mean"] == pytest.approx(np.mean(per_seed), rel=1e-12)
