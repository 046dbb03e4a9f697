#!/usr/bin/env sh
# Create the project's virtual environment and install mm_jupyter with every extra.
# PyTorch: a CPU wheel offered locally (pip's find-links, e.g. /opt/wheels) is taken first; otherwise pip's own
# configuration decides (see below). Users elsewhere are not pinned: pyproject.toml only asks for torch>=2.4.
set -eu
VENV="${1:-.venv}"
# The browser test (tests/test_browser.py) drives Debian's Chromium through Playwright; Playwright's own
# browser download is not used. Installed when missing and apt-get can run (CI runs as root).
# The team-store tests and `bench modelsets --store postgresql+s3` start a throwaway PostgreSQL server
# (initdb + pg_ctl, mm_jupyter/store/testing.py) from Debian's packages, installed the same way.
CHROMIUM="${MM_JUPYTER_CHROMIUM:-/usr/bin/chromium}"
APT=""
if [ ! -x "$CHROMIUM" ]; then
    APT="chromium fonts-liberation fonts-dejavu-core"
fi
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    APT="$APT postgresql"
fi
if [ -n "$APT" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    # shellcheck disable=SC2086 # a list of package names
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $APT >/dev/null
fi
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
# PyTorch comes from wherever pip is configured to look (pip.conf, PIP_FIND_LINKS, PIP_EXTRA_INDEX_URL): this
# project names no package index. A locally offered wheel (pip's find-links) is taken first, without asking an
# index; elsewhere set PIP_EXTRA_INDEX_URL to PyTorch's CPU index before `make` (the README says how), or pip
# takes PyPI's default torch build, which on Linux is the multi-GB CUDA one.
if ! $VENV/bin/python -c "import torch" 2>/dev/null; then
    $PIP install --quiet --no-index --no-deps torch 2>/dev/null || $PIP install --quiet torch
fi
$PIP install --quiet -e ".[all]"
$VENV/bin/python -c "import torch, mm_jupyter; print('mm_jupyter', mm_jupyter.__version__, 'with torch', torch.__version__)"
