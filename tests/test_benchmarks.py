"""The benchmark scripts run at their smallest size and check what they measure.

A benchmark is run rarely and by hand; an import it lost or an argument it no longer passes shows
only then. Each script here runs in a process of its own at its smallest size, and the test reads
what the script itself checked: `topk.py` compares every mask it times with a sort-based mask,
`step.py` prints a ratio for every variant, `first_order.py` compares its two paths' masks,
`memory.py` runs one real step at the widths it found; `lm_memory.py`'s sizes are compared
in-process with what placed arrays hold.
(`gpu_model.py` has its own test, `test_gpu_model.py`; `input_pipeline.py` and
`vit_fmnist_recipe.py` read the whole Fashion-MNIST and `refresh_ab.py` times the ResNet-50 set
in two package trees: they are left to be run by hand;
`sparse_speed.py` needs PyTorch with CUDA.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(script: str, *args: str, timeout: int = 600) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # each script sets the devices it needs
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{script} exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc.stdout


def table_rows(out: str, first_cell: str) -> list[list[str]]:
    """The rows of a whitespace-aligned table whose lines start with `first_cell`."""
    return [line.split() for line in out.splitlines() if line.startswith(first_cell)]


def test_topk_masks_equal_sort_based_masks():
    out = run_benchmark(
        "topk.py", "--quick", "--repeats", "1", "--selections", "batched", "bracketed"
    )
    rows = [line for line in out.splitlines() if "jj.topk_masks" in line or "refresh" in line]
    assert len(rows) == 2 * 2 + 2 * 2, out  # (two sizes + the larger's two rates) x two selections
    # The last column, "masks identical", is `yes` for every method timed.
    assert all(line.split()[-1] == "yes" for line in rows), out
    # The batched top-k ranked its candidates among themselves (no fallback) at both sizes.
    sampled = [line for line in out.splitlines() if line.startswith("sampled top-k")]
    assert len(sampled) == 2 and all("ranked among themselves" in line for line in sampled), out


def test_step_benchmark_prints_a_ratio_per_variant():
    out = run_benchmark(
        "step.py",
        "--models", "fmnist_cnn", "--batch", "8", "--steps", "1", "--repeats", "1",
        "--warmup", "1",
    )  # fmt: skip
    rows = table_rows(out, "fmnist_cnn")
    variants = {" ".join(r[3:-7]) for r in rows}
    assert {"dense", "no refresh"} <= variants and any("search" in v for v in variants), out
    for r in rows:
        seconds, ratio = float(r[-7]), float(r[-5])
        assert seconds > 0 and ratio > 0, r


def test_first_order_benchmark_times_both_paths_on_the_same_masks():
    out = run_benchmark("first_order.py", "--quick")
    (row,) = [r.split() for r in out.splitlines() if r.split()[:1] == ["20000"]]
    swaps, compacted, whole = int(row[1]), float(row[2]), float(row[3])
    assert swaps > 0 and compacted > 0 and whole > 0, out
    assert row[-1] == "yes", out  # the compacted and the whole-leaf pairs agree


def test_memory_benchmark_fits_a_wider_model_when_sharded():
    out = run_benchmark(
        "memory.py", "--cap-mib", "1", "--layers", "2", "--batch", "8", "--step", "128",
        "--limit", "1024",
    )  # fmt: skip
    widths = {int(f): int(w) for f, w in re.findall(r"fsdp (\d+): largest width (\d+)", out)}
    assert set(widths) == {1, 8}, out
    # Sharding the state over 8 devices fits a wider model under the same cap.
    assert widths[8] > widths[1], out


def test_lm_step_benchmark_writes_its_rows(tmp_path):
    path = tmp_path / "lm_step.json"
    run_benchmark(
        "lm_step.py", "--quick", "--seq-len", "16", "--batch", "1", "--steps", "1",
        "--repeats", "1", "--patterns", "2:4", "--rates", "1", "--json", str(path),
    )  # fmt: skip
    rows = json.loads(path.read_text())["rows"]
    names = [r["variant"] for r in rows]
    assert names == ["dense", "search 2:4 rate 1"], names
    assert all(r["s_per_step"] > 0 and r["tokens_per_s"] > 0 for r in rows), rows


def test_baselines_reconstruction_orders_the_methods(tmp_path):
    path = tmp_path / "baselines.json"
    run_benchmark(
        "baselines_reconstruction.py", "--dim", "32", "--samples", "256", "--out", str(path)
    )
    rows = json.loads(path.read_text())["rows"]
    error = {(r["pattern"], r["method"]): r["calibration"] for r in rows}
    for pattern in {p for p, _ in error}:
        # SparseGPT updates the kept weights to fit the calibration inputs: it reconstructs them
        # better than magnitude pruning, which only drops weights.
        assert error[pattern, "sparsegpt (weights changed)"] < error[pattern, "magnitude"], error


def test_lm_memory_sizes_what_placed_arrays_hold():
    """`lm_memory.py`'s bytes per device, from shapes only, against the bytes that the same search
    state and weights hold once materialised and placed on this process's 8 CPU devices by
    `jj.parallel` (a tiny Llama whose dimensions 8 divides for some leaves, not for others, so
    both sharded and whole leaves are counted)."""
    import jax
    import numpy as np

    import jackpots_jax as jj
    from jackpots_jax import models
    from jackpots_jax.models import llama

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import lm_memory
    finally:
        sys.path.pop(0)
    options = dict(hidden_size=20, intermediate_size=40, num_layers=2, num_heads=2, num_kv_heads=1)
    params, state = lm_memory.abstract_search(
        "llama", 100, options, sparsity=0.5, pattern="2:4", rate=0.5
    )
    network = models.network("llama", 100, jax.numpy.float32, **options)
    real_params, _ = network.init(jax.random.key(0))
    budget = jj.layer_budgets(real_params, 0.5, "uniform", dense=llama.DENSE, pattern="2:4")
    tx = jj.search_optimizer(budget, learning_rate=0.1, total_steps=1000, rate=0.5)
    scores, _ = jj.init_scores(real_params, budget, "magnitude")
    real_state = jj.engine.create_search_state(scores, tx)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), real_state) == jax.tree.map(
        lambda x: (x.shape, x.dtype), state
    )
    mesh = jj.parallel.make_mesh(fsdp=8)
    placed = jj.parallel.state_bytes(jj.parallel.place_state(real_state, mesh))
    weights = jj.parallel.state_bytes(jj.parallel.place(real_params, mesh))
    assert set(placed.values()) == {lm_memory.per_device(state, 8)}
    assert set(weights.values()) == {lm_memory.per_device(params, 8)}
    # Both kinds of leaf occur: some split eight ways, some whole on every device.
    dims = jax.tree.leaves(
        jj.parallel.fsdp_dims(params, mesh), is_leaf=lambda x: x is None or isinstance(x, int)
    )
    assert None in dims and any(d is not None for d in dims)
    row = lm_memory.table(params, state, [1, 8])[0]
    total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
    steps_and_keys = total - row["scores"] - row["optimizer"] - row["masks"]
    assert 0 <= steps_and_keys <= 64  # the step counts and the PRNG key, nothing else
