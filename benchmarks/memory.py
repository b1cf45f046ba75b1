"""The largest model a search fits under a per-device memory cap, state whole vs sharded (fsdp).

The model is a stack of `--layers` square dense layers of width W (a 64-feature input layer
first, a 10-way head last; every kernel but the head masked at 90%, uniform budget, SGD momentum,
the exact top-k refresh). For each `fsdp` in `--fsdp` the search step is compiled under `jit` on
a (data, fsdp) = (devices / fsdp, fsdp) mesh, its state laid out by `parallel.fsdp_shardings`,
and XLA's own memory analysis of the compiled step gives the bytes one device needs:
arguments + outputs - donated (aliased) buffers + temporaries. A bisection over W (multiples of
`--step`) finds the largest width under `--cap-mib`. Nothing is allocated for the bisection
(abstract arrays); the widths found are then run for one real step, to show they search.

Printed: the largest width per fsdp, the parameter count, the ratio of the two, and the bytes per
device of each part of the state (frozen weights, scores, momentum, masks) at the fsdp=8 width.

Run (8 CPU devices are made when the host has fewer):
  python benchmarks/memory.py                    # cap 64 MiB, 4 layers, fsdp 1 and 8
  python benchmarks/memory.py --quick            # cap 8 MiB, 2 layers
  python benchmarks/memory.py --cap-mib 1024 --layers 8 --fsdp 1 2 4 8
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()

import argparse
import math
import platform
import time
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jackpots_jax as jj
from jackpots_jax import parallel
from jackpots_jax.adapters import linen_apply
from jackpots_jax.step import create_search_state, search_optimizer, search_step

INPUTS, CLASSES, SPARSITY = 64, 10, 0.9


class Stack(nn.Module):
    width: int
    layers: int

    @nn.compact
    def __call__(self, x, train=False):
        for i in range(self.layers):
            x = nn.relu(nn.Dense(self.width, use_bias=False, name=f"fc{i}")(x))
        return nn.Dense(CLASSES, name="head")(x)


def problem(width: int, layers: int, batch: int):
    """Abstract params, search state and batch, the apply function and the optimiser."""
    model = Stack(width, layers)
    x = jax.ShapeDtypeStruct((batch, INPUTS), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    budget = jj.layer_budgets(params, SPARSITY, "uniform", dense=(r"^head/",))
    return model, params, budget, x


def compiled_step(width: int, layers: int, batch: int, mesh):
    model, params, budget, x = problem(width, layers, batch)
    tx = search_optimizer(
        budget,
        learning_rate=0.1,
        total_steps=10,
        selection="batched",
        layout=parallel.selection_layout(
            jax.tree.map(lambda p, b: None if b is None else p, params, budget), mesh
        ),
    )

    def init(p):
        scores, _ = jj.init_scores(p, budget, "magnitude")
        return create_search_state(scores, tx, batch_stats={})

    state = jax.eval_shape(init, params)
    whole = NamedSharding(mesh, P())
    state_sh = parallel.fsdp_shardings(state, mesh).replace(step=whole, rng=whole)
    params_sh = parallel.fsdp_shardings(params, mesh)
    batch_sh = parallel.batch_sharding(mesh)
    batch = {"image": x, "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    fn = partial(search_step, apply_fn=linen_apply(model), tx=tx)
    jitted = jax.jit(
        fn,
        in_shardings=(state_sh, params_sh, {"image": batch_sh, "label": batch_sh}),
        out_shardings=(state_sh, whole),
        donate_argnums=0,
    )
    compiled = jitted.lower(state, params, batch).compile()
    return compiled, (init, state_sh, params_sh, batch_sh), (model, params, state)


def per_device_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def largest_width(layers, batch, mesh, cap, step, limit):
    """The largest multiple of `step` up to `limit` whose compiled step fits `cap` bytes."""
    lo, hi = 0, limit // step  # widths lo*step fit (0: none known), hi*step untested upper end
    fits = {}

    def ok(k):
        if k not in fits:
            fits[k] = per_device_bytes(compiled_step(k * step, layers, batch, mesh)[0])
        return fits[k] <= cap

    if ok(hi):
        return hi * step, fits[hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo * step, fits.get(lo, 0)


def shard_bytes(tree, shardings) -> int:
    """Bytes of `tree` (abstract) one device holds under `shardings` (the largest shard)."""
    total = 0
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        shape = sh.shard_shape(leaf.shape)
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def run_once(width, layers, batch, mesh) -> float:
    """One real search step at `width`: its wall time in seconds (compile excluded)."""
    compiled, (init, state_sh, params_sh, batch_sh), (model, _, _) = compiled_step(
        width, layers, batch, mesh
    )
    params = jax.jit(model.init, out_shardings=None)(
        jax.random.key(0), jnp.zeros((1, INPUTS), jnp.float32)
    )["params"]
    params = jax.device_put(params, params_sh)
    state = jax.jit(init, out_shardings=state_sh)(params)
    rng = np.random.default_rng(0)
    data = {
        "image": jax.device_put(rng.standard_normal((batch, INPUTS), np.float32), batch_sh),
        "label": jax.device_put(rng.integers(0, CLASSES, batch).astype(np.int32), batch_sh),
    }
    start = time.perf_counter()
    state, metrics = compiled(state, params, data)
    jax.block_until_ready((state, metrics))
    assert np.isfinite(float(metrics["loss"]))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cap-mib", type=float, default=64.0)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--fsdp", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--step", type=int, default=64, help="width granularity")
    parser.add_argument("--limit", type=int, default=16384, help="largest width tried")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.cap_mib, args.layers, args.limit = 8.0, 2, 4096
    cap = int(args.cap_mib * 2**20)
    devices = jax.device_count()
    print(
        f"{platform.node()} {jax.default_backend()} x{devices}, jax {jax.__version__}, "
        f"load {os.getloadavg()[0]:.2f}; cap {args.cap_mib:g} MiB per device, "
        f"{args.layers} layers, batch {args.batch}"
    )
    rows = {}
    for fsdp in args.fsdp:
        mesh = parallel.make_mesh(fsdp=fsdp)
        width, used = largest_width(args.layers, args.batch, mesh, cap, args.step, args.limit)
        if width == 0:
            print(f"fsdp {fsdp}: no width fits {args.cap_mib:g} MiB")
            continue
        _, params, _, _ = problem(width, args.layers, args.batch)
        count = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
        seconds = run_once(width, args.layers, args.batch, mesh)
        rows[fsdp] = (width, count, used, mesh)
        print(
            f"fsdp {fsdp}: largest width {width} ({count / 1e6:.2f} M parameters), "
            f"{used / 2**20:.1f} MiB per device by XLA's analysis; one step ran in {seconds:.2f} s"
        )
    if len(rows) >= 2:
        small, big = min(rows), max(rows)
        print(
            f"parameters searchable, fsdp {big} / fsdp {small}: "
            f"{rows[big][1] / rows[small][1]:.2f}x"
        )
    for fsdp, (width, _, _, mesh) in rows.items():
        _, (_, state_sh, params_sh, _), (_, params, state) = compiled_step(
            width, args.layers, args.batch, mesh
        )
        moments = jax.tree.leaves(state.opt_state)
        moment_sh = jax.tree.leaves(state_sh.opt_state)
        parts = {
            "frozen weights": shard_bytes(params, params_sh),
            "scores": shard_bytes(state.scores, state_sh.scores),
            "optimizer state": shard_bytes(moments, moment_sh),
            "masks": shard_bytes(state.masks, state_sh.masks),
        }
        text = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in parts.items())
        print(f"per device at width {width}, fsdp {fsdp}: {text}")


if __name__ == "__main__":
    main()
