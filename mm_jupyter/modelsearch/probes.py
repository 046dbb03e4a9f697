"""What a split check compares, shared by the verifier (``verify.py``) and the Hugging Face rule (``hf.py``).

A leaf of the search package: the tolerance of "the same features" (see ``verify.py``), how a call's
hidden-state argument and a module's first output tensor are found, and the error for a probe the
model itself cannot run.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: relative tolerance per dtype (``verify.py``'s docstring states the rule)
RTOL = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def first_tensor(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    if hasattr(out, "to_tuple"):
        return first_tensor(out.to_tuple())
    return None


def hidden_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """The hidden-state argument of a call: the first positional one, else ``hidden_states``."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, Tensor) else None


def differs(ours: Tensor, ref: Tensor) -> str | None:
    """None when ``ours`` equals ``ref`` within the tolerance (module docstring), else why not."""
    if tuple(ours.shape) != tuple(ref.shape):
        return f"shape {tuple(ours.shape)} where the model has {tuple(ref.shape)}"
    if not ref.is_floating_point():
        return None if torch.equal(ours, ref) else "different values"
    a, b = ours.detach().double(), ref.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        same = torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num())
        return None if same else "non-finite values that differ"
    rtol = RTOL.get(ref.dtype, 1e-4)
    atol = rtol / 10 * max(1.0, float(b.abs().max()) if b.numel() else 1.0)
    gap = (a - b).abs()
    if bool((gap <= rtol * b.abs() + atol).all()):
        return None
    return f"max difference {float(gap.max()):.3g} (tolerance {rtol:g} relative, {atol:.2g} absolute)"


__all__ = ["RTOL", "differs", "first_tensor", "hidden_argument"]
