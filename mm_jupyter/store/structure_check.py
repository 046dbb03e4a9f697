"""Checking that every model of a set has the architecture recorded for the set."""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from ..errors import ArchitectureError, a_type

if TYPE_CHECKING:
    from torch import nn


from .structure import FUNCTION_TYPES, hf_config_types, internal_attributes, join_path


# -- checking that every model of a set has the recorded architecture ------------------------------------
def _simple(v: Any) -> bool:
    if v is None or type(v) in (bool, int, float, str):
        return True
    if type(v) in (tuple, list):
        return all(_simple(x) for x in v)
    return False


@dataclass
class _Check:
    names: tuple[str, ...]  # child names from the root
    path: str
    type: type
    children: tuple[str, ...]
    simple: dict[str, Any]  # attributes compared with ==
    other: dict[str, Any]  # attributes compared structurally
    keys: frozenset[str]


class SameArchitecture:
    """Checks that a model has the same module tree and attribute values as the first model (the one
    the record was made from); a set is stored with one record, so a difference would be lost."""

    def __init__(self, first: "nn.Module", first_name: str) -> None:
        self.first = first
        self.first_name = first_name
        self.nodes: list[_Check] = []
        self._paths0: dict[int, str] | None = None
        internal = internal_attributes()
        seen: set[int] = set()

        def visit(mod: "nn.Module", names: tuple[str, ...]) -> None:
            if id(mod) in seen:
                return
            seen.add(id(mod))
            attrs = {k: v for k, v in mod.__dict__.items() if k not in internal}
            simple = {k: v for k, v in attrs.items() if _simple(v)}
            other = {k: v for k, v in attrs.items() if k not in simple}
            self.nodes.append(_Check(names, ".".join(names), type(mod), tuple(mod._modules), simple, other,
                                     frozenset(attrs)))
            for name, child in mod._modules.items():
                if child is not None:
                    visit(child, names + (name,))

        visit(first, ())

    def check(self, model: "nn.Module", name: str) -> None:
        internal = internal_attributes()
        paths: dict[int, str] | None = None
        for node in self.nodes:
            mod = model
            for part in node.names:
                child = mod._modules.get(part)
                if child is None:
                    self._fail(name, f"has no module {node.path}")
                mod = child
            where = node.path or "(root)"
            if type(mod) is not node.type:
                self._fail(name, f"module {where} is {a_type(mod)}, not a {node.type.__name__}")
            if tuple(mod._modules) != node.children:
                self._fail(name, f"module {where} has children {list(mod._modules)}, not {list(node.children)}")
            d = mod.__dict__
            keys = d.keys() - internal
            if keys != node.keys:
                extra, missing = sorted(keys - node.keys), sorted(node.keys - keys)
                self._fail(name, f"module {where} has attributes {extra or missing} that model "
                                 f"{self.first_name!r} {'lacks' if extra else 'has'}")
            for k, v0 in node.simple.items():
                v = d.get(k, _MISSING)
                if v is not v0 and (type(v) is not type(v0) or not _equal_simple(v, v0)):
                    self._fail(name, f"attribute {join_path(node.path, k)} is {v!r}, "
                                     f"model {self.first_name!r} has {v0!r}")
            for k, v0 in node.other.items():
                if paths is None:
                    paths = _paths(model)
                if self._paths0 is None:
                    self._paths0 = _paths(self.first)
                if not _same(d.get(k, _MISSING), v0, paths, self._paths0):
                    self._fail(name, f"attribute {join_path(node.path, k)} differs")

    def _fail(self, name: str, what: str) -> NoReturn:
        raise ArchitectureError(
            f"all models of a set must share one architecture: model {name!r} {what} (compared with model "
            f"{self.first_name!r}); save them as separate sets")


_MISSING = object()


def _equal_simple(a: Any, b: Any) -> bool:
    if type(a) is float:
        return a == b or (math.isnan(a) and math.isnan(b))
    if type(a) in (tuple, list):
        return len(a) == len(b) and all(type(x) is type(y) and _equal_simple(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _paths(model: "nn.Module") -> dict[int, str]:
    out: dict[int, str] = {}
    for mname, mod in model.named_modules(remove_duplicate=True):
        out.setdefault(id(mod), "m:" + mname)
        for k, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None:
                out.setdefault(id(t), "t:" + join_path(mname, k))
    return out


def _same(a: Any, b: Any, pa: dict[int, str], pb: dict[int, str]) -> bool:
    import torch

    if a is _MISSING or type(a) is not type(b):
        return False
    if type(a) is weakref.ReferenceType:
        x, y = a(), b()
        return (x is None and y is None) or (x is not None and y is not None and _same(x, y, pa, pb))
    if isinstance(a, (torch.Tensor, torch.nn.Module)):
        if id(a) in pa or id(b) in pb:
            return pa.get(id(a)) == pb.get(id(b))
        # a plain tensor is stored per model (like a buffer): the set shares its place, dtype and shape
        return isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, pa, pb) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k], pa, pb) for k in a)
    if isinstance(a, (set, frozenset)) or _simple(a) or isinstance(a, (torch.dtype, torch.device)):
        return bool(a == b)
    if isinstance(a, (type, *FUNCTION_TYPES)):
        return a is b
    configs = hf_config_types()
    if configs and isinstance(a, configs):
        return a is b or a.to_dict() == b.to_dict()
    return a is b
