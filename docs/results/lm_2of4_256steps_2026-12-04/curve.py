"""Validation perplexity against search steps and tokens, from the two runs' metrics.jsonl."""

import json
import sys

folder = sys.argv[1]
curves = {}
for loss in ("nll", "kl"):
    with open(f"{folder}/{loss}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    curves[loss] = {r["step"]: r["perplexity"] for r in rows if r["kind"] == "eval"}
tokens_per_step = 2 * 128  # search.batch_size windows of 128 tokens
print(f"# python {' '.join(sys.argv)}")
print("step  tokens  perplexity (NLL loss)  perplexity (KL loss)")
for step in sorted(curves["nll"]):
    print(
        f"{step:4d}  {step * tokens_per_step:6d}  {curves['nll'][step]:21.2f}  "
        f"{curves['kl'][step]:20.2f}"
    )
