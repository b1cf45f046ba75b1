"""The probes' validation perplexity every 16 steps and the mask entries flipped.

python docs/results/lm_2of4_adam_probe_2026-12-05/summary.py > .../summary.txt
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(root=HERE):
    print(f"# python {os.path.relpath(__file__)}")
    print("probe | command's overrides | search | perplexity at steps 16, 32, ... | flipped")
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        with open(os.path.join(root, name, "output.txt")) as f:
            command = next(line for line in f if line.startswith("command:"))
        overrides = command.split('--config.prune.baselines="()"')[-1].strip()
        rows = [json.loads(line) for line in open(path)]
        for phase in dict.fromkeys(r["phase"] for r in rows if "phase" in r):
            mine = [r for r in rows if r.get("phase") == phase]
            curve = " / ".join(f"{r['perplexity']:.2f}" for r in mine if r["kind"] == "eval")
            churn = sum(r["churn"] for r in mine if r["kind"] == "churn")
            print(f"{name} | {overrides} | {phase} | {curve} | {churn:,}")


if __name__ == "__main__":
    main(*sys.argv[1:])
