#!/bin/bash
cd /tmp/wt_fo
export JAX_COMPILATION_CACHE_DIR=/tmp/claims/jaxcache
echo "start claim3vit+first_order $(date -u) commit $(git rev-parse HEAD) load $(cat /proc/loadavg)"
/usr/bin/time -v /work/main/.venv/bin/python -m jackpots_jax.main --config=configs/studies.py --workdir=/tmp/claims/claim3vit \
  --config.model.name=vit_fmnist \
  --config.dataset.data_dir=/tmp/claims/tfds \
  --config.weights.path=/tmp/claims/vit_pretrain/pretrain/model.safetensors \
  "--config.studies.run=('claim3',)" "--config.studies.seeds=(0,1,2)" \
  --config.studies.claim3.sparsity=0.9 --config.studies.claim3.epochs=3 \
  "--config.studies.claim3.policies=('constant:1','constant:0.5','cosine','first_order')"
echo "end claim3vit+first_order $(date -u) rc $? load $(cat /proc/loadavg)"
