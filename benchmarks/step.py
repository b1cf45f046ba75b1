"""Wall time of one jitted search step against one jitted dense training step of the same model.

Measures, on this machine and one device, with random data:
  * `search`: `step.search_step` with `step.search_optimizer` (weight decay 5e-4, SGD momentum
    0.9, short restriction at a constant rate `--rate`), a 90% `global_magnitude` budget and the
    `magnitude` score init. With a rate below 1 a layer with two or more proposed swaps takes the
    restricted branch of the refresh (three exact selections over the layer), the costlier one;
  * `dense`: `step.train_step` with weight decay 5e-4 and SGD momentum 0.9 on the same model,
    variables and batch;
  * `no refresh`: the search step whose last link keeps the masks as they are (same state type,
    no selection), so `search - no refresh` is what the mask refresh costs inside the step;
  * `refresh`: `restriction.refresh_masks` alone (jitted, the rate as a traced value) on the
    masks and the updated scores of one search step taken after the warm-up;
for the reference ResNet-32 (`resnet32_w2`, widths 32/64/128) at batch 64 and `fmnist_cnn` at
batch 128. Every function is compiled first (not timed), then the search runs `--warmup` steps
(from the magnitude init the first steps propose few swaps). Then `--repeats` rounds; a round
runs `--steps` steps of every variant, one step of each in turn (the order rotates), every step
blocked on its output, so that the variants share the machine's load. Reported: the median over
rounds of each variant's mean seconds per step, and of the per-round ratios. The load average
(1 minute) is printed with each model: the machine may be shared.

Run:
  python benchmarks/step.py               # 5 (ResNet-32) / 20 (CNN) steps x 3 rounds per variant
  python benchmarks/step.py --quick       # 2 steps x 2 rounds, 2 warm-up steps
  python benchmarks/step.py --models fmnist_cnn --steps 10
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
from jackpots_jax import models
from jackpots_jax.restriction import ShortRestrictionState, refresh_masks
from jackpots_jax.step import (
    create_search_state,
    create_train_state,
    linen_apply,
    search_optimizer,
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


def build_variants(name: str, batch_size: int, rate: float, seed: int):
    """The search, dense and no-refresh variants of one model (one batch), and its budget."""
    model = models.create(name, 10)
    shape = models.input_shape(name)
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.standard_normal((batch_size, *shape), dtype=np.float32))
    labels = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
    batch = {"image": images, "label": labels}
    variables = model.init(jax.random.key(seed), images[:1], train=False)
    params, stats = variables["params"], variables.get("batch_stats", {})

    budget = jj.layer_budgets(params, SPARSITY, "global_magnitude")
    scores, _ = jj.init_scores(params, budget, "magnitude")
    key = jax.random.key(seed + 1)
    kw = dict(learning_rate=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    search_tx = search_optimizer(budget, total_steps=TOTAL_STEPS, rate=rate, **kw)
    no_refresh_tx = optax.chain(*sgd_links(), frozen_masks(budget))
    dense_tx = optax.chain(*sgd_links())

    apply_fn = linen_apply(model)
    search_state = create_search_state(scores, search_tx, batch_stats=stats, rng=key)
    variants = [
        Variant(
            "search",
            lambda s, p, b: search_step(s, p, b, apply_fn=apply_fn, tx=search_tx),
            search_state,
            (params, batch),
        ),
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
    return variants, budget


def refresh_variant(search: Variant, budget, rate: float) -> Variant:
    """`refresh_masks` alone on the masks of the search's state and the scores of its next step."""
    stepped, _ = search.step(search.state, *search.args)

    def refresh(masks, scores, rate_value):
        # The old masks are the state (unchanged), so every call refreshes the same scores.
        return masks, refresh_masks(scores, masks, budget, rate_value)

    return Variant("refresh", refresh, search.state.masks, (stepped.scores, jnp.float32(rate)))


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
    header = ("model", "batch", "search s/step", "dense s/step", "search/dense", "no refresh",
              "refresh s", "refresh share", "swaps/step", "load 1 min")  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        cells = enumerate(zip(r, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in cells)

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(BATCH_SIZES), choices=list(BATCH_SIZES))
    parser.add_argument(
        "--steps", type=int, default=None,
        help=f"steps per variant per round (default {STEPS})",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="rounds (median over rounds)")
    parser.add_argument("--rate", type=float, default=0.5, help="short-restriction rate, < 1")
    parser.add_argument("--warmup", type=int, default=10, help="search steps before timing")
    parser.add_argument("--quick", action="store_true", help="2 steps x 2 rounds, 2 warm-up")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0.0 <= args.rate <= 1.0:
        parser.error(f"--rate must be in [0, 1], got {args.rate}")
    if args.quick:
        args.steps, args.repeats, args.warmup = 2, 2, 2

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()[:1]}")
    print(machine_info())
    print(
        f"sparsity {SPARSITY:.0%} global_magnitude, magnitude init, rate {args.rate}; "
        f"{args.steps or STEPS} steps x {args.repeats} rounds per variant after {args.warmup} "
        f"warm-up steps; median over rounds of s/step"
    )
    print(f"load average at start: {load_average()}")
    start = time.perf_counter()
    rows = []
    for name in args.models:
        batch_size = BATCH_SIZES[name]
        steps = args.steps or STEPS[name]
        variants, budget = build_variants(name, batch_size, args.rate, args.seed)
        compile_s = sum(v.compile() for v in variants)
        search = variants[0]
        for _ in range(args.warmup):
            search.once()
        search._round.clear()
        variants.append(refresh_variant(search, budget, args.rate))
        compile_s += variants[-1].compile()
        churn = []
        for r in range(args.repeats):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for _ in range(steps):
                for v in order:
                    out = v.once()
                    if v is search:
                        churn.append(int(out[1]["churn"]))
            for v in variants:
                v.end_round()
        t = {v.name: statistics.median(v.rounds) for v in variants}
        rounds = [
            {v.name: v.rounds[r] for v in variants} for r in range(args.repeats)
        ]  # fmt: skip
        ratio = statistics.median(x["search"] / x["dense"] for x in rounds)
        share = statistics.median((x["search"] - x["no refresh"]) / x["search"] for x in rounds)
        alone = statistics.median(x["refresh"] / x["search"] for x in rounds)
        load = load_average().split("/")[0]
        rows.append(
            (
                name,
                str(batch_size),
                f"{t['search']:.4f}",
                f"{t['dense']:.4f}",
                f"{ratio:.3f}",
                f"{t['no refresh']:.4f}",
                f"{t['refresh']:.4f}",
                f"{share:.1%} ({alone:.1%})",
                f"{statistics.mean(churn) / 2:.0f}",
                load,
            )
        )
        print(
            f"  {name}: compiled in {compile_s:.1f} s, timed; load average {load_average()}",
            flush=True,
        )
    print()
    print_table(rows)
    print("search/dense and refresh share: medians of the per-round ratios")
    print("refresh share: (search - no refresh) / search; in brackets, the refresh alone / search")
    print("swaps/step: mask entries revived per timed search step (= entries removed)")
    print(f"load average at end: {load_average()}")
    print(f"total wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
