#!/bin/bash
# The 8-epoch claim-2 study's report rewritten from its cells (nothing searched again) at commit
# 853878d, which adds the count from the evaluation after which the accuracy stays at the target.
python -m jackpots_jax.main --config=configs/studies.py --workdir=/tmp/claims/claim2 \
  --config.dataset.data_dir=/tmp/claims/tfds \
  --config.weights.path=/tmp/claims/claim1/pretrain/model.safetensors \
  "--config.studies.run=('claim2',)" "--config.studies.seeds=(0,1,2)" \
  "--config.studies.claim2.sparsities=(0.9,)" --config.studies.claim2.epochs=8 \
  "--config.studies.claim2.inits=('magnitude/global_magnitude','kaiming/uniform','random/global_magnitude')" \
  --config.studies.report_only=True
