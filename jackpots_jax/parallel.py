"""Data-parallel runners of one per-device step: `jax.shard_map` over a mesh (default), `jax.pmap`.

A step is written once, per device, with collectives over the axis name `'data'` (see `step.py`).
`data_parallel(step_fn, ...)` returns a callable `(*replicated, batch) -> outputs`: the leading
arguments (the state, or `params, batch_stats, masks` for evaluation) are replicated on every
device, the batch is split along its leading axis, and every output is replicated (the step makes
it so with `pmean`/`psum`).

Example:
  >>> mesh = make_mesh()
  >>> run = data_parallel(search_step, mesh=mesh, model=model, tx=tx, budget=budget)
  >>> state, metrics = run(state, shard_batch(batch, mesh))
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
AXIS = "data"
BACKENDS = ("shard_map", "pmap")


def make_mesh(num_devices: int | None = None, devices: list | None = None) -> Mesh:
    """A 1-D mesh with axis `'data'` over the first `num_devices` devices (all by default)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"`num_devices` must be in 1..{len(devices)}, got {num_devices!r}")
    return jax.make_mesh(
        (n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n]
    )


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Global arrays split over `'data'` from this process's share of the batch.

    On one host `batch` is the whole batch; on several hosts each passes its own rows and the
    global batch is their concatenation in process order. The leading dimension must divide
    evenly over this process's devices of the mesh.
    """
    sharding = NamedSharding(mesh, P(AXIS))
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


def _block_on_cpu(out: Any) -> Any:
    # Collectives dispatched back-to-back can deadlock the CPU client with few cores: wait for each.
    if jax.default_backend() == "cpu":
        jax.block_until_ready(out)
    return out


def _check_divisible(batch: PyTree, n: int) -> int:
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"batch leaves have different leading sizes {sorted(sizes)}")
    (size,) = sizes
    if size % n:
        raise ValueError(f"a batch of {size} examples does not split over {n} devices")
    return size


def data_parallel(
    step_fn: Callable[..., Any],
    *,
    mesh: Mesh | None = None,
    backend: str = "shard_map",
    **static: Any,
) -> Callable[..., Any]:
    """Runs a per-device step data-parallel over the `'data'` axis.

    Args:
      step_fn: a per-device function `step_fn(*replicated, batch, axis_name=..., **static)` whose
        outputs are identical on every device (averaged or summed over `axis_name`), e.g.
        `search_step`, `train_step`, `eval_step`.
      mesh: a 1-D mesh with axis `'data'` (`make_mesh()` by default). For `pmap` its devices are
        the ones used.
      backend: `'shard_map'` (jit of `jax.shard_map`; multi-host ready) or `'pmap'`.
      **static: keyword arguments bound into `step_fn` (model, tx, budget, ...).

    Returns:
      A callable `(*replicated, batch) -> outputs` with replicated (unsharded) outputs. The batch's
      leading dimension is split evenly over the devices.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    mesh = make_mesh() if mesh is None else mesh
    if tuple(mesh.axis_names) != (AXIS,):
        raise ValueError(f"the mesh must be 1-D with axis {AXIS!r}, got {mesh.axis_names}")
    fn = partial(step_fn, axis_name=AXIS, **static)
    n = mesh.devices.size
    compiled: dict[int, Callable] = {}

    if backend == "shard_map":

        def build(n_args):
            # check_vma=False: inside the body the gradient of the replicated scores is the
            # per-device gradient, averaged explicitly by the step's pmean (as under pmap).
            mapped = jax.shard_map(
                fn,
                mesh=mesh,
                in_specs=(P(),) * (n_args - 1) + (P(AXIS),),
                out_specs=P(),
                check_vma=False,
            )
            return jax.jit(mapped)

        def run(*args):
            _check_divisible(args[-1], n)
            if len(args) not in compiled:
                compiled[len(args)] = build(len(args))
            return _block_on_cpu(compiled[len(args)](*args))

        return run

    devices = list(mesh.devices.flat)

    def build_pmap(n_args):
        return jax.pmap(fn, axis_name=AXIS, devices=devices, in_axes=0)

    def run_pmap(*args):
        size = _check_divisible(args[-1], n)
        *replicated, batch = args
        # Placed explicitly over the leading axis: inputs may carry another sharding (e.g. the
        # outputs of the previous step, unreplicated), which pmap would refuse.
        stacked = NamedSharding(mesh, P(AXIS))
        replicated = jax.tree.map(
            lambda x: jax.device_put(jnp.broadcast_to(x, (n, *jnp.shape(x))), stacked), replicated
        )
        batch = jax.tree.map(
            lambda x: jax.device_put(jnp.reshape(x, (n, size // n, *np.shape(x)[1:])), stacked),
            batch,
        )
        if len(args) not in compiled:
            compiled[len(args)] = build_pmap(len(args))
        out = compiled[len(args)](*replicated, batch)
        out = _block_on_cpu(out)
        return jax.tree.map(lambda x: x[0], out)

    return run_pmap
