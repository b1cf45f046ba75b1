#!/usr/bin/env bash
# The lm_2of4 job (64-step searches) at three seeds: the seed draws the calibration windows of
# Wanda and SparseGPT and the order of the search's training windows. The loss by block is off
# (it does not depend on the seed's question and costs minutes per mask).
# Usage: bash docs/results/lm_2of4_seeds_2026-12-04/run.sh /tmp/lm_seeds
set -euo pipefail
out=${1:?workdir root}
for seed in 0 1 2; do
  python -m jackpots_jax.main --config configs/lm_2of4.py --workdir "$out/s$seed" \
    --config.seed=$seed --config.eval.by_block=False > "$out/s$seed.log" 2>&1
done
