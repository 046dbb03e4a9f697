"""Root pytest configuration, for the unit tests and the notebooks alike."""
from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist every worker (and the kernels and interpreters it starts) gets one
    intra-op thread: two workers on two cores, not four spinning OpenMP threads fighting for them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
