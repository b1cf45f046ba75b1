#!/bin/bash
cd /tmp/wt_claim1
export JAX_COMPILATION_CACHE_DIR=/tmp/claims/jaxcache
echo "start $(date -u) commit $(git rev-parse HEAD) load $(cat /proc/loadavg)"
/usr/bin/time -v /work/main/.venv/bin/python -m jackpots_jax.main --config=configs/studies.py --workdir=/tmp/claims/claim1 \
  --config.dataset.data_dir=/tmp/claims/tfds \
  "--config.studies.run=('claim1',)" "--config.studies.seeds=(0,1,2)" \
  "--config.studies.claim1.sparsities=(0.5,0.9,0.95,0.98)"
echo "end $(date -u) rc $? load $(cat /proc/loadavg)"
