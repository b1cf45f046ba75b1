"""How well each one-shot baseline keeps one layer's outputs: `||X W - X W'||^2 / ||X W||^2`.

One dense layer `W [d, d]` (normal entries) and calibration inputs `X [n, d]` that are correlated
across channels and whose channels differ in scale (a few channels 10x larger, as the outlier
features of language models), drawn from `--seed`. The statistics are accumulated in chunks with
`update_stats`; each baseline prunes at 50% unstructured (uniform budget) and at 2:4:

* magnitude (`magnitude_masks`), Wanda (`wanda_masks`, within each output),
* SparseGPT's mask over the unchanged weights, and SparseGPT as published (weights changed).

The relative errors are measured on the calibration inputs and on held-out inputs from the same
distribution, and written to `--out` (JSON) and printed as a markdown table.

Run:
  python benchmarks/baselines_reconstruction.py --out docs/results/baselines_reconstruction.json
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np

import jackpots_jax as jj


def processor() -> str:
    """The CPU's model name (as `lscpu` prints it), or the machine type where it is not listed."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def inputs(rng: np.random.Generator, n: int, mixing: np.ndarray, scales: np.ndarray) -> np.ndarray:
    d = mixing.shape[0]
    return ((rng.normal(size=(n, d)) @ mixing) * scales).astype(np.float32)


def relative_error(x: np.ndarray, w: np.ndarray, pruned: np.ndarray) -> float:
    x = x.astype(np.float64)
    full = x @ w.astype(np.float64)
    return float(np.sum((full - x @ np.asarray(pruned, np.float64)) ** 2) / np.sum(full**2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/results/baselines_reconstruction.json")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    d = args.dim
    mixing = np.eye(d) + rng.normal(size=(d, d)) / np.sqrt(d)
    scales = np.where(rng.random(d) < 0.05, 10.0, 1.0)
    calibration = inputs(rng, args.samples, mixing, scales)
    held_out = inputs(rng, args.samples, mixing, scales)
    w = rng.normal(size=(d, d)).astype(np.float32)
    params = {"layer": {"kernel": w}}
    path = "layer/kernel"

    stats = jj.baselines.init_stats({path: d})
    for batch in np.split(calibration, 4):
        stats = jj.baselines.update_stats(stats, {path: batch}, chunk=256)

    rows = []
    for pattern, sparsity in (("unstructured", 0.5), ("2:4", None)):
        budget = jj.layer_budgets(params, sparsity, rule="uniform", pattern=pattern)
        magnitude = jj.baselines.magnitude_masks(params, budget)["layer"]["kernel"]
        wanda = jj.baselines.wanda_masks(params, budget, stats)["layer"]["kernel"]
        masks, weights = jj.baselines.sparsegpt_masks(params, budget, stats)
        candidates = {
            "magnitude": w * np.asarray(magnitude),
            "wanda": w * np.asarray(wanda),
            "sparsegpt mask (weights unchanged)": w * np.asarray(masks["layer"]["kernel"]),
            "sparsegpt (weights changed)": np.asarray(weights["layer"]["kernel"]),
        }
        for name, pruned in candidates.items():
            rows.append(
                {
                    "pattern": pattern,
                    "method": name,
                    "sparsity": float(np.mean(pruned == 0)),
                    "calibration": relative_error(calibration, w, pruned),
                    "held_out": relative_error(held_out, w, pruned),
                }
            )

    result = {
        "args": vars(args),
        "processor": processor(),
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("| pattern | method | error (calibration) | error (held out) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['pattern']} | {r['method']} | {r['calibration']:.4f} | {r['held_out']:.4f} |")


if __name__ == "__main__":
    main()
