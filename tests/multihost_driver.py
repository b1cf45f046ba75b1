"""One process of the two-process search run of `test_multihost.py` (not a test module itself).

Run as `python tests/multihost_driver.py --process-id I --num-processes 2 --port P --out DIR`
with `XLA_FLAGS=--xla_force_host_platform_device_count=2` and `JAX_PLATFORMS=cpu`. Every process
joins the run with `initialize_distributed`, builds the same initial search state (same seeds),
feeds only its own rows of every global batch and runs `STEPS` search steps with each backend of
`data_parallel` over the 4 global devices, then under `jit` on a (data, fsdp) = (1, 4) mesh whose
`fsdp` axis spans both processes (scores, optimiser state and masks sharded, each process
holding half of every leaf and its own rows of the batch). Each process writes what it ends with
(masks, scores, per-step loss and churn) to `DIR/process_I.npz`.
"""

from __future__ import annotations

import argparse
import os
import sys

# The tests' helpers (TinyNet, setup, batches) live next to this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STEPS = 3
SETUP = dict(bn=False, rate=0.5, lr=20.0, total_steps=10)  # masks move in every step
GLOBAL_BATCH = 16


def flatten(prefix: str, tree) -> dict:
    """`{prefix/path: array}` for every array leaf of `tree` (None leaves dropped)."""
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {f"{prefix}{jax.tree_util.keystr(path)}": np.asarray(leaf) for path, leaf in leaves}


def fsdp_run(search, pid: int, rows: int) -> dict:
    """The same steps with the state sharded over an `fsdp` axis across both processes."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec
    from test_step import batches

    from jackpots_jax import parallel
    from jackpots_jax.restriction import search_optimizer
    from jackpots_jax.step import search_step

    mesh = parallel.make_mesh(fsdp=jax.device_count())
    # The same optimiser as `setup(**SETUP)`, its exact selection told where the shards are.
    tx = search_optimizer(
        search.budget,
        learning_rate=SETUP["lr"],
        total_steps=SETUP["total_steps"],
        rate=SETUP["rate"],
        selection="batched",
        layout=parallel.selection_layout(search.state.scores, mesh),
    )
    whole = NamedSharding(mesh, PartitionSpec())
    shardings = parallel.fsdp_shardings(search.state, mesh).replace(
        batch_stats=jax.tree.map(lambda _: whole, search.state.batch_stats),
        step=whole,
        rng=whole,
    )
    state = parallel.place(search.state, mesh, shardings=shardings)
    params = parallel.place(search.params, mesh)
    run = parallel.sharded(search_step, mesh=mesh, apply_fn=search.apply_fn, tx=tx)
    total = sum(x.nbytes for x in jax.tree.leaves((search.state.scores, search.state.masks)))
    losses, churns = [], []
    for batch in batches(STEPS, batch=GLOBAL_BATCH):
        local = jax.tree.map(lambda x: np.asarray(x)[pid * rows : (pid + 1) * rows], batch)
        state, metrics = run(state, params, parallel.shard_batch(local, mesh))
        losses.append(float(metrics["loss"]))
        churns.append(int(metrics["churn"]))
        held = parallel.state_bytes((state.scores, state.masks))
        # Each of this process's 2 devices holds a quarter of every masked leaf, nothing more.
        assert len(held) == 2 and set(held.values()) == {total // 4}, (held, total)
    assert not any(m.is_fully_addressable for m in jax.tree.leaves(state.masks))
    masks, scores = multihost_utils.process_allgather((state.masks, state.scores), tiled=True)
    return {
        **flatten("fsdp/masks", masks),
        **flatten("fsdp/scores", scores),
        "fsdp/loss": np.asarray(losses),
        "fsdp/churn": np.asarray(churns),
        "fsdp/step": np.asarray(int(state.step)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from jackpots_jax.parallel import initialize_distributed

    multi = initialize_distributed(
        f"127.0.0.1:{args.port}", num_processes=args.num_processes, process_id=args.process_id
    )
    # Joining twice is a no-op.
    assert initialize_distributed() is multi

    import jax
    import numpy as np
    from test_step import batches, setup

    from jackpots_jax.parallel import data_parallel, make_mesh, replicate, shard_batch
    from jackpots_jax.step import search_step

    pid, count = jax.process_index(), jax.process_count()
    assert multi and count == args.num_processes and pid == args.process_id, (multi, count, pid)
    assert jax.local_device_count() == 2 and jax.device_count() == 2 * count

    # A smaller mesh takes the same number of devices from every process.
    small = make_mesh(count)
    assert sorted(d.process_index for d in small.devices.flat) == list(range(count))

    mesh = make_mesh()
    search = setup(**SETUP)
    rows = GLOBAL_BATCH // count
    out = {}
    for backend in ("shard_map", "pmap"):
        run = data_parallel(
            search_step,
            mesh=mesh,
            backend=backend,
            donate_argnums=0,
            apply_fn=search.apply_fn,
            tx=search.tx,
        )
        # The frozen weights placed once on every device of every process (shard_map), or passed
        # as they are (pmap broadcasts its replicated arguments).
        params = replicate(search.params, mesh) if backend == "shard_map" else search.params
        s = jax.tree.map(jax.numpy.copy, search.state)  # donated to the steps below
        losses, churns = [], []
        for batch in batches(STEPS, batch=GLOBAL_BATCH):
            # Only this process's rows of the global batch ever reach it.
            local = jax.tree.map(lambda x: np.asarray(x)[pid * rows : (pid + 1) * rows], batch)
            s, metrics = run(
                s, params, shard_batch(local, mesh) if backend == "shard_map" else local
            )
            losses.append(float(metrics["loss"]))
            churns.append(int(metrics["churn"]))
        out |= flatten(f"{backend}/masks", s.masks)
        out |= flatten(f"{backend}/scores", s.scores)
        out[f"{backend}/loss"] = np.asarray(losses)
        out[f"{backend}/churn"] = np.asarray(churns)
        out[f"{backend}/step"] = np.asarray(int(s.step))
    out |= fsdp_run(search, pid, rows)
    np.savez(os.path.join(args.out, f"process_{pid}.npz"), **out)
    print(f"process {pid} of {count}: done, churn {out['shard_map/churn'].tolist()}", flush=True)


if __name__ == "__main__":
    main()
