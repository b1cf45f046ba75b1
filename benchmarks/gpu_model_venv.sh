#!/usr/bin/env bash
# Creates .venv-gpu-model: the project's jax, jaxlib, flax and optax (same versions as the main
# venv's) plus the CUDA plugin, which lets XLA compile for an H200 on a machine without a GPU.
# benchmarks/gpu_model.py and tests/test_gpu_model.py run in it; the NVIDIA libraries are not
# installed (nothing runs on a GPU). About 130 MB from PyPI.
#
#   bash benchmarks/gpu_model_venv.sh                 # versions from .venv/bin/python
#   MAIN_PYTHON=/path/python bash benchmarks/gpu_model_venv.sh
#   GPU_MODEL_VENV=/elsewhere bash benchmarks/gpu_model_venv.sh
#
# Does nothing if the venv exists and already matches (delete it to rebuild).
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN_PYTHON="${MAIN_PYTHON:-.venv/bin/python}"
VENV="${GPU_MODEL_VENV:-.venv-gpu-model}"

# The plugin must match jaxlib exactly; flax/optax/numpy are pinned so both venvs trace the same
# programs.
pins=$("$MAIN_PYTHON" - <<'PY'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("jax", "jaxlib", "flax", "optax", "numpy")))
PY
)
jaxlib=$("$MAIN_PYTHON" -c "from importlib.metadata import version; print(version('jaxlib'))")
want="$pins jax-cuda13-plugin==$jaxlib jax-cuda13-pjrt==$jaxlib"

if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.pins" 2>/dev/null)" = "$want" ]; then
  echo "$VENV is up to date ($want)"
  exit 0
fi
rm -rf "$VENV"
python3 -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# shellcheck disable=SC2086  # $want is a list of requirement specifiers
"$VENV/bin/pip" install -q $want
"$VENV/bin/python" -c "import jax_plugins.xla_cuda13"
echo "$want" > "$VENV/.pins"
echo "created $VENV ($want)"
