#!/bin/bash
cd /tmp/wt_fo
export JAX_COMPILATION_CACHE_DIR=/tmp/claims/jaxcache
for E in 2 1; do
echo "start E=$E $(date -u) commit $(git rev-parse HEAD) load $(cat /proc/loadavg)"
/usr/bin/time -v /work/main/.venv/bin/python -m jackpots_jax.main --config=configs/studies.py --workdir=/tmp/claims/claim2_budget_e$E \
  --config.dataset.data_dir=/tmp/claims/tfds \
  --config.weights.path=/tmp/claims/claim1/pretrain/model.safetensors \
  "--config.studies.run=('claim2',)" "--config.studies.seeds=(0,1,2)" \
  "--config.studies.claim2.sparsities=(0.9,)" --config.studies.claim2.epochs=$E \
  --config.studies.claim2.eval_every_steps=0 \
  "--config.studies.claim2.inits=('magnitude/global_magnitude',)"
echo "end E=$E $(date -u) rc $? load $(cat /proc/loadavg)"
done
