#!/usr/bin/env bash
# The one script to run on a CUDA machine: install (editable, with the machine's own torch, triton, setuptools and
# pybind11: nothing is fetched), environment, the GPU tests, the Triton tests compiled (no interpreter), the CLI
# benchmark and the Triton roofline. Results go to $OUT (default: ./gpu_out). Every step runs even if an earlier
# one fails; the exit status is the first failure's.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
export OUT
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET
status=0
step() {
    echo "=== $*" | tee -a "$OUT/steps.log"
    "$@" 2>&1 | tee -a "$OUT/steps.log"
    local rc=${PIPESTATUS[0]}
    echo "=== rc=$rc" | tee -a "$OUT/steps.log"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

# protonorm.kernels exists only once installed (setup.py maps kernels/ to it), and the C++ extension is built for
# this machine's Python.
step "$PY" -m pip install --no-build-isolation --no-deps --no-index -q -e .
step nvidia-smi
step "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
step "$PY" -m pytest tests -m gpu -q -ra --durations=10 -p no:cacheprovider
step "$PY" -m pytest tests/test_triton.py -q -ra --durations=10 -p no:cacheprovider
step "$PY" -m protonorm.cli bench --device cuda --json "$OUT/bench.json"
step "$PY" bench/triton_roofline.py --json "$OUT/triton_roofline.json"
exit $status
