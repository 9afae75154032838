#!/usr/bin/env bash
# The one script to run on a CUDA machine. Steps, most valuable first: install (editable, with the machine's own
# torch, triton and setuptools: nothing is fetched; the C++ extension, which serves CPU tensors only, is not built),
# environment, the CLI benchmark of the main shapes, the GPU tests, the Triton roofline, and the Triton tests compiled
# (no interpreter). Results go to $OUT alone (default: gpu_out; a relative path is taken from the caller's directory).
# Where torch sees no CUDA device it stops before the first step (exit status 2).
#
# Every step runs even if an earlier one fails, under its own time limit and within the run's total,
# GPU_RUN_BUDGET_S seconds (default 480): a step still running at its limit is interrupted (SIGINT, so that pytest
# reports where it was; SIGKILL 15 s later), and one that no longer fits in what is left (GPU_RUN_MIN_STEP_S,
# default 20) is skipped. The exit status is the first failure's; a stopped or skipped step counts as one (124).
set -u
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
export OUT
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_RUN_BUDGET_S:-480}"
MIN_STEP_S="${GPU_RUN_MIN_STEP_S:-20}"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1  # a step stopped at its limit keeps what it printed
export PROTONORM_NO_EXTENSION=1
LOG="$OUT/steps.log"
# The date the figures are from (the GPU's name and the versions are printed by the steps).
echo "=== $(date -u '+%Y-%m-%d %H:%M:%S UTC')" | tee "$LOG"
status=0
started=$SECONDS

fail() {
    if [ "$status" -eq 0 ]; then status=$1; fi
}

# step LIMIT_S COMMAND...: run COMMAND for at most LIMIT_S seconds (less where less of the budget is left).
step() {
    local limit=$1 left=$((BUDGET_S - (SECONDS - started)))
    shift
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt "$MIN_STEP_S" ]; then
        echo "=== skipped, ${left}s of the ${BUDGET_S}s budget left: $*" | tee -a "$LOG"
        fail 124
        return
    fi
    echo "=== [at most ${limit}s] $*" | tee -a "$LOG"
    local t0=$SECONDS
    # tee has its own limit: a process the step left behind could hold the pipe open after the step ended.
    timeout -s INT -k 15 "$limit" "$@" 2>&1 | timeout -k 5 $((limit + 30)) tee -a "$LOG"
    local rc=${PIPESTATUS[0]} note=""
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note=" (stopped at its ${limit}s limit)"; fi
    echo "=== rc=$rc after $((SECONDS - t0))s$note" | tee -a "$LOG"
    if [ "$rc" -ne 0 ]; then fail "$rc"; fi
}

# Without a CUDA device every step fails, or runs for minutes in Triton's CPU interpreter (the Triton tests): stop.
if ! timeout -k 5 120 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1; then
    echo "=== no CUDA device: torch.cuda.is_available() is not True for $PY; nothing was run" | tee -a "$LOG"
    exit 2
fi

# protonorm.kernels exists only once installed (setup.py maps kernels/ to it). Should the install fail, the tree
# itself is put on the path with kernels/ linked in, so that the steps after it still measure something.
step 120 "$PY" -m pip install --no-build-isolation --no-deps --no-index -q -e .
if ! (cd / && timeout -k 5 60 "$PY" -c "import protonorm.kernels") >/dev/null 2>&1; then
    echo "=== protonorm.kernels not importable after the install: running from the tree" | tee -a "$LOG"
    [ -e protonorm/kernels ] || ln -s ../kernels protonorm/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
step 30 nvidia-smi
step 60 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
step 150 "$PY" -m protonorm.cli bench --device cuda --no-progress --json "$OUT/bench.json"
# faulthandler_timeout: a test running past it has every thread's stack printed (and runs on).
PYTEST=("$PY" -m pytest -q -ra --durations=15 -p no:cacheprovider -o faulthandler_timeout=90)
step 180 "${PYTEST[@]}" tests -m gpu --continue-on-collection-errors
step 150 "$PY" bench/triton_roofline.py --json "$OUT/triton_roofline.json"
# About 400 kernel variants to compile: spread over workers where pytest-xdist is installed.
XDIST=()
if timeout -k 5 30 "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST=(-n 4); fi
step 180 "${PYTEST[@]}" ${XDIST[@]+"${XDIST[@]}"} --maxfail=20 tests/test_triton.py
echo "=== done in $((SECONDS - started))s, exit status $status" | tee -a "$LOG"
exit $status
