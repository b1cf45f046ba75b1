#!/bin/bash
cd /tmp/wt_blocks
echo "command: python -m jackpots_jax.main --config configs/lm_2of4.py --config.search.inits=('sparsegpt',) --config.search.max_steps=256 --config.eval.every_steps=32 --workdir /tmp/lm_nll_blocks"
echo "workdir: a copy of the finished 256-step run /tmp/lm_nll (docs/results/lm_2of4_256steps_2026-12-04/nll): its search is restored, not rerun"
echo "commit: $(git rev-parse HEAD)"; echo "start_utc: $(date -u +%FT%TZ)"; echo "cpu: $(lscpu | grep 'Model name' | sed 's/.*: *//')"; echo "load: $(cat /proc/loadavg)"
/usr/bin/time -v /work/main/.venv/bin/python -m jackpots_jax.main --config configs/lm_2of4.py "--config.search.inits=('sparsegpt',)" --config.search.max_steps=256 --config.eval.every_steps=32 --workdir /tmp/lm_nll_blocks
echo "rc: $?"; echo "end_utc: $(date -u +%FT%TZ)"
