#!/usr/bin/env bash
# The prepared GPU check of issue 6: correctness tests and every benchmark at full size, in one
# short run that installs nothing and finishes inside six minutes.
#
#   benchmarks/gpu_check.sh OUTDIR            # on a CUDA machine
#   benchmarks/gpu_check.sh OUTDIR --dry-run  # anywhere: tiny shapes on CPU, tests only collected
#
# Writes into OUTDIR: one JSON file per benchmark, junit XML per test stage, gpu_check.log (all
# output), stages.tsv (stage, exit code, seconds); prints the short summary table last
# (python -m benchmarks.summary OUTDIR).
#
# Time: each stage runs under `timeout` with a cap, and never past a global deadline
# (GPU_CHECK_DEADLINE_S, default 345 s); the benchmarks also stop starting new rows when their
# --budget-s is spent and write their JSON after every row, so a stage cut short keeps what it
# measured. Stages run in priority order; the kernel test suite comes last and gets the time left.
#
# Python: $PYTHON, else the repository's .venv, else python3. The repository root goes on
# PYTHONPATH (minivlm need not be installed). GPU_CHECK_STAGES=name,name runs only those stages
# (tests_core attention train_step decode memory norm_rope tests_kernels).
set -uo pipefail

usage() { echo "usage: $0 OUTDIR [--dry-run]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
OUT=$1
DRY_RUN=0
if [[ $# -eq 2 ]]; then
    [[ $2 == --dry-run ]] || usage
    DRY_RUN=1
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
STAGES=$OUT/stages.tsv
: >"$LOG"
printf 'stage\texit\tseconds\n' >"$STAGES"

export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
cd "$REPO" || exit 2

START=$(date +%s)
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-345}

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# stage NAME CAP_SECONDS COMMAND...: run under a timeout of min(cap, time to the deadline).
stage() {
    local name=$1 cap=$2
    shift 2
    if [[ -n ${GPU_CHECK_STAGES:-} && ",$GPU_CHECK_STAGES," != *",$name,"* ]]; then
        return
    fi
    local left=$(( DEADLINE_S - ($(date +%s) - START) ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 10 )); then
        log "$name: skipped, ${left}s left before the deadline"
        printf '%s\tskipped\t0\n' "$name" >>"$STAGES"
        return
    fi
    log "$name: start (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - t0 ))
    (( rc == 124 || rc == 137 )) && log "$name: stopped at its ${limit}s limit"
    log "$name: exit $rc after ${took}s"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$took" >>"$STAGES"
}

if (( DRY_RUN )); then
    SIZE=(--small --device cpu --threads 1 --warmup 1 --reps 1)
    PYTEST_MODE=(--collect-only)
else
    SIZE=(--full)
    PYTEST_MODE=()
fi

log "repo $REPO, python $PYTHON, out $OUT, dry run $DRY_RUN"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
fi
"$PYTHON" - "$DRY_RUN" <<'EOF' 2>&1 | tee -a "$LOG"
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
sys.exit(0 if torch.cuda.is_available() or sys.argv[1] == "1" else 3)
EOF
if (( PIPESTATUS[0] != 0 )); then
    log "no CUDA device (or no torch): run with --dry-run on a machine without a GPU"
    exit 3
fi

PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider "${PYTEST_MODE[@]}")
stage tests_core 50 "${PYTEST[@]}" --junitxml="$OUT/tests_core.xml" \
    tests/kernels/test_no_math_fallback.py tests/kernels/test_fused_ce.py
stage attention 50 "$PYTHON" -m benchmarks.attention "${SIZE[@]}" --budget-s 32 --out "$OUT"
stage train_step 110 "$PYTHON" -m benchmarks.train_step "${SIZE[@]}" --budget-s 75 --out "$OUT"
stage decode 70 "$PYTHON" -m benchmarks.decode "${SIZE[@]}" --budget-s 40 --out "$OUT"
stage memory 25 "$PYTHON" -m benchmarks.memory "${SIZE[@]}" --out "$OUT"
stage norm_rope 30 "$PYTHON" -m benchmarks.norm_rope "${SIZE[@]}" --budget-s 18 --out "$OUT"
# The kernel suite (validated on a GPU when the kernels were written) gets the time left; run it
# alone with GPU_CHECK_STAGES=tests_kernels for a complete pass.
stage tests_kernels 300 "${PYTEST[@]}" --junitxml="$OUT/tests_kernels.xml" \
    tests/kernels/test_triton_attention.py tests/kernels/test_flex_attention.py tests/layers/test_attention.py

log "done in $(( $(date +%s) - START ))s"
"$PYTHON" -m benchmarks.summary "$OUT" 2>&1 | tee -a "$LOG" "$OUT/summary.txt"
