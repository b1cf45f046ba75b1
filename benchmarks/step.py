"""Wall time of one jitted search step against one jitted dense training step of the same model.

Measures, on this machine and one device, with random data, for each model, compute dtype and
batch size asked for:
  * `dense`: `step.train_step` with weight decay 5e-4 and SGD momentum 0.9;
  * `search`: `step.search_step` with `jj.search_optimizer` (weight decay 5e-4, SGD momentum
    0.9, short restriction at each constant `--rate`; rate 1 is the exact top-k refresh, a rate
    below 1 the restricted one) for each exact selection in `--selections` (`batched`: all
    leaves at once in a fixed number of radix passes, the accelerator default; `bracketed`:
    per-leaf bisection, the CPU default; `auto`: the backend's default), a 90%
    `global_magnitude` budget and the `magnitude` score init;
  * `no refresh`: the search step whose last link keeps the masks as they are (same state type,
    no selection), so `(search - no refresh) / search` is the share of the step the refresh takes;
  * `refresh` (with `--refresh-alone`): `restriction.refresh_masks` alone, jitted, on the masks and
    the updated scores of one search step taken after the warm-up.
Every function is compiled first (not timed), then each search runs `--warmup` steps (from the
magnitude init the first steps propose few swaps). Then `--repeats` rounds; a round runs `--steps`
steps of every variant, one step of each in turn (the order rotates), every step blocked on its
output, so that the variants share the machine's load. Reported per row: the median over rounds of
the mean seconds per step, the median of the per-round ratios search/dense, the refresh share,
images per second of the search step, and the mask entries swapped per step. The load average is
printed: the machine may be shared.

Run:
  python benchmarks/step.py               # resnet32_w2 (batch 64) and fmnist_cnn (batch 128), CPU
  python benchmarks/step.py --quick       # 2 steps x 2 rounds, 2 warm-up steps
  python benchmarks/step.py --models resnet50 resnet32_w2 --batch 256 --dtype float32 \
      --rate 1 0.5 --selections batched            # what benchmarks/gpu.sh runs on a GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jackpots_jax as jj
import jackpots_jax.select
from jackpots_jax import models
from jackpots_jax.adapters import linen_apply
from jackpots_jax.restriction import ShortRestrictionState, refresh_masks, search_optimizer
from jackpots_jax.step import (
    create_search_state,
    create_train_state,
    search_step,
    train_step,
)

SPARSITY = 0.9
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9
LEARNING_RATE = 0.1
TOTAL_STEPS = 1000  # of the cosine learning rate; the timing does not depend on it
BATCH_SIZES = {"resnet32_w2": 64, "fmnist_cnn": 128}
# Steps per variant per round by default: a ResNet-32 step takes seconds on two CPU cores.
STEPS = {"resnet32_w2": 5, "fmnist_cnn": 20}


def frozen_masks(budget) -> optax.GradientTransformation:
    """A last link that owns the masks like `short_restriction` but never refreshes them."""

    def init_fn(scores):
        return ShortRestrictionState(jnp.zeros([], jnp.int32), jj.topk_masks(scores, budget))

    def update_fn(updates, state, params=None):
        del params
        return updates, ShortRestrictionState(optax.safe_increment(state.count), state.masks)

    return optax.GradientTransformation(init_fn, update_fn)


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, python {platform.python_version()}"


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"
    except OSError:
        return "n/a"


class Variant:
    """A compiled step and the state it threads through its calls."""

    def __init__(self, name: str, step: Callable, state, args: tuple):
        self.name, self.step, self.state, self.args = name, jax.jit(step), state, args
        self.rounds: list[float] = []  # mean seconds per step of each round
        self._round: list[float] = []

    def compile(self) -> float:
        """Compiles and runs one step; returns the seconds it took."""
        start = time.perf_counter()
        self.step = self.step.lower(self.state, *self.args).compile()
        self.once()
        self._round.clear()
        return time.perf_counter() - start

    def once(self):
        """One step, blocked on; its state is kept and its time added to the current round."""
        start = time.perf_counter()
        out = jax.block_until_ready(self.step(self.state, *self.args))
        self._round.append(time.perf_counter() - start)
        self.state = out[0]
        return out

    def end_round(self) -> None:
        self.rounds.append(statistics.mean(self._round))
        self._round.clear()


def build_variants(
    name: str, batch_size: int, dtype: str, rates: list[float], selections: list[str], seed: int
):
    """The dense, no-refresh and search variants of one model (one batch), and its budget."""
    model = models.create(name, 10, dtype=dtype)
    shape = models.input_shape(name)
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.standard_normal((batch_size, *shape), dtype=np.float32))
    labels = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
    batch = {"image": images, "label": labels}
    variables = jax.jit(lambda x: model.init(jax.random.key(seed), x, train=False))(images[:1])
    params, stats = variables["params"], variables.get("batch_stats", {})

    budget = jj.layer_budgets(params, SPARSITY, "global_magnitude")
    scores, _ = jj.init_scores(params, budget, "magnitude")
    key = jax.random.key(seed + 1)
    no_refresh_tx = optax.chain(*sgd_links(), frozen_masks(budget))
    dense_tx = optax.chain(*sgd_links())
    apply_fn = linen_apply(model)
    variants = [
        Variant(
            "dense",
            lambda s, b: train_step(s, b, apply_fn=apply_fn, tx=dense_tx),
            create_train_state(params, stats, dense_tx),
            (batch,),
        ),
        Variant(
            "no refresh",
            lambda s, p, b: search_step(s, p, b, apply_fn=apply_fn, tx=no_refresh_tx),
            create_search_state(scores, no_refresh_tx, batch_stats=stats, rng=key),
            (params, batch),
        ),
    ]
    kw = dict(learning_rate=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for selection in selections:
        for rate in rates:
            tx = search_optimizer(
                budget, total_steps=TOTAL_STEPS, rate=rate, selection=selection, **kw
            )
            variants.append(
                Variant(
                    f"search {jj.select.resolve(selection)} r={rate:g}",
                    lambda s, p, b, tx=tx: search_step(s, p, b, apply_fn=apply_fn, tx=tx),
                    create_search_state(scores, tx, batch_stats=stats, rng=key),
                    (params, batch),
                )
            )
    return variants, budget


def refresh_variant(search: Variant, budget, rate: float, selection: str) -> Variant:
    """`refresh_masks` alone on the masks of the search's state and the scores of its next step."""
    stepped, _ = search.step(search.state, *search.args)

    def refresh(masks, scores, rate_value):
        # The old masks are the state (unchanged), so every call refreshes the same scores.
        return masks, refresh_masks(scores, masks, budget, rate_value, selection=selection)

    name = search.name.replace("search", "refresh")
    return Variant(name, refresh, search.state.masks, (stepped.scores, jnp.float32(rate)))


def sgd_links() -> tuple[optax.GradientTransformation, ...]:
    """The links of `search_optimizer` before the restriction; also the dense optimiser."""
    return (
        optax.add_decayed_weights(WEIGHT_DECAY),
        optax.sgd(
            optax.cosine_decay_schedule(LEARNING_RATE, TOTAL_STEPS),
            momentum=MOMENTUM,
            nesterov=False,
        ),
    )


def print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("model", "dtype", "batch", "variant", "s/step", "dense s/step", "search/dense",
              "refresh share", "img/s", "swaps/step", "load 1 min")  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        cells = enumerate(zip(r, widths, strict=True))
        return "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in cells)

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def bench_one(name, dtype, batch_size, args) -> list[tuple[str, ...]]:
    """Times every variant of one (model, dtype, batch); returns the table rows."""
    steps = args.steps or STEPS.get(name, 5)
    variants, budget = build_variants(
        name, batch_size, dtype, args.rate, args.selections, args.seed
    )
    compile_s = sum(v.compile() for v in variants)
    searches = [v for v in variants if v.name.startswith("search")]
    for search in searches:
        for _ in range(args.warmup):
            search.once()
        search._round.clear()
    if args.refresh_alone:
        for search in list(searches):
            rate = float(search.name.rsplit("r=", 1)[1])
            selection = search.name.split()[1]
            variants.append(refresh_variant(search, budget, rate, selection))
            compile_s += variants[-1].compile()
    churn = {v.name: [] for v in searches}
    for r in range(args.repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for _ in range(steps):
            for v in order:
                out = v.once()
                if v in searches:
                    churn[v.name].append(int(out[1]["churn"]))
        for v in variants:
            v.end_round()
    load = load_average().split("/")[0]
    print(f"  {name} {dtype} batch {batch_size}: compiled in {compile_s:.1f} s; load {load}")
    t = {v.name: statistics.median(v.rounds) for v in variants}
    rounds = [{v.name: v.rounds[i] for v in variants} for i in range(args.repeats)]
    head = (name, dtype, str(batch_size))
    rows = [
        (*head, "dense", f"{t['dense']:.4f}", f"{t['dense']:.4f}", "1.000", "-",
         f"{batch_size / t['dense']:,.0f}", "-", load),
        (*head, "no refresh", f"{t['no refresh']:.4f}", f"{t['dense']:.4f}",
         f"{statistics.median(x['no refresh'] / x['dense'] for x in rounds):.3f}", "-",
         f"{batch_size / t['no refresh']:,.0f}", "-", load),
    ]  # fmt: skip
    for v in variants[2:]:
        ratio = statistics.median(x[v.name] / x["dense"] for x in rounds)
        if v in searches:
            share = statistics.median(
                (x[v.name] - x["no refresh"]) / x[v.name] for x in rounds
            )  # fmt: skip
            swaps = f"{statistics.mean(churn[v.name]) / 2:.0f}"
            images = f"{batch_size / t[v.name]:,.0f}"
        else:  # the refresh alone, as a share of its search step
            search = v.name.replace("refresh", "search")
            share = statistics.median(x[v.name] / x[search] for x in rounds)
            swaps, images = "-", "-"
        rows.append(
            (*head, v.name, f"{t[v.name]:.4f}", f"{t['dense']:.4f}", f"{ratio:.3f}",
             f"{share:.1%}", images, swaps, load)
        )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(BATCH_SIZES), choices=models.names())
    parser.add_argument(
        "--batch", type=int, nargs="+", default=None,
        help=f"batch sizes (default per model: {BATCH_SIZES}, else 64)",
    )  # fmt: skip
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument(
        "--rate", type=float, nargs="+", default=[1.0, 0.5],
        help="short-restriction rates (1: exact top-k refresh; < 1: the restricted refresh)",
    )  # fmt: skip
    parser.add_argument(
        "--selections", nargs="+", default=["auto"], choices=list(jj.select.SELECTIONS),
        help="exact selections of the refresh (auto: the backend's default)",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=int, default=None,
        help=f"steps per variant per round (default {STEPS}, else 5)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="rounds (median over rounds)")
    parser.add_argument("--warmup", type=int, default=10, help="search steps before timing")
    parser.add_argument("--refresh-alone", action="store_true", help="also time the refresh alone")
    parser.add_argument("--quick", action="store_true", help="2 steps x 2 rounds, 2 warm-up")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for rate in args.rate:
        if not 0.0 <= rate <= 1.0:
            parser.error(f"--rate must be in [0, 1], got {rate}")
    if args.quick:
        args.steps, args.repeats, args.warmup = 2, 2, 2

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()[:1]}")
    print(machine_info())
    print(
        f"sparsity {SPARSITY:.0%} global_magnitude, magnitude init, rates {args.rate}; "
        f"{args.steps or STEPS} steps x {args.repeats} rounds per variant after {args.warmup} "
        f"warm-up steps; median over rounds of s/step"
    )
    print(f"load average at start: {load_average()}")
    start = time.perf_counter()
    rows = []
    for name in args.models:
        for batch_size in args.batch or [BATCH_SIZES.get(name, 64)]:
            for dtype in args.dtype:
                rows += bench_one(name, dtype, batch_size, args)
    print()
    print_table(rows)
    print("search/dense: median of the per-round ratios of s/step against the dense step")
    print("refresh share: (search - no refresh) / search; for a refresh row, refresh / search")
    print("swaps/step: mask entries revived per timed search step (= entries removed)")
    print(f"load average at end: {load_average()}")
    print(f"total wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
