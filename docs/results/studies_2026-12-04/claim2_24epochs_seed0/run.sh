#!/bin/bash
while pgrep -f "workdir=/tmp/claims/claim3" >/dev/null; do sleep 10; done
cd /tmp/wt_claim3
export JAX_COMPILATION_CACHE_DIR=/tmp/claims/jaxcache
echo "start $(date -u) commit $(git rev-parse HEAD) load $(cat /proc/loadavg)"
/usr/bin/time -v /work/main/.venv/bin/python -m jackpots_jax.main --config=configs/studies.py --workdir=/tmp/claims/claim2_e24 \
  --config.dataset.data_dir=/tmp/claims/tfds \
  --config.weights.path=/tmp/claims/claim1/pretrain/model.safetensors \
  "--config.studies.run=('claim2',)" "--config.studies.seeds=(0,)" \
  "--config.studies.claim2.sparsities=(0.9,)" --config.studies.claim2.epochs=24 \
  --config.studies.claim2.eval_every_steps=156 \
  "--config.studies.claim2.inits=('magnitude/global_magnitude','kaiming/uniform')"
echo "end $(date -u) rc $? load $(cat /proc/loadavg)"
