#!/usr/bin/env bash
# One prepared GPU run for docs/performance.md's GPU table, in under 8 minutes on one H100:
#
#   bash benchmarks/gpu_check.sh               # on a machine with a CUDA GPU, from any directory
#   bash benchmarks/gpu_check.sh --install     # pip install -e '.[cuda]' -c constraints.txt first
#   bash benchmarks/gpu_check.sh --dry-run     # every part on the CPU at tiny sizes (2-3 minutes)
#
# Parts, each a `python -m benchmarks.NAME` run under its own time limit; a part that fails or runs
# out of time is reported and the next one runs:
#   preflight    the project imports, jax has a CUDA backend (else: how to install, exit 2)
#   stage1       stage-I VQGAN train step (configs/vqgan.py paper), bf16, step time and MFU
#   stage2       ART-FR stage-II train step (configs/art.py paper; random tokenizer weights)
#   restoration  512-px restoration: batch-1 latency, throughput up to the largest batch that fits
#   osdface      OSDFace one-step restoration at 512 px (paper model, random weights): batch 1, 16
#   attention    jax.nn.dot_product_attention, XLA vs cuDNN, at the token transformer's shapes
#   data         data pipeline pairs/s with one worker per host core
# then a summary table (Markdown). MFU = XLA's FLOPs of the compiled step (cost_analysis) / step
# time / the chip's dense bf16 peak (benchmarks/art_train_step.py PEAK_BF16_TFLOPS: 989 TFLOP/s
# for an H100 SXM, NVIDIA's data sheet).
#
# Output goes to the terminal and, when $OUT is set, to $OUT/gpu_check.log, with the benchmarks'
# records in $OUT/gpu_check_results.jsonl. Exit status: 0 if every part finished with 0, 2 if the
# preflight failed (nothing else runs), else 1.
#
# Options: --only=PART[,PART...]  run these parts (and the preflight)
#          --budget=SECONDS       deadline for the whole run (default 450; dry run 900)
#          --install [--wheels=DIR]  pip install the CUDA extra first (offline from DIR)
# Sizes (environment): STAGE1_BATCH, STAGE2_BATCH (default 24, the paper's batch, on one device),
# STAGE1_REMAT, STAGE2_REMAT (default 1 and 0: 1 = --remat; a step that does not fit is tried
# again with remat, then at half the batch),
# RESTORE_BATCHES (default 1,32,256), DATA_WORKERS (default: the host's cores),
# PYTHON (default python3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY_RUN=0
INSTALL=0
WHEELS=""
ONLY=""
BUDGET=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --install) INSTALL=1 ;;
    --wheels=*) WHEELS="${arg#*=}" ;;
    --only=*) ONLY="${arg#*=}" ;;
    --budget=*) BUDGET="${arg#*=}" ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "gpu_check.sh: unknown argument $arg (see --help)" >&2
      exit 2
      ;;
  esac
done

PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || PY=python
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export ARTFR_BENCH_RESULTS="$WORK/results.jsonl"
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"

if ((DRY_RUN)); then
  # Tiny models on the CPU: every entry point imported and run once, nothing measured.
  export JAX_PLATFORMS=cpu
  BUDGET="${BUDGET:-900}"
  LIMIT=300
  EXPECT=cpu
  STAGE1=(--config=tiny --steps=1 --warmup=0)
  STAGE2=(--config=tiny --steps=1 --warmup=0)
  STAGE1_BATCH=2
  STAGE2_BATCH=2
  STAGE1_REMAT=0
  STAGE2_REMAT=0
  # Unoptimised LLVM code: the tiny programs compile faster, and nothing is measured.
  [[ "${XLA_FLAGS:-}" == *xla_backend_optimization_level* ]] ||
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
  RESTORE=(--config=tiny --steps=2 --repeats=1 --warmup=0 --batches=1)
  OSDFACE=(--small --size=32 --batch=1 --repeats=1 --warmup=0)
  ATTENTION=(--config=tiny --batches=2 --repeats=1 --inner=1)
  DATA=(--size 64 --seconds 0.3 --runs 1 --workers 1 --batch 4)
else
  BUDGET="${BUDGET:-450}"
  LIMIT=0
  EXPECT=gpu
  # jax takes 75% of the GPU's memory by default; the largest batches need more of it.
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
  STAGE1=(--config=paper --steps=5 --warmup=2)
  STAGE2=(--config=paper --steps=5 --warmup=2)
  STAGE1_BATCH="${STAGE1_BATCH:-24}"
  STAGE2_BATCH="${STAGE2_BATCH:-24}"
  # XLA:CPU's memory analysis at batch 24 in bfloat16 (a GPU's is likely lower: XLA:CPU computes
  # bfloat16 operations in float32; not checked): the stage-I step 171 GiB of temporaries, 48 GiB
  # with remat (python -m benchmarks.train_step --config=paper --memory-only --batch=24
  # --dtype=bfloat16 --kernels=xla [--remat]); the stage-II step 88 GiB. A step that does not fit
  # is tried again with remat (step_part).
  STAGE1_REMAT="${STAGE1_REMAT:-1}"
  STAGE2_REMAT="${STAGE2_REMAT:-0}"
  RESTORE=(--config=paper --repeats=5 --warmup=1 --batches="${RESTORE_BATCHES:-1,32,256}")
  OSDFACE=(--batch=1,16 --dtype=bfloat16 --repeats=10 --warmup=2)
  ATTENTION=(--config=paper --repeats=5 --inner=20)
  DATA=(--seconds 2 --runs 3 --workers "${DATA_WORKERS:-$(nproc)}")
fi

selected() { [[ -z "$ONLY" || ",$ONLY," == *",${1%%_*},"* || "$1" == preflight ]]; }

LAST_RC=0
# run_part NAME LIMIT_SECONDS COMMAND...: runs COMMAND under min(LIMIT, time left), its output also
# in $WORK/NAME.log, and appends "NAME rc seconds limit" to $WORK/status.tsv (rc -1: skipped).
run_part() {
  local name=$1 limit=$2
  shift 2
  ((LIMIT)) && limit=$LIMIT
  local left=$((DEADLINE - SECONDS))
  LAST_RC=-1
  if ! selected "$name"; then
    return 0
  fi
  if ((left < 15)); then
    echo "== $name: skipped, ${left} s left of the ${BUDGET} s budget"
    printf '%s\t-1\t0\t0\n' "$name" >>"$WORK/status.tsv"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo
  echo "== $name (limit ${limit} s, $(date -u +%H:%M:%S) UTC): $*"
  local start=$SECONDS
  # timeout(1) signals the part's whole process group (data-loader workers too): 124 on time-out.
  if ARTFR_BENCH_PART="$name" timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"; then
    LAST_RC=0
  else
    LAST_RC=${PIPESTATUS[0]}
  fi
  echo "== $name: exit ${LAST_RC} after $((SECONDS - start)) s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$LAST_RC" "$((SECONDS - start))" "$limit" >>"$WORK/status.tsv"
}

# step_part NAME LIMIT MODULE BATCH REMAT ARGS...: a train-step benchmark at per-device batch
# BATCH (with --remat if REMAT is 1). If the step does not fit (exit 3), once more: with remat as
# part NAME_remat, or, if remat was on, at half the batch as part NAME_b<HALF>.
step_part() {
  local name=$1 limit=$2 module=$3 batch=$4 remat=$5
  shift 5
  local cmd=("$PY" -m "$module" "$@")
  if ((remat)); then
    run_part "$name" "$limit" "${cmd[@]}" --batch="$batch" --remat
  else
    run_part "$name" "$limit" "${cmd[@]}" --batch="$batch"
  fi
  ((LAST_RC == 3)) || return 0
  if ((!remat)); then
    run_part "${name}_remat" "$limit" "${cmd[@]}" --batch="$batch" --remat
  elif ((batch > 1)); then
    run_part "${name}_b$((batch / 2))" "$limit" "${cmd[@]}" --batch=$((batch / 2)) --remat
  fi
}

install() {
  local args=(-m pip install -e '.[cuda]' -c constraints.txt)
  [[ -n "$WHEELS" ]] && args+=(--no-index --find-links "$WHEELS" --no-build-isolation)
  echo "== install: $PY ${args[*]}"
  "$PY" "${args[@]}"
}

commit() {
  local rev
  rev="$(git rev-parse --short HEAD 2>/dev/null)" || {
    echo "?"
    return
  }
  git diff --quiet HEAD 2>/dev/null && echo "$rev" || echo "$rev+changes"
}

main() {
  echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname), $(nproc) CPUs, commit $(commit), dry run: $DRY_RUN"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  fi
  if ((INSTALL)); then
    install || {
      echo "gpu_check: the install failed"
      return 2
    }
  fi
  DEADLINE=$((SECONDS + BUDGET))

  run_part preflight 60 "$PY" -m benchmarks.gpu_preflight --expect="$EXPECT"
  if ((LAST_RC != 0)); then
    echo "gpu_check: the preflight failed (exit $LAST_RC); nothing else runs"
    return 2
  fi
  step_part stage1 120 benchmarks.train_step "$STAGE1_BATCH" "$STAGE1_REMAT" "${STAGE1[@]}" \
    --dtype=bfloat16
  step_part stage2 100 benchmarks.art_train_step "$STAGE2_BATCH" "$STAGE2_REMAT" "${STAGE2[@]}" \
    --dtype=bfloat16
  run_part restoration 150 "$PY" -m benchmarks.restoration "${RESTORE[@]}" --dtype=bfloat16
  run_part osdface 100 "$PY" -m benchmarks.osdface --parts=latency "${OSDFACE[@]}"
  run_part attention 35 "$PY" -m benchmarks.attention "${ATTENTION[@]}" --dtype=bfloat16
  run_part data 60 "$PY" -m benchmarks.data_pipeline "${DATA[@]}"

  echo
  echo "== gpu_check summary ($((SECONDS)) s in all)"
  "$PY" -m benchmarks.gpu_check_summary --work="$WORK"
}

# main runs as an `if` condition, so a failing command inside it does not end the check (errexit
# is off there); each part's status is collected by run_part instead.
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  if main 2>&1 | tee "$OUT/gpu_check.log"; then rc=0; else rc=${PIPESTATUS[0]}; fi
  cp "$ARTFR_BENCH_RESULTS" "$OUT/gpu_check_results.jsonl" 2>/dev/null || true
elif main; then
  rc=0
else
  rc=$?
fi
exit "$rc"
