"""The lm_2of4 seed runs as one table: mean and spread over seeds of every row.

    python docs/results/lm_2of4_seeds_2026-12-04/aggregate.py /tmp/lm_seeds/s0 /tmp/lm_seeds/s1 ...

"Gap closed" per seed: the share of the mean-NLL gap between that seed's best one-shot mask over
frozen weights (Wanda's or SparseGPT's) and dense that a row closes.
"""

import json
import os
import sys

import numpy as np


def main(workdirs):
    runs = [json.load(open(os.path.join(w, "results.json"))) for w in workdirs]
    names = [r["model"] for r in runs[0]]
    by_seed = [{r["model"]: r for r in run} for run in runs]
    gaps = []
    for rows in by_seed:
        dense = rows["dense"]["loss"]
        frozen = [v["loss"] for k, v in rows.items() if k.startswith(("Wanda", "SparseGPT mask"))]
        best = min(frozen)
        gaps.append({k: (best - v["loss"]) / (best - dense) for k, v in rows.items()})
    print(f"{len(runs)} seeds: " + ", ".join(workdirs))
    print()
    print(
        "| row | perplexity, mean +- sd | per seed | mean NLL, mean +- sd | gap closed, per seed |"
    )
    print("|---|---:|---|---:|---|")
    for name in names:
        ppl = np.array([rows[name]["perplexity"] for rows in by_seed])
        nll = np.array([rows[name]["loss"] for rows in by_seed])
        gap = [g[name] for g in gaps]
        shown = "" if name == "dense" or "magnitude" in name else ", ".join(f"{x:.1%}" for x in gap)
        print(
            f"| {name} | {ppl.mean():,.2f} +- {ppl.std(ddof=1):,.2f} | "
            + ", ".join(f"{x:,.2f}" for x in ppl)
            + f" | {nll.mean():.4f} +- {nll.std(ddof=1):.4f} | {shown} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
