"""One process of the two-process search run of `test_multihost.py` (not a test module itself).

Run as `python tests/multihost_driver.py --process-id I --num-processes 2 --port P --out DIR`
with `XLA_FLAGS=--xla_force_host_platform_device_count=2` and `JAX_PLATFORMS=cpu`. Every process
joins the run with `initialize_distributed`, builds the same initial search state (same seeds),
feeds only its own rows of every global batch and runs `STEPS` search steps with each backend of
`data_parallel` over the 4 global devices. Each process writes what it ends with (masks, scores,
per-step loss and churn) to `DIR/process_I.npz`.
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
    np.savez(os.path.join(args.out, f"process_{pid}.npz"), **out)
    print(f"process {pid} of {count}: done, churn {out['shard_map/churn'].tolist()}", flush=True)


if __name__ == "__main__":
    main()
