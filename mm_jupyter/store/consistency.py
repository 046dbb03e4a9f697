"""Attributes a module allocates from must match the tensors a record gave it.

A structural record restores attributes and tensors separately, without running the constructor
that made them agree. Most modules read their sizes from their tensors; an RNN does not: its forward
allocates the initial state from ``hidden_size`` and ``num_layers`` before it checks its weights, so a
record with ``hidden_size = 2**31`` would make the first call allocate gigabytes. For the exact
classes below the sizes are checked against the tensors when the model is built (an allow-list of
exact classes, as the trust gate's: a subclass may lay its tensors out differently).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ..errors import ArchitectureError

if TYPE_CHECKING:
    from torch import nn

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _rnn_problem(mod: "nn.Module") -> str | None:
    """Why an ``nn.RNN``/``nn.LSTM``/``nn.GRU``'s size attributes are not the ones its weights were made
    with (None: they are)."""
    from torch import nn

    sizes: dict[str, Any] = {k: getattr(mod, k, None) for k in ("input_size", "hidden_size", "num_layers", "proj_size")}
    if any(type(v) is not int or v < 0 for v in sizes.values()):
        return f"sizes {sizes} are not non-negative ints"
    bias, bidirectional = getattr(mod, "bias", None), getattr(mod, "bidirectional", None)
    mode = getattr(mod, "mode", "")
    if type(bias) is not bool or type(bidirectional) is not bool:
        return "bias and bidirectional must be booleans"
    want_modes = {nn.LSTM: ("LSTM",), nn.GRU: ("GRU",), nn.RNN: ("RNN_TANH", "RNN_RELU")}[type(mod)]
    if mode not in want_modes:
        return f"mode {str(mode)[:20]!r} is not {type(mod).__name__}'s"
    inputs, hidden, proj, layers = (int(sizes[k]) for k in ("input_size", "hidden_size", "proj_size", "num_layers"))
    if proj and (type(mod) is not nn.LSTM or proj >= hidden):
        return f"proj_size {proj} is not allowed here"
    directions = 2 if bidirectional else 1
    per = 2 + 2 * bias + (1 if proj else 0)
    names = list(getattr(mod, "_flat_weights_names", []))
    if layers < 1 or len(names) != layers * directions * per:
        return f"num_layers {layers} does not match its {len(names)} weights"
    gate = _GATES[str(mode)] * hidden
    real = proj or hidden
    for layer in range(layers):  # bounded by the weights counted above
        for d in range(directions):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            want: dict[str, tuple[int, ...]] = {
                f"weight_ih{sfx}": (gate, inputs if layer == 0 else real * directions),
                f"weight_hh{sfx}": (gate, real)}
            if bias:
                want[f"bias_ih{sfx}"] = want[f"bias_hh{sfx}"] = (gate,)
            if proj:
                want[f"weight_hr{sfx}"] = (proj, hidden)
            for key, shape in want.items():
                p = mod._parameters.get(key)
                if p is None or tuple(p.shape) != shape:
                    got = None if p is None else tuple(p.shape)
                    return f"{key} has shape {got}, its attributes say {shape}"
    return None


def _checks() -> dict[type, Callable[["nn.Module"], str | None]]:
    from torch import nn

    return {nn.RNN: _rnn_problem, nn.LSTM: _rnn_problem, nn.GRU: _rnn_problem}


def check_consistent(root: "nn.Module") -> None:
    """ArchitectureError naming the first module of ``root`` whose size attributes disagree with its
    tensors (classes with a check only; see the module docstring)."""
    checks = _checks()
    for path, mod in root.named_modules():
        check = checks.get(type(mod))
        problem = check(mod) if check is not None else None
        if problem is not None:
            raise ArchitectureError(f"module {path or '(root)'} ({type(mod).__name__}): {problem}; the record's "
                                    "attributes are not the ones its tensors were made with")
