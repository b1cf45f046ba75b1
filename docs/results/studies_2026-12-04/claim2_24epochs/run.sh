#!/bin/bash
# Seed 0's magnitude and kaiming/uniform cells: claim2_24epochs_seed0/run.sh (commit e3e34a4).
# Then, in the same workdir (finished cells are not rerun), from a worktree at cd87b9b:
cd /tmp/wt_s5
export JAX_COMPILATION_CACHE_DIR=/tmp/claims/jaxcache
echo "start $(date -u) commit $(git rev-parse HEAD) load $(cat /proc/loadavg)"
/usr/bin/time -v /work/main/.venv/bin/python -m jackpots_jax.main --config=configs/studies.py --workdir=/tmp/claims/claim2_e24 \
  --config.dataset.data_dir=/tmp/claims/tfds \
  --config.weights.path=/tmp/claims/claim1/pretrain/model.safetensors \
  "--config.studies.run=('claim2',)" "--config.studies.seeds=(0,1)" \
  "--config.studies.claim2.sparsities=(0.9,)" --config.studies.claim2.epochs=24 \
  --config.studies.claim2.eval_every_steps=156 \
  "--config.studies.claim2.inits=('magnitude/global_magnitude','kaiming/uniform','random/global_magnitude')"
echo "end $(date -u) rc $? load $(cat /proc/loadavg)"
# and seed 2 (the cp keeps the seeds-0-1 report aside):
cp -r /tmp/claims/claim2_e24/studies /tmp/claims/claim2_e24_seeds01_studies
cd /tmp/wt_s5
export JAX_COMPILATION_CACHE_DIR=/tmp/claims/jaxcache
echo "start $(date -u) commit $(git rev-parse HEAD) load $(cat /proc/loadavg)"
/usr/bin/time -v /work/main/.venv/bin/python -m jackpots_jax.main --config=configs/studies.py --workdir=/tmp/claims/claim2_e24 \
  --config.dataset.data_dir=/tmp/claims/tfds \
  --config.weights.path=/tmp/claims/claim1/pretrain/model.safetensors \
  "--config.studies.run=('claim2',)" "--config.studies.seeds=(0,1,2)" \
  "--config.studies.claim2.sparsities=(0.9,)" --config.studies.claim2.epochs=24 \
  --config.studies.claim2.eval_every_steps=156 \
  "--config.studies.claim2.inits=('magnitude/global_magnitude','kaiming/uniform','random/global_magnitude')"
echo "end $(date -u) rc $? load $(cat /proc/loadavg)"
# The report rewritten from the 9 cells at 853878d (both counts to the target):
python -m jackpots_jax.main --config=configs/studies.py --workdir=/tmp/claims/claim2_e24 --config.dataset.data_dir=/tmp/claims/tfds --config.weights.path=/tmp/claims/claim1/pretrain/model.safetensors "--config.studies.run=('claim2',)" "--config.studies.seeds=(0,1,2)" "--config.studies.claim2.sparsities=(0.9,)" --config.studies.claim2.epochs=24 --config.studies.claim2.eval_every_steps=156 "--config.studies.claim2.inits=('magnitude/global_magnitude','kaiming/uniform','random/global_magnitude')" --config.studies.report_only=True
