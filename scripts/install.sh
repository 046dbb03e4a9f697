#!/usr/bin/env sh
# Create the project's virtual environment and install mm_jupyter with every extra.
# PyTorch: a CPU wheel offered locally (pip's find-links, e.g. /opt/wheels) is taken first;
# otherwise torch comes from PyTorch's CPU index, so no multi-GB CUDA build is pulled in.
# Users elsewhere are not pinned: pyproject.toml only asks for torch>=2.1.
set -eu
VENV="${1:-.venv}"
# The browser test (tests/test_browser.py) drives Debian's Chromium through Playwright; Playwright's own
# browser download is not used. Installed when missing and apt-get can run (CI runs as root).
CHROMIUM="${MM_JUPYTER_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-liberation fonts-dejavu-core >/dev/null
fi
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
if ! $VENV/bin/python -c "import torch" 2>/dev/null; then
    if ! $PIP install --quiet --no-index --no-deps torch 2>/dev/null; then
        $PIP install --quiet torch --index-url https://download.pytorch.org/whl/cpu \
            --extra-index-url https://pypi.org/simple
    fi
fi
$PIP install --quiet -e ".[all]"
$VENV/bin/python -c "import torch, mm_jupyter; print('mm_jupyter', mm_jupyter.__version__, 'with torch', torch.__version__)"
