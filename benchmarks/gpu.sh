#!/usr/bin/env bash
# The accelerator benchmarks of the exact selection and of the search step, in one run.
#
#   bash benchmarks/gpu.sh            # on a machine with a GPU (or TPU) and jax installed for it
#   bash benchmarks/gpu.sh --full     # also bfloat16 and the bracketed (CPU default) selection
#   bash benchmarks/gpu.sh --quick    # a smoke run: small sizes, few steps (also runs on a CPU)
#
# Needs only jax, flax, optax and numpy: the benchmarks import neither the data pipelines nor the
# experiment runner (no grain, tensorflow-datasets or ml_collections). Run it from the repository
# root, or with the repository on PYTHONPATH. Prints the device, then two tables:
#   1. exact top-k and refresh of 25M scores and of ResNet-50's 54 kernels: the batched
#      selection (the accelerator default) against jnp.sort, lax.top_k and one jnp.sort of all
#      25M scores; every mask checked identical; how many candidates the batched top-k ranked;
#   2. search step / dense step of ResNet-50 (224 px) and the reference ResNet-32 (32/64/128),
#      batch 256, float32, short-restriction rate 1 and 0.5, the batched selection.
# Sized to take under 8 minutes on one GPU: 6 train-step programs and about 10 selection
# programs to compile (an estimate: no GPU has run it yet; compiling dominates). --full adds
# bfloat16 and the bracketed selection (per-leaf loops: slow to compile and to run on a GPU).
# Targets, modelled for an H200 (docs/benchmarks.md): search/dense <= 1.02 / 1.03 (ResNet-50)
# and <= 1.08 / 1.10 (ResNet-32) at rates 1 / 0.5; the batched top-k of ResNet-50 in under
# half the time of one jnp.sort of its scores.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

case "${1:-}" in
  --quick)
    topk=(--quick --selections batched bracketed --repeats 2)
    step=(--models fmnist_cnn --batch 32 --dtype float32 bfloat16 --rate 1 0.5
          --selections batched bracketed --quick) ;;
  --full)
    topk=(--selections batched bracketed --repeats 5)
    step=(--models resnet50 resnet32_w2 --batch 256 --dtype float32 bfloat16 --rate 1 0.5
          --selections batched bracketed --steps 10 --repeats 3 --warmup 10) ;;
  *)
    topk=(--sizes 25000000 --selections batched --repeats 5)
    step=(--models resnet50 resnet32_w2 --batch 256 --dtype float32 --rate 1 0.5
          --selections batched --steps 10 --repeats 3 --warmup 10) ;;
esac

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
