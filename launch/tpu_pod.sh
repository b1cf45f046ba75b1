#!/usr/bin/env bash
# A jackpots_jax run on every worker of a Cloud TPU VM slice (a pod slice or a single host).
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --bucket gs://BUCKET/PATH [options] CONFIG \
#       [--config.FIELD=VALUE ...]
#
# Steps (each printed before it runs; --dry-run prints them and runs nothing):
#   0. check the config here (`python -m jackpots_jax.main --check_only`, with PYTHON, default
#      .venv/bin/python or python3): an unknown field or variant, an impossible value, a config
#      the workers would not receive (outside the repository, or not committed without
#      --copy-tree) stops the script with exit code 2, in dry runs too;
#   1. reuse the TPU VM NAME if `gcloud compute tpus tpu-vm describe` finds it, else create it
#      (--accelerator-type, --version, --spot);
#   2. copy this checkout to every worker (`git archive` of HEAD, or the working tree with
#      --copy-tree) and install it into ~/jackpots_jax/.venv with `jax[tpu]`;
#   3. mount the bucket on every worker with gcsfuse (which the workers need installed) at
#      ~/gcs/BUCKET: orbax checkpoints and every file of the run are written through it;
#   4. run `python -m jackpots_jax.main --config CONFIG --workdir ~/gcs/BUCKET/PATH` on all workers
#      at once (`--worker=all`). JAX joins the workers into one run by itself on a TPU slice; the
#      mesh spans every chip, `--config.parallel.fsdp=N` shards the search state over N of them.
# Running the same command again resumes from the newest checkpoint in the bucket.
#
# Options:
#   --name NAME               the TPU VM (created if missing)
#   --zone ZONE               its zone, e.g. us-central2-b
#   --bucket gs://B/PATH      the work directory, on a bucket every worker can write
#   --project PROJECT         the Google Cloud project (default: gcloud's own)
#   --accelerator-type TYPE   for a new VM (default v4-32)
#   --version VERSION         the TPU software version of a new VM (default tpu-ubuntu2204-base)
#   --spot                    create a Spot VM
#   --copy-tree               copy the working tree as it is instead of `git archive HEAD`
#   --dry-run                 print the commands, run none
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

name="" zone="" bucket="" project="" accel="v4-32" version="tpu-ubuntu2204-base"
spot=0 copy_tree=0 dry=0 config=""
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --bucket) bucket="${2:?--bucket needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --accelerator-type) accel="${2:?--accelerator-type needs a value}"; shift 2 ;;
    --version) version="${2:?--version needs a value}"; shift 2 ;;
    --spot) spot=1; shift ;;
    --copy-tree) copy_tree=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h | --help) usage ;;
    --config.*) extra+=("$1"); shift ;;
    -*) echo "tpu_pod.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *)
      if [[ -n "$config" ]]; then
        echo "tpu_pod.sh: one CONFIG only, got $config and $1" >&2
        exit 2
      fi
      config="$1"; shift ;;
  esac
done
missing=()
[[ -n "$name" ]] || missing+=(--name)
[[ -n "$zone" ]] || missing+=(--zone)
[[ -n "$bucket" ]] || missing+=(--bucket)
[[ -n "$config" ]] || missing+=(CONFIG)
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "tpu_pod.sh: missing ${missing[*]} (see --help)" >&2
  exit 2
fi
if [[ ! "$bucket" =~ ^gs://[a-z0-9][a-z0-9._-]*(/[A-Za-z0-9._/-]*)?$ ]]; then
  echo "tpu_pod.sh: --bucket must be gs://BUCKET[/PATH] (letters, digits, . _ - /), got '$bucket'" >&2
  exit 2
fi
config_file="${config%%:*}"
if [[ ! -f "$config_file" ]]; then
  echo "tpu_pod.sh: no config file $config_file (give it relative to the repository root)" >&2
  exit 2
fi
# The workers get this checkout only: the config must be in it, at the same relative path, and
# (without --copy-tree) committed as it is, since `git archive HEAD` is what they receive.
if [[ "$config_file" == /* || "$(realpath -m "$config_file")" != "$PWD"/* ]]; then
  echo "tpu_pod.sh: config $config_file is outside the repository; the workers get only the repository: copy it under configs/ and give it relative to the repository root" >&2
  exit 2
fi
if [[ $copy_tree -eq 0 ]] && ! { git cat-file -e "HEAD:$config_file" 2>/dev/null \
  && git diff --quiet HEAD -- "$config_file"; }; then
  echo "tpu_pod.sh: config $config_file is not committed as it is (the workers get \`git archive HEAD\`): commit it, or pass --copy-tree" >&2
  exit 2
fi
# The config is loaded and checked here, as the run will load it, before anything is started.
check_python="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
if ! PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS=cpu "$check_python" -m jackpots_jax.main \
  --config "$config" --workdir unused --check_only "${extra[@]}" >/dev/null; then
  echo "tpu_pod.sh: the config does not pass the check above (run with $check_python; set PYTHON to a Python with jackpots_jax's dependencies); nothing was started" >&2
  exit 2
fi

bucket_name="${bucket#gs://}"
bucket_path="${bucket_name#*/}"
bucket_name="${bucket_name%%/*}"
[[ "$bucket_path" == "$bucket_name" ]] && bucket_path=""
mount="\$HOME/gcs/$bucket_name"  # expanded on the workers
workdir="$mount${bucket_path:+/$bucket_path}"

where=(--zone "$zone")
[[ -n "$project" ]] && where+=(--project "$project")
tpu=(gcloud compute tpus tpu-vm)

# One word as a shell reads it back: as it is when it is plain, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command (quoted, so it can be pasted) and runs it unless --dry-run.
run() {
  printf '+'
  for word in "$@"; do
    printf ' %s' "$(quote "$word")"
  done
  printf '\n'
  [[ $dry -eq 1 ]] || "$@"
}

# 1. The VM.
if [[ $dry -eq 0 ]] && "${tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  echo "reusing TPU VM $name" >&2
else
  [[ $dry -eq 1 ]] && echo "# if \`${tpu[*]} describe $name ${where[*]}\` finds no VM:"
  create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accel" --version "$version")
  [[ $spot -eq 1 ]] && create+=(--spot)
  run "${create[@]}"
fi

# 2. The code, on every worker.
archive="${TMPDIR:-/tmp}/jackpots_jax_$$.tar.gz"
if [[ $copy_tree -eq 1 ]]; then
  run tar --exclude=.venv --exclude=.git --exclude=workdir -czf "$archive" .
else
  run git archive --format=tar.gz -o "$archive" HEAD
fi
run "${tpu[@]}" scp "$archive" "$name:jackpots_jax.tar.gz" "${where[@]}" --worker=all
[[ $dry -eq 1 ]] || rm -f "$archive"
install="rm -rf ~/jackpots_jax && mkdir -p ~/jackpots_jax && tar -xzf ~/jackpots_jax.tar.gz -C ~/jackpots_jax"
install+=" && cd ~/jackpots_jax && python3 -m venv .venv"
install+=" && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q 'jax[tpu]' -e '.[lm]'"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$install"

# 3. The bucket, on every worker.
mount_cmd="mkdir -p \"$mount\" && (mountpoint -q \"$mount\" || gcsfuse --implicit-dirs $bucket_name \"$mount\")"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$mount_cmd"

# 4. The run, on every worker at once.
job="cd ~/jackpots_jax && .venv/bin/python -m jackpots_jax.main --config $(quote "$config")"
job+=" --workdir \"$workdir\""
for arg in "${extra[@]}"; do
  job+=" $(quote "$arg")"
done
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$job"
