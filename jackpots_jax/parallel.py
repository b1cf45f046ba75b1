"""Meshes, shardings and runners: data parallelism (`'data'`) and sharded state (`'fsdp'`).

A mesh has two axes: `'data'` splits the batch, `'fsdp'` splits the state. With `fsdp == 1`
(the default) every device holds the whole model, scores, optimiser state and masks, and a step
written once per device (see `step.py`) runs data-parallel: `data_parallel(step_fn, ...)` returns
a callable `(*replicated, batch) -> outputs` over `jax.shard_map` (default) or `jax.pmap`, whose
steps average gradients and batch statistics with collectives over `'data'`.

With `fsdp > 1` the frozen params, the scores, the optimiser state and the masks are sharded over
`'fsdp'`, each leaf along one dimension (`fsdp_dims`: the largest divisible by the axis size, or
a rule by path), so each device holds `1 / fsdp` of them; the batch is split over both axes.
`sharded(step_fn, ...)` jits the same step with these shardings and XLA partitions it (GSPMD):
the forward gathers each layer's weights where it needs them, gradients are reduce-scattered, and
the exact selection of the masks runs on each device's shard of every leaf with only its
histograms all-reduced (`selection_layout`). Batch statistics are computed over the global batch
and replicated. pmap and shard_map run data parallelism only.

Several hosts: every process calls `initialize_distributed()` first (before any other JAX call),
builds the same mesh over the global devices (`make_mesh()`), reads only its own rows of every
global batch and passes them through `shard_batch`; the same program then runs on every process.

Example:
  >>> initialize_distributed()  # a no-op on one machine
  >>> mesh = make_mesh()
  >>> run = data_parallel(search_step, mesh=mesh, donate_argnums=0, apply_fn=apply_fn, tx=tx)
  >>> params = replicate(params, mesh)  # the frozen weights, placed once
  >>> state, metrics = run(state, params, shard_batch(local_batch, mesh))

  Sharded (FSDP) state over 8 devices, 4 shards of every leaf, placed by the step itself:
  >>> mesh = make_mesh(fsdp=4)
  >>> step = fsdp_step(search_step, mesh=mesh, donate_argnums=0, apply_fn=apply_fn, tx=tx)
  >>> state, metrics = step(state, params, local_batch)

  The same by hand:
  >>> mesh = make_mesh(fsdp=4)
  >>> tx = search_optimizer(budget, total_steps=n, layout=selection_layout(scores, mesh))
  >>> state = place(create_search_state(scores, tx, batch_stats=stats), mesh)
  >>> params = place(params, mesh)
  >>> run = sharded(search_step, mesh=mesh, donate_argnums=0, apply_fn=apply_fn, tx=tx)
  >>> state, metrics = run(state, params, shard_batch(local_batch, mesh))
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jackpots_jax import select
from jackpots_jax._tree import is_none, path_str

PyTree = Any
AXIS = "data"  # the batch axis of every mesh
FSDP = "fsdp"  # the state axis
AXES = (AXIS, FSDP)
BACKENDS = ("shard_map", "pmap", "jit")
# A rule: (regular expression searched in a leaf's path, the dimension to shard or None).
Rule = tuple[str, int | None]


# ---------------------------------------------------------------------------------------------
# Several processes.

# The variables of our own launchers (jax itself reads only JAX_COORDINATOR_ADDRESS of these).
_ENV_ADDRESS, _ENV_COUNT, _ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
# What jax's own cluster detection (`jax._src.clusters`) looks for.
_SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)
_OMPI_URI = "OMPI_MCA_orte_hnp_uri"
_TPU_HOSTS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def _detected_cluster() -> str | None:
    """The cluster whose environment asks for several processes, or `None` (one machine)."""
    if all(v in os.environ for v in _SLURM_VARS) and (_env_int("SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if _OMPI_URI in os.environ and (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "ompi"
    hosts = next((os.environ[v] for v in _TPU_HOSTS if os.environ.get(v)), "")
    if len([h for h in hosts.split(",") if h.strip()]) > 1 or os.environ.get(
        "MEGASCALE_COORDINATOR_ADDRESS"
    ):
        return "tpu"
    return None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str | None = "gloo",
) -> bool:
    """Joins this process to a multi-process JAX run when one is asked for; idempotent.

    Call it first thing, before any other JAX call (JAX cannot join once its backend is up). It
    calls `jax.distributed.initialize` when
      * the arguments are given (all three), or the environment variables `JAX_COORDINATOR_ADDRESS`,
        `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` are set (arguments win over the environment; in a
        detected cluster, as below, any of them may be given to override what JAX detects);
      * or one of the clusters that `jax.distributed.initialize()` detects on its own asks for more
        than one process: a Slurm job step (`SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_NTASKS`
        > 1, `SLURM_PROCID`, `SLURM_LOCALID`), an Open MPI launch (`OMPI_MCA_orte_hnp_uri`,
        `OMPI_COMM_WORLD_SIZE` > 1), or a Cloud TPU pod slice (several `TPU_WORKER_HOSTNAMES` /
        `TPU_PROCESS_ADDRESSES`, or `MEGASCALE_COORDINATOR_ADDRESS`); JAX then fills in the
        coordinator, the process count and this process's id.
    Otherwise (a plain machine, or one process) it does nothing and touches no JAX backend. On a
    TPU pod slice whose hosts JAX finds without these variables, the TPU runtime joins the hosts
    by itself and this returns `False` without harm.

    Args:
      coordinator_address: `'host:port'` of process 0, reachable from every process.
      num_processes: the number of processes.
      process_id: this process's id in `0 .. num_processes - 1`.
      cpu_collectives: the CPU collectives implementation set before joining (`'gloo'`, the one
        that runs across processes on CPU; `'mpi'` needs an MPI library), or `None` to leave
        JAX's setting alone. It only concerns the CPU backend.

    Returns:
      Whether this run has more than one process.

    Raises:
      ValueError: only some of the three settings are given outside a detected cluster, or they
        are invalid.
      RuntimeError: (from JAX) a multi-process run is asked for but JAX's backend is already
        initialised.

    Example:
      >>> initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=0)  # on host 0
      True
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    address = coordinator_address or os.environ.get(_ENV_ADDRESS) or None
    count = num_processes if num_processes is not None else _env_int(_ENV_COUNT)
    pid = process_id if process_id is not None else _env_int(_ENV_ID)
    given = {"coordinator_address": address, "num_processes": count, "process_id": pid}
    cluster = _detected_cluster()
    if cluster is None and any(v is None for v in given.values()):
        if all(v is None for v in given.values()):
            return False
        raise ValueError(
            f"initialize_distributed needs coordinator_address, num_processes and process_id "
            f"together (as arguments or as {_ENV_ADDRESS}, {_ENV_COUNT}, {_ENV_ID}) outside a "
            f"cluster JAX detects; missing "
            f"{', '.join(k for k, v in given.items() if v is None)} (given: "
            f"{', '.join(f'{k}={v!r}' for k, v in given.items() if v is not None)})"
        )
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"`num_processes` must be a positive int, got {count!r}")
        if count == 1:
            return False
    if pid is not None and (
        isinstance(pid, bool)
        or not isinstance(pid, int)
        or not 0 <= pid < (count if count is not None else pid + 1)
    ):
        raise ValueError(f"`process_id` must be an int in [0, num_processes={count}), got {pid!r}")
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    # Settings left as None are filled in by JAX's detection of the cluster.
    jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=pid)
    return jax.process_count() > 1


# ---------------------------------------------------------------------------------------------
# Meshes and batches.


def make_mesh(
    num_devices: int | None = None,
    devices: list | None = None,
    *,
    fsdp: int = 1,
    data: int | None = None,
) -> Mesh:
    """A mesh `('data', 'fsdp')` of shape `(num_devices // fsdp, fsdp)` over the devices given.

    Args:
      num_devices: how many devices (all of `devices` by default; `data * fsdp` when `data` is
        given).
      devices: the devices (all global devices by default). With several processes and no
        `devices`, each process contributes the same number of its own devices
        (`num_devices // jax.process_count()`, the first ones), in process order, so that every
        process holds a contiguous part of the batch.
      fsdp: the size of the `'fsdp'` axis, over which the state is sharded (1: every device holds
        all of it, data parallelism only). Must divide `num_devices`.
      data: the size of the `'data'` axis (`None`: `num_devices // fsdp`).

    Raises:
      ValueError: a device count out of range, one that `fsdp` (or the processes) do not
        divide, or a `data` that disagrees with `num_devices`.

    Example:
      >>> dict(make_mesh(data=2, fsdp=4).shape)  # on 8 devices
      {'data': 2, 'fsdp': 4}
    """
    if data is not None:
        if isinstance(data, bool) or not isinstance(data, int) or data < 1:
            raise ValueError(f"`data` must be a positive integer, got {data!r}")
        if isinstance(fsdp, int) and num_devices is not None and data * fsdp != num_devices:
            raise ValueError(
                f"`data` x `fsdp` must be `num_devices` ({num_devices}), got {data} x {fsdp}"
            )
        if isinstance(fsdp, int) and not isinstance(fsdp, bool):
            num_devices = data * fsdp
    explicit = devices is not None
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"`num_devices` must be in 1..{len(devices)}, got {num_devices!r}")
    if isinstance(fsdp, bool) or not isinstance(fsdp, int) or fsdp < 1 or n % fsdp:
        raise ValueError(f"`fsdp` must be a positive divisor of the {n} devices, got {fsdp!r}")
    processes = jax.process_count()
    if not explicit and processes > 1 and n < len(devices):
        if n % processes:
            raise ValueError(
                f"`num_devices` must be a multiple of the {processes} processes, got {n}"
            )
        per_process = n // processes
        chosen = []
        for p in range(processes):
            chosen += [d for d in devices if d.process_index == p][:per_process]
        devices = chosen
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((n // fsdp, fsdp), AXES, axis_types=(auto, auto), devices=devices[:n])


def axis_size(mesh: Mesh, axis: str) -> int:
    """The size of a mesh axis (1 for an axis the mesh does not have)."""
    return int(dict(mesh.shape).get(axis, 1))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split along their leading dimension over every axis of the mesh."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Global arrays split over the mesh (`'data'` and `'fsdp'`) from this process's rows.

    On one host `batch` is the whole batch; on several hosts each passes its own rows and the
    global batch is their concatenation in process order (the order of `make_mesh`'s devices).
    The leading dimension must divide evenly over this process's devices of the mesh.
    """
    sharding = batch_sharding(mesh)
    local = len(_local_devices(mesh))

    def one(x):
        x = np.asarray(x)
        if not x.ndim or x.shape[0] % local:
            raise ValueError(
                f"a batch leaf of shape {x.shape} does not split over this process's {local} "
                f"devices of the mesh"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, batch)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """`tree` as global arrays held whole by every device of the mesh.

    For arguments that every step reads and none changes (the frozen weights of a search): placed
    once, they are not copied to the devices again at every step. Every process passes the same
    values.
    """
    sharding = NamedSharding(mesh, P())

    def one(x):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            if x.sharding == sharding or not x.is_fully_addressable:
                return x  # already placed (on several hosts it could not be read back here)
            # Committed to the mesh as a step's outputs are: a jitted step met by the same
            # values uncommitted (on one device) would compile a second program for them.
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


# ---------------------------------------------------------------------------------------------
# Sharded state ('fsdp').


def _rule_dim(name: str, shape: tuple[int, ...], size: int, rules: Sequence[Rule]) -> int | None:
    for pattern, dim in rules:
        if re.search(pattern, name):
            if dim is None:
                return None
            if not -len(shape) <= dim < len(shape) or shape[dim] % size:
                raise ValueError(
                    f"sharding rule {pattern!r} puts leaf {name!r} of shape {shape} on dimension "
                    f"{dim}, which does not split into {size} equal parts over '{FSDP}'"
                )
            return dim % len(shape)
    # The largest dimension that divides evenly (the first of equals); none: replicated.
    dims = [d for d in range(len(shape)) if shape[d] % size == 0 and shape[d] >= size]
    return max(dims, key=lambda d: (shape[d], -d)) if dims else None


def fsdp_dims(tree: PyTree, mesh: Mesh, rules: Sequence[Rule] = ()) -> PyTree:
    """Per leaf, the dimension sharded over `'fsdp'`, or `None` (replicated).

    The largest dimension that the axis size divides (the first of equal ones); `None` where no
    dimension does, for scalars, and everywhere when the mesh's `'fsdp'` axis has size 1. A rule
    `(pattern, dim)` whose regular expression is found (`re.search`) in a leaf's path (written
    `'conv1/kernel'`, optimiser states included: `'0/trace/conv1/kernel'`) overrides that: the
    first matching rule gives the dimension (or `None`: replicated).

    Raises:
      ValueError: a rule names a dimension the axis size does not divide (the leaf is named).
    """
    size = axis_size(mesh, FSDP)

    def one(path, leaf):
        if leaf is None:
            return None
        shape = tuple(np.shape(leaf))
        if size == 1 or not shape:
            return None
        return _rule_dim(path_str(path), shape, size, rules)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_none)


def fsdp_shardings(tree: PyTree, mesh: Mesh, rules: Sequence[Rule] = ()) -> PyTree:
    """`NamedSharding`s of every leaf: over `'fsdp'` along `fsdp_dims`, else replicated."""

    def one(leaf, dim):
        if leaf is None:
            return None
        spec = [None] * np.ndim(leaf)
        if dim is not None:
            spec[dim] = FSDP
        return NamedSharding(mesh, P(*spec))

    return jax.tree.map(one, tree, fsdp_dims(tree, mesh, rules), is_leaf=is_none)


def place(tree: PyTree, mesh: Mesh, rules: Sequence[Rule] = (), shardings: PyTree = None) -> PyTree:
    """`tree` as global arrays laid out over the mesh: `fsdp_shardings` (or `shardings` given).

    Each device receives only its shard; on several hosts every process passes the same values
    and sends each of its devices their part (nothing is gathered anywhere).
    """
    shardings = fsdp_shardings(tree, mesh, rules) if shardings is None else shardings

    def one(x, sharding):
        if x is None:
            return None
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if isinstance(x, jax.Array) and x.is_fully_addressable:
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings, is_leaf=is_none)


def place_state(state: Any, mesh: Mesh, rules: Sequence[Rule] = ()) -> Any:
    """A `SearchState` / `TrainState` laid out over the mesh, as the sharded steps expect.

    Scores, optimiser state and masks (a train state's params) are split over `'fsdp'` as `place`
    splits them; batch statistics, the step count and the PRNG key stay whole on every device.
    """
    shardings = fsdp_shardings(state, mesh, rules)
    whole = NamedSharding(mesh, P())
    fields = {"batch_stats": jax.tree.map(lambda _: whole, state.batch_stats), "step": whole}
    if hasattr(state, "rng"):
        fields["rng"] = whole
    return place(state, mesh, shardings=shardings.replace(**fields))


def selection_layout(
    scores: PyTree, mesh: Mesh, rules: Sequence[Rule] = ()
) -> select.Layout | None:
    """Where the batched exact selection processes each leaf of scores sharded by `place`.

    Pass it to `short_restriction` / `search_optimizer` (`layout=`): the selection then packs each
    device's shard of every leaf into its own group and all-reduces only its histograms, instead
    of gathering whole leaves. `None` when the mesh does not shard the state.
    """
    size = axis_size(mesh, FSDP)
    if size == 1:
        return None
    return select.Layout(fsdp_dims(scores, mesh, rules), size, NamedSharding(mesh, P(FSDP)))


def state_bytes(tree: PyTree) -> dict[str, int]:
    """Bytes of `tree` held by each addressable device (keyed by device id), shards summed."""
    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        for shard in leaf.addressable_shards:
            key = str(shard.device.id)
            out[key] = out.get(key, 0) + math.prod(shard.data.shape) * shard.data.dtype.itemsize
    return out


def sharded(
    step_fn: Callable[..., Any],
    *,
    mesh: Mesh,
    donate_argnums: int | tuple[int, ...] = (),
    **static: Any,
) -> Callable[..., Any]:
    """Runs a step under `jit` on arguments laid out over the mesh (`place`, `shard_batch`).

    The step is the same per-device function as for `data_parallel`, called without an axis
    name: it computes over the global batch and XLA partitions it from its arguments' shardings
    (GSPMD). The first output keeps the first argument's shardings when it has the same
    structure (the state of a training or search step stays sharded); every other output is
    replicated.

    Args:
      step_fn: `step_fn(*args, axis_name=None, **static)`.
      mesh: the mesh the arguments are laid out over.
      donate_argnums: the arguments whose buffers the step may reuse (the state: `0`).
      **static: keyword arguments bound into `step_fn` (`apply_fn`, `tx`, ...).

    Returns:
      A callable `(*args) -> outputs`.
    """
    fn = partial(step_fn, axis_name=None, **static)
    replicated = NamedSharding(mesh, P())
    compiled: dict[Any, Callable] = {}

    def run(*args):
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", replicated), args[0])
        key = (len(args), jax.tree.structure(args[0]))
        if key not in compiled:
            out = jax.eval_shape(fn, *args)
            first = out[0] if isinstance(out, tuple) else None
            if first is not None and jax.tree.structure(first) == jax.tree.structure(args[0]):
                rest = jax.tree.map(lambda _: replicated, out[1:])
                out_shardings = (shardings, *rest)
            else:
                out_shardings = jax.tree.map(lambda _: replicated, out)
            compiled[key] = jax.jit(fn, out_shardings=out_shardings, donate_argnums=donate_argnums)
        return _block_on_cpu(compiled[key](*args))

    return run


def _local_devices(mesh: Mesh) -> list:
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def _local_rows(x: Any) -> Any:
    """This process's rows of a global array (in mesh order); other values pass through."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards])
    return x


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


def fsdp_step(
    step_fn: Callable[..., Any],
    *,
    mesh: Mesh,
    rules: Sequence[Rule] = (),
    donate_argnums: int | tuple[int, ...] = (),
    **static: Any,
) -> Callable[..., Any]:
    """A jitted step over a `('data', 'fsdp')` mesh that places its own arguments: for your loop.

    `run(state, *args, batch)`: the state is placed with `place_state`, every other argument but
    the batch (the frozen params) with `place` (each leaf split over `'fsdp'` along its largest
    divisible dimension; what is already placed passes through untouched), the batch (this
    process's rows) with `shard_batch`; then the step runs under `sharded`. The state it returns
    stays sharded, so the next call places nothing. Any mesh of `make_mesh`, `fsdp` 1 included.

    For the batched selection to work on each device's shard (no leaf gathered), build the
    optimiser with `layout=selection_layout(scores, mesh, rules)`.

    Args:
      step_fn: a per-device step, `step_fn(state, *args, batch, axis_name=None, **static)`
        (`engine.search_step`, `engine.train_step`).
      mesh: a mesh of `make_mesh(..., fsdp=n)`.
      rules: `(path regex, dim or None)` overrides of the dimension each leaf is split along.
      donate_argnums: the arguments whose buffers the step may reuse (the state: `0`).
      **static: keyword arguments bound into `step_fn` (`apply_fn`, `tx`, ...).

    Returns:
      A callable `(state, *args, batch) -> outputs`.

    Example:
      >>> mesh = make_mesh(fsdp=4)
      >>> tx = search_optimizer(budget, total_steps=n, layout=selection_layout(scores, mesh))
      >>> step = fsdp_step(search_step, mesh=mesh, donate_argnums=0, apply_fn=apply_fn, tx=tx)
      >>> for batch in batches:
      ...   state, metrics = step(state, params, batch)
    """
    if set(mesh.axis_names) != set(AXES):
        raise ValueError(f"the mesh must have axes {AXES} (make_mesh), got {mesh.axis_names}")
    run = sharded(step_fn, mesh=mesh, donate_argnums=donate_argnums, **static)

    def step(*args):
        state, *rest, batch = args
        rest = [place(a, mesh, rules) for a in rest]
        return run(place_state(state, mesh, rules), *rest, shard_batch(batch, mesh))

    return step


def data_parallel(
    step_fn: Callable[..., Any],
    *,
    mesh: Mesh | None = None,
    backend: str = "shard_map",
    donate_argnums: int | tuple[int, ...] = (),
    **static: Any,
) -> Callable[..., Any]:
    """Runs a per-device step data-parallel over the `'data'` axis, on one or several hosts.

    Both backends run on several processes (after `initialize_distributed`). Every process runs
    the same program: the replicated arguments (e.g. a state built from the same seed, or the
    previous step's outputs) must be equal on every process, and each process passes only its own
    rows of the global batch:

    * `'shard_map'` (default): a jit of `jax.shard_map` over the mesh. Pass the batch as global
      arrays, `shard_batch(local_rows, mesh)`; the outputs are global, replicated arrays.
    * `'pmap'`: `jax.pmap` over the mesh's devices. Each process passes its own rows (a host
      batch, or the global arrays of `shard_batch`, whose local rows are taken); they are split
      over its local devices and the collectives span every process. The outputs are this
      process's copy of the replicated result, on its first local device of the mesh.

    Args:
      step_fn: a per-device function `step_fn(*replicated, batch, axis_name=..., **static)` whose
        outputs are identical on every device (averaged or summed over `axis_name`), e.g.
        `search_step`, `train_step`, `eval_step`, `bn_stats_step`.
      mesh: a 1-D mesh with axis `'data'` (`make_mesh()` by default). For `pmap` its devices are
        the ones used.
      backend: `'shard_map'` or `'pmap'`.
      donate_argnums: the replicated arguments whose buffers the step may reuse for its outputs
        (the state of a training or search step: `0`); the caller must not use them afterwards.
      **static: keyword arguments bound into `step_fn` (`apply_fn`, `tx`, ...).

    Returns:
      A callable `(*replicated, batch) -> outputs` with replicated (unsharded) outputs. The batch's
      leading dimension is split evenly over the devices.
    """
    if backend not in ("shard_map", "pmap"):
        raise ValueError(
            f"unknown data-parallel backend {backend!r}; allowed: 'shard_map', 'pmap' (sharded "
            "state runs under `sharded`)"
        )
    mesh = make_mesh() if mesh is None else mesh
    if AXIS not in mesh.axis_names or set(mesh.axis_names) - set(AXES):
        raise ValueError(f"the mesh must have axis {AXIS!r} (and {FSDP!r}), got {mesh.axis_names}")
    if axis_size(mesh, FSDP) > 1:
        raise ValueError(
            f"{backend} runs data parallelism only, but the mesh shards the state over "
            f"'{FSDP}' ({axis_size(mesh, FSDP)} devices): use `fsdp_step` (or `sharded` on "
            "arguments placed with `place`) for fsdp > 1"
        )
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
            return jax.jit(mapped, donate_argnums=donate_argnums)

        def run(*args):
            _check_divisible(args[-1], n)
            if len(args) not in compiled:
                compiled[len(args)] = build(len(args))
            return _block_on_cpu(compiled[len(args)](*args))

        return run

    devices = list(mesh.devices.flat)
    n_local = len(_local_devices(mesh))
    multi_process = jax.process_count() > 1
    # Placed explicitly over the leading axis: inputs may carry another sharding (e.g. the
    # outputs of the previous step, unreplicated), which pmap would refuse.
    stacked = NamedSharding(mesh, P(AXIS))

    def place(x):
        # x holds this process's slices, one per local device: [n_local, ...].
        if multi_process:
            return jax.make_array_from_process_local_data(stacked, np.asarray(x))
        return jax.device_put(x, stacked)

    def build_pmap(n_args):
        return jax.pmap(
            fn, axis_name=AXIS, devices=devices, in_axes=0, donate_argnums=donate_argnums
        )

    def run_pmap(*args):
        *replicated, batch = args
        batch = jax.tree.map(_local_rows, batch)
        size = _check_divisible(batch, n_local)
        replicated = jax.tree.map(
            lambda x: place(jnp.broadcast_to(x, (n_local, *jnp.shape(x)))), replicated
        )
        batch = jax.tree.map(
            lambda x: place(jnp.reshape(x, (n_local, size // n_local, *np.shape(x)[1:]))), batch
        )
        if len(args) not in compiled:
            compiled[len(args)] = build_pmap(len(args))
        out = compiled[len(args)](*replicated, batch)
        out = _block_on_cpu(out)
        return jax.tree.map(lambda x: x.addressable_data(0)[0], out)

    return run_pmap
