#!/usr/bin/env bash
# GPU bench (issue 17): PokeBNN-1x on CUDA against onnxruntime's logits and torch fp16, and the
# 1-bit tensor-core peak; prints one table.
#
#   bench/gpu.sh            prepare + run, on a GPU machine with bnncc installed
#   bench/gpu.sh prepare    build and stage into $STAGE (default .gpu/): needs bnncc, TVM, nvcc; no GPU
#                           (add --portable to stage TVM's runtime and the tvm-ffi wheel for Python 3.12)
#   bench/gpu.sh run        on the GPU: needs python3 with torch, torchvision, numpy; tvm_ffi and TVM's
#                           runtime come from the stage when they are not installed
#
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${STAGE:-.gpu}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
step=${1:-all}
[[ $# -gt 0 ]] && shift

prepare() {
    "$PYTHON" bench/gpu_prepare.py --stage "$STAGE" "$@"
}

run() {
    if [[ -d $STAGE/runtime ]] && ! "$PYTHON" -c 'import tvm' 2>/dev/null; then
        # no TVM here: the staged runtime libraries, and the staged tvm-ffi if none is installed
        BNNCC_TVM_RUNTIME=$(cd "$STAGE/runtime" && pwd)
        export BNNCC_TVM_RUNTIME
        if ! "$PYTHON" -c 'import tvm_ffi' 2>/dev/null; then
            site=$(mktemp -d)
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$STAGE"/runtime/*.whl
            export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
        fi
    fi
    PYTHONUNBUFFERED=1 "$PYTHON" bench/gpu_run.py --stage "$STAGE" "$@"
}

case $step in
    prepare) prepare "$@" ;;
    run) run "$@" ;;
    all) prepare "$@" && run ;;
    *) echo "usage: bench/gpu.sh [prepare [--portable] | run | all]" >&2; exit 2 ;;
esac
