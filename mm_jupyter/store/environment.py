"""The software environment a set was saved (or trained) in, recorded as plain JSON."""
from __future__ import annotations

import platform
import sys
from typing import Any

import numpy


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions and platform that decide whether retraining is bit-exact."""
    import torch

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "device": device,
    }
