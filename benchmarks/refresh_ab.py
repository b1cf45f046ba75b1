"""The batched refresh of the ResNet-50-shaped set, two checkouts timed in alternation.

`benchmarks/topk.py` runs each method once per invocation, and on a shared 2-core machine its
rows move by tens of percent between invocations; this script alternates two package trees (the
current one and one given with --other, e.g. an older commit's `jackpots_jax` extracted with
`git archive`) in one process each, several rounds, to tell a change from that spread.

  python benchmarks/refresh_ab.py --other /tmp/old --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = r"""
import sys, time, statistics
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
import jax, jax.numpy as jnp, numpy as np
import jackpots_jax as jj
import topk as bench
shapes = {n: tuple(s.shape) for n, s in bench.resnet50_kernels().items()}
scores = {n: jnp.asarray(x) for n, x in bench.make_scores(shapes, 0).items()}
ks = {n: bench.kept(int(np.prod(s))) for n, s in shapes.items()}
budget = {n: int(np.prod(shapes[n])) - ks[n] for n in shapes}
masks = jax.jit(lambda s: jj.topk_masks(s, budget, selection="bracketed"))(scores)
noise = bench.make_scores(shapes, 1)
new = {n: jnp.asarray(bench.distinct(np.asarray(scores[n]) + np.float32(0.01) * noise[n]))
       for n in scores}
out = []
for rate in (1.0, 0.5):
    fn = jax.jit(lambda s, m, r: jj.refresh_masks(s, m, budget, r, selection="batched"))
    t, _ = bench.time_call(fn, new, masks, jnp.float32(rate), repeats=int(sys.argv[3]))
    out.append(t)
print(*out)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--other", required=True, help="a directory holding another jackpots_jax")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    trees = {"this": os.path.dirname(HERE), "other": os.path.abspath(args.other)}
    times = {name: [] for name in trees}
    for i in range(args.rounds):
        for name, tree in trees.items():
            res = subprocess.run(
                [sys.executable, "-c", CHILD, tree, HERE, str(args.repeats)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            r1, r05 = (float(x) for x in res.stdout.split())
            times[name].append((r1, r05))
            print(f"round {i + 1} {name:5s} rate 1: {r1:.4f} s  rate 0.5: {r05:.4f} s", flush=True)
    for name, ts in times.items():
        m1 = statistics.median(t[0] for t in ts)
        m05 = statistics.median(t[1] for t in ts)
        print(f"median {name:5s} rate 1: {m1:.4f} s  rate 0.5: {m05:.4f} s")
    for j, rate in enumerate(("1", "0.5")):
        a = statistics.median(t[j] for t in times["this"])
        b = statistics.median(t[j] for t in times["other"])
        print(f"this / other at rate {rate}: {a / b:.2f}")


if __name__ == "__main__":
    main()
