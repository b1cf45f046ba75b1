"""Wall time of the first-order swap check (`restriction.first_order_pairs`) per leaf.

`first_order_check` pairs the swaps the restriction proposes and keeps those a first-order
expansion says lower the loss. `first_order_pairs` sorts only the proposed swaps, compacted into
a static capacity (default `max(1024, n // 32)` slots), and sorts the whole leaf when more swaps
than that are proposed. This script times both paths on the same inputs: `compacted` (the
default capacity) and `whole leaf` (capacity 1, which always takes the whole-leaf sort), checks
that their masks are identical, and prints the ratio whole / compacted measured in the same run.

Inputs, per leaf size in `--sizes`: standard-normal scores (float32), the top `--keep` share as
the old mask, the top of the scores plus a perturbation of `--noise` as the proposed mask (so the
swaps are those a search step proposes), standard-normal gradients.

Every function is jitted; the first call (compile) is excluded; each timing is the median of
`--repeats` calls, each blocked with `block_until_ready`. The load average is printed: the
machine may be shared.

Run:
  python benchmarks/first_order.py                 # leaves of 50k, 200k and 1M entries
  python benchmarks/first_order.py --quick         # one small leaf, a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from step import load_average, machine_info  # benchmarks/step.py

import jackpots_jax as jj


def _inputs(n: int, keep: float, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    k = max(1, int(round(keep * n)))
    scores = rng.standard_normal(n).astype(np.float32)
    old = np.zeros(n, bool)
    old[np.argsort(-scores, kind="stable")[:k]] = True
    new = scores + noise * rng.standard_normal(n).astype(np.float32)
    proposed = np.zeros(n, bool)
    proposed[np.argsort(-new, kind="stable")[:k]] = True
    grads = rng.standard_normal(n).astype(np.float32)
    return new, old, proposed, grads


def _time(fn, args, repeats: int) -> tuple[float, np.ndarray]:
    out = fn(*args).block_until_ready()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times), np.asarray(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    parser.add_argument("--keep", type=float, default=0.1, help="share of each leaf kept")
    parser.add_argument("--noise", type=float, default=0.05, help="perturbation of the scores")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="one leaf of 20k entries, 3 calls")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats = [20_000], 3

    print(f"jax {jax.__version__}, {jax.default_backend()}, {machine_info()}")
    print(f"load average before: {load_average()}")
    header = f"{'entries':>10} {'swaps':>7} {'compacted ms':>13} {'whole leaf ms':>14} "
    print(header + f"{'whole / compacted':>18} {'masks identical':>16}")
    for n in args.sizes:
        inputs = _inputs(n, args.keep, args.noise, args.seed)
        swaps = int(np.sum(inputs[2] & ~inputs[1]))
        compacted = jax.jit(jj.restriction.first_order_pairs)
        whole = jax.jit(lambda *a: jj.restriction.first_order_pairs(*a, capacity=1))
        t_c, m_c = _time(compacted, inputs, args.repeats)
        t_w, m_w = _time(whole, inputs, args.repeats)
        same = "yes" if np.array_equal(m_c, m_w) else "NO"
        print(
            f"{n:>10} {swaps:>7} {1e3 * t_c:>13.3f} {1e3 * t_w:>14.3f} {t_w / t_c:>18.1f} "
            f"{same:>16}"
        )
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
