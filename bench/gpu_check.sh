#!/usr/bin/env bash
# The GPU check of issue 11 in one command (at most 8 minutes on one H200/H100):
#
#     bash bench/gpu_check.sh                     # writes bench/results/gpu_<card>.{json,md}
#     bash bench/gpu_check.sh --only syncdebug,match    # extra arguments go to bench/gpu_check.py
#
# Records nvidia-smi, builds the C++/CUDA extension when it does not import (no network: the
# installed torch/triton are used, pip never resolves dependencies), prints
# `python -m layerpar_fast.info`, then runs bench/gpu_check.py (each section in its own process,
# with its own time limit; results rewritten after every section). The whole run is wrapped in
# `timeout 480`.
set -euo pipefail

if [[ -z "${GPU_CHECK_INNER:-}" ]]; then
    export GPU_CHECK_INNER=1
    rc=0
    timeout -k 15 480 bash "${BASH_SOURCE[0]}" "$@" || rc=$?
    [[ $rc -eq 124 ]] && echo "gpu_check.sh: stopped by the 480 s timeout (finished sections are written)"
    exit $rc
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CUDA_MODULE_LOADING=EAGER PYTHONUNBUFFERED=1
unset LAYERPAR_DEBUG_SYNC
PY=${PYTHON:-python}
mkdir -p bench/results
echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') $(hostname) in $(pwd)"

echo "== nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "(nvidia-smi failed)"
else
    echo "(nvidia-smi not found)"
fi

echo "== extension"
if "$PY" -c "import layerpar_fast._C" 2>/dev/null; then
    echo "layerpar_fast._C imports"
else
    echo "layerpar_fast._C does not import: building it against the installed torch (no dependencies)"
    t0=$SECONDS
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
        || "$PY" setup.py build_ext --inplace \
        || echo "(the build failed: the fused ops run on their fallbacks; see above)"
    echo "build: $((SECONDS - t0)) s"
fi

echo "== python -m layerpar_fast.info"
"$PY" -m layerpar_fast.info || echo "(layerpar_fast.info failed)"

slug=$("$PY" bench/gpu_check.py --print-slug 2>/dev/null | tail -n 1) || slug=""
[[ -n "$slug" ]] || slug=unknown
budget=$((465 - SECONDS))
echo "== bench/gpu_check.py -> bench/results/gpu_${slug}.{json,md} (budget ${budget} s)"
exec "$PY" bench/gpu_check.py --budget-s "$budget" \
    --out "bench/results/gpu_${slug}.json" --md "bench/results/gpu_${slug}.md" "$@"
