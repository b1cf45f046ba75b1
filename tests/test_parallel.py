"""Data-parallel runners (shard_map and pmap) against the single-device step on 8 CPU devices."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_step import batches, setup

from jackpots_jax.parallel import data_parallel, make_mesh, replicate, shard_batch
from jackpots_jax.step import eval_step, search_step


def run_steps(run, state, params, data):
    metrics = []
    for b in data:
        state, m = run(state, params, b)
        metrics.append(m)
    return state, metrics


def assert_same(ref, got, rtol=1e-5):
    ref_masks, got_masks = ref.masks, got.masks
    jax.tree.map(np.testing.assert_array_equal, ref_masks, got_masks)
    jax.tree.map(
        partial(np.testing.assert_allclose, rtol=rtol, atol=1e-6),
        ref.scores,
        jax.tree.map(np.asarray, got.scores),
    )
    jax.tree.map(
        partial(np.testing.assert_allclose, rtol=rtol, atol=1e-6),
        ref.batch_stats,
        jax.tree.map(np.asarray, got.batch_stats),
    )
    assert int(got.step) == int(ref.step)


def test_make_mesh():
    assert jax.device_count() == 8
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "fsdp") and mesh.devices.shape == (8, 1)
    assert make_mesh(2).devices.shape == (2, 1)
    assert make_mesh(8, fsdp=4).devices.shape == (2, 4)
    with pytest.raises(ValueError, match="num_devices"):
        make_mesh(9)
    with pytest.raises(ValueError, match="fsdp"):
        make_mesh(8, fsdp=3)


@pytest.mark.parametrize(
    "n",
    [
        pytest.param(1, marks=pytest.mark.slow),
        pytest.param(2, marks=pytest.mark.slow),
        pytest.param(4, marks=pytest.mark.slow),
        8,
    ],
)
def test_runners_match_single_device_global_batch(n):
    # No batch norm: per-device batch statistics would (correctly) differ from the global ones.
    run = setup(bn=False, rate=0.5, lr=20.0)
    data = batches(2)
    kw = dict(apply_fn=run.apply_fn, tx=run.tx)
    ref, ref_metrics = run_steps(jax.jit(partial(search_step, **kw)), run.state, run.params, data)
    assert sum(int(m["churn"]) for m in ref_metrics) > 0  # the masks do move
    mesh = make_mesh(n)
    params = replicate(run.params, mesh)
    assert params["conv1"]["kernel"].sharding.is_fully_replicated
    for backend in ("shard_map", "pmap"):
        # The state is donated: each backend starts from its own copy.
        step = data_parallel(search_step, mesh=mesh, backend=backend, donate_argnums=0, **kw)
        state = jax.tree.map(jnp.copy, run.state)
        got, metrics = run_steps(
            step, state, params if backend == "shard_map" else run.params, data
        )
        assert_same(ref, got)
        for a, b in zip(ref_metrics, metrics, strict=True):
            np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-5)
            np.testing.assert_allclose(float(a["accuracy"]), float(b["accuracy"]), rtol=1e-6)
            assert int(a["churn"]) == int(b["churn"])


def test_runners_with_batch_norm_match_vmap_emulation():
    # With batch norm each device normalises with its own shard's statistics; the reference is the
    # same per-device step vmapped over the shards with the axis name bound (an exact emulation).
    n = 4
    run = setup(bn=True)
    data = batches(2)
    kw = dict(apply_fn=run.apply_fn, tx=run.tx)

    def emulate(state, params, batch):
        split = jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), batch)
        f = jax.vmap(
            partial(search_step, axis_name="data", **kw), (None, None, 0), axis_name="data"
        )
        return jax.tree.map(lambda x: x[0], f(state, params, split))

    ref, _ = run_steps(jax.jit(emulate), run.state, run.params, data)
    mesh = make_mesh(n)
    for backend in ("shard_map", "pmap"):
        got, _ = run_steps(
            data_parallel(search_step, mesh=mesh, backend=backend, **kw),
            run.state,
            run.params,
            data,
        )
        assert_same(ref, got)
    # Running statistics are averaged: they moved away from their init.
    assert not np.allclose(np.asarray(ref.batch_stats["bn1"]["mean"]), 0.0)


def test_shard_batch_and_data_parallel_eval_counts_valid_only():
    run = setup(bn=True)
    state, batch = run.state, run.batch
    mesh = make_mesh(8)
    valid = np.arange(16) < 11  # padded tail
    full = {**batch, "mask": valid}
    ref = eval_step(run.params, state.batch_stats, state.masks, full, apply_fn=run.apply_fn)
    sharded = shard_batch(jax.tree.map(np.asarray, full), mesh)
    assert sharded["image"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    for backend in ("shard_map", "pmap"):
        step = data_parallel(eval_step, mesh=mesh, backend=backend, apply_fn=run.apply_fn)
        out = step(
            run.params,
            state.batch_stats,
            state.masks,
            sharded if backend == "shard_map" else full,
        )
        assert int(out["count"]) == 11
        assert int(out["correct"]) == int(ref["correct"])
        np.testing.assert_allclose(float(out["loss"]), float(ref["loss"]), rtol=1e-5)


def test_bad_arguments():
    run = setup(bn=False)
    with pytest.raises(ValueError, match="backend"):
        data_parallel(search_step, backend="xmap")
    step = data_parallel(search_step, mesh=make_mesh(8), apply_fn=run.apply_fn, tx=run.tx)
    with pytest.raises(ValueError, match="split"):
        step(run.state, run.params, jax.tree.map(lambda x: x[:12], run.batch))
