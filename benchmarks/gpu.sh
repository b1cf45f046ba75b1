#!/usr/bin/env bash
# The accelerator benchmarks of the exact selection and of the search step, in one run.
#
#   bash benchmarks/gpu.sh            # on a machine with a GPU (or TPU) and jax installed for it
#   bash benchmarks/gpu.sh --quick    # a smoke run: small sizes, few steps (also runs on a CPU)
#
# Needs only jax, flax, optax and numpy: the benchmarks import neither the data pipelines nor the
# experiment runner (no grain, tensorflow-datasets or ml_collections). Run it from the repository
# root, or with the repository on PYTHONPATH. Prints the device, then two tables:
#   1. exact top-k and refresh of 1M/5M/25M scores and of ResNet-50's 54 kernels: the batched
#      selection (radix passes over all leaves at once, the accelerator default) and the
#      bracketed one (per-leaf bisection, the CPU default) against jnp.sort, lax.top_k and one
#      jnp.sort of all 25M scores; every mask checked identical;
#   2. search step / dense step of ResNet-50 (224 px) and the reference ResNet-32 (32/64/128), batch
#      256, float32 and bfloat16, short-restriction rate 1 and 0.5, each selection.
# Targets (fp32, batch 256): search/dense <= 1.05 (ResNet-50) and <= 1.15 (ResNet-32) at rate 1
# and 0.5; the batched top-k of ResNet-50 faster than one jnp.sort of its 25M scores.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

if [ "${1:-}" = "--quick" ]; then
  topk=(--quick --selections batched bracketed --repeats 2)
  step=(--models fmnist_cnn --batch 32 --dtype float32 bfloat16 --rate 1 0.5
        --selections batched bracketed --quick)
else
  topk=(--selections batched bracketed --repeats 5)
  step=(--models resnet50 resnet32_w2 --batch 256 --dtype float32 bfloat16 --rate 1 0.5
        --selections batched bracketed --steps 10 --repeats 3 --warmup 10)
fi

echo "== device"
"$PY" -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader || true
echo
echo "== 1. exact top-k and refresh (benchmarks/topk.py ${topk[*]})"
"$PY" benchmarks/topk.py "${topk[@]}"
echo
echo "== 2. search step against dense step (benchmarks/step.py ${step[*]})"
"$PY" benchmarks/step.py "${step[@]}"
