"""Shared fixtures (generic: other suites add theirs here)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # helper modules (e.g. store_models) import as top-level modules
    sys.path.insert(0, str(TESTS))


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """A not-yet-created store folder inside the test's tmp_path."""
    return tmp_path / "store"


@pytest.fixture
def store(store_path: Path):
    """A fresh, empty store (closed after the test)."""
    import mm_jupyter as mm

    s = mm.Store(store_path)
    yield s
    s.close()
