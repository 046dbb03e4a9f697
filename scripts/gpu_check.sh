#!/usr/bin/env bash
# The GPU path, proven in one short run (at most 8 minutes) on a machine that has nothing but Python, a CUDA
# GPU and this repository - and no internet:
#
#   scripts/gpu_check.sh [--device cuda|cuda:N|cpu] [--dry-run] [--wheels DIR] [--out DIR] [--tests-k EXPR]
#
# 1. Dependencies. If the Python given ($PYTHON, else python3) already imports torch and the check's other
#    packages, it is used as it is. Otherwise a virtual environment ($MM_JUPYTER_GPU_VENV, default .gpu-venv)
#    is made and filled from a folder of wheels (--wheels DIR, default ./wheels): pip install --no-index
#    --find-links DIR, so nothing is fetched from the network (a Python without pip in its venvs is
#    bootstrapped from the folder's pip wheel). Build that folder on a machine with internet and the same OS,
#    Python version and architecture (pip's own configuration picks the index: set PIP_EXTRA_INDEX_URL for a
#    CUDA build of torch):
#        python -m mm_jupyter.bench gpu --requirements > gpu-requirements.txt
#        pip download --dest wheels pip -r gpu-requirements.txt
#    and carry it beside the repository ($MM_JUPYTER_GPU_REQUIREMENTS names another requirements file, e.g.
#    pinned versions). mm_jupyter itself is pure Python and runs from this checkout.
# 2. python -m mm_jupyter.bench gpu: tests/test_gpu.py on the device (rankings, features against the CPU's,
#    live halving progress while the device scores, cache budgets, synchronised timings), Sec. 4.1's
#    transfer-vs-recompute measurement, and Fig. 10 (ResNet-18, top-layers, 35 candidates, 2,000 items,
#    224 px; base, shift and alsatian). Results: OUT/gpu_check.json and OUT/search-*.json, which
#    `python -m mm_jupyter.bench report` reads.
#
# --dry-run installs nothing (it prints the install it would do) and runs every step at a tiny size;
# `--device cpu --dry-run` is how the tests run this script on a machine without a GPU.
set -euo pipefail

DEVICE=cuda
DRY=0
WHEELS=${MM_JUPYTER_WHEELS:-wheels}
OUT=bench_results/gpu
TESTS_K=
PY=${PYTHON:-python3}
LIMIT=${MM_JUPYTER_GPU_CHECK_LIMIT:-420}  # seconds for the check itself; the install gets the rest of 8 minutes

while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --tests-k) TESTS_K=$2; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
case "$WHEELS" in /*) ;; *) WHEELS="$PWD/$WHEELS" ;; esac
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

if ! command -v "$PY" >/dev/null; then
  echo "error: no Python ($PY); set PYTHON=/path/to/python" >&2
  exit 2
fi
echo "gpu_check: device $DEVICE, $($PY --version 2>&1), repository $ROOT$([ $DRY = 1 ] && echo ', DRY RUN')"

VENV=${MM_JUPYTER_GPU_VENV:-$ROOT/.gpu-venv}
REQ=$(mktemp)
trap 'rm -f "$REQ"' EXIT
if [ -n "${MM_JUPYTER_GPU_REQUIREMENTS:-}" ]; then
  cp "$MM_JUPYTER_GPU_REQUIREMENTS" "$REQ"
else  # read from pyproject.toml by the package's own code, which needs nothing but Python here
  "$PY" -c 'from mm_jupyter.bench.gpu import requirements; print("\n".join(requirements()))' > "$REQ"
fi

present() {  # does this Python have everything the check needs? (found, not imported: torch alone takes seconds)
  "$1" - <<'EOF' 2>/dev/null
import importlib.util, sys
names = ("torch", "numpy", "pandas", "safetensors", "xxhash", "transformers", "pytest", "IPython", "ipywidgets", "plotly")
sys.exit(0 if all(importlib.util.find_spec(name) is not None for name in names) else 1)
EOF
}

if present "$PY"; then
  echo "dependencies: present in $PY"
  [ $DRY = 1 ] && echo "(a machine without them would run: $PY -m venv $VENV && $VENV/bin/python -m pip install --no-index --find-links $WHEELS -r <requirements: $(tr '\n' ' ' < "$REQ")>)"
elif [ $DRY = 1 ]; then
  echo "would run: $PY -m venv $VENV && $VENV/bin/python -m pip install --no-index --find-links $WHEELS -r <$(tr '\n' ' ' < "$REQ")>"
  echo "error: a dry run needs the dependencies present" >&2
  exit 2
else
  if [ ! -d "$WHEELS" ]; then
    echo "error: the dependencies are missing and there is no wheel folder $WHEELS (no internet here)." >&2
    echo "  Build one where there is internet (same OS, Python and architecture) and carry it here:" >&2
    echo "    python -m mm_jupyter.bench gpu --requirements > gpu-requirements.txt" >&2
    echo "    pip download --dest wheels pip -r gpu-requirements.txt   # PIP_EXTRA_INDEX_URL for CUDA torch" >&2
    exit 2
  fi
  echo "installing from $WHEELS (no index) into $VENV"
  "$PY" -m venv "$VENV" 2>/dev/null || "$PY" -m venv --without-pip "$VENV"
  if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then  # no ensurepip: pip from its own wheel
    PIP_WHEEL=$(ls "$WHEELS"/pip-*.whl 2>/dev/null | head -1)
    [ -n "$PIP_WHEEL" ] || { echo "error: $VENV has no pip and $WHEELS holds no pip wheel" >&2; exit 2; }
    "$VENV/bin/python" "$PIP_WHEEL/pip" install --quiet --no-index --find-links "$WHEELS" pip
  fi
  "$VENV/bin/python" -m pip install --quiet --no-index --find-links "$WHEELS" -r "$REQ"
  PY=$VENV/bin/python
  if ! present "$PY"; then
    echo "error: installed from $WHEELS, but $PY still misses a package the check needs" >&2
    exit 2
  fi
fi
echo "install step: $(( $(date +%s) - START )) s"

ARGS=(--device "$DEVICE" --out "$OUT")
[ $DRY = 1 ] && ARGS+=(--dry-run)
[ -n "$TESTS_K" ] && ARGS+=(--tests-k "$TESTS_K")
set +e
timeout "$LIMIT" "$PY" -m mm_jupyter.bench gpu "${ARGS[@]}"
RC=$?
set -e
[ $RC = 124 ] && echo "error: the check ran past its ${LIMIT} s" >&2
echo "gpu_check: rc $RC in $(( $(date +%s) - START )) s; results in $OUT"
exit $RC
