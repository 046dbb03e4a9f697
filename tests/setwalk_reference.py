"""The two walks a save made before ``SetWalk`` (verbatim from commit f94ed3a; the value comparisons
they used moved unchanged into statewalk and are imported from there):
``StatePlan`` (the state tensors, or None for ``state_dict()``) and ``SameArchitecture`` (the module
tree and attribute values against the first model). Kept here only as the oracle of
tests/test_store_setwalk.py, which proves the one walk gives the same verdicts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from mm_jupyter.errors import ArchitectureError, a_type
from mm_jupyter.store.statewalk import (
    _MISSING,
    _equal_simple,
    _paths,
    _same,
    internal_attributes,
    join_path,
    plain_class,
    simple_value as _simple,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

# -- checking that every model of a set has the recorded architecture ------------------------------------
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


@dataclass(frozen=True)
class _Node:
    parent: int
    name: str
    type: type
    params: tuple[str, ...]
    buffers: tuple[str, ...]
    children: tuple[str, ...]
    nonpersistent: frozenset[str]
    take: tuple[tuple[bool, str], ...]  # (is_param, name) of the entries state_dict keeps, in order
    empty: tuple[tuple[bool, str], ...]  # (is_param, name) of slots holding None (state_dict skips them)


def _hooked(mod: "nn.Module") -> bool:
    return bool(getattr(mod, "_state_dict_hooks", None) or getattr(mod, "_state_dict_pre_hooks", None))


class StatePlan:
    """The state-dict structure of one module, reusable for modules built the same way."""

    def __init__(self, nodes: list[_Node], keys: list[str]) -> None:
        self.nodes = nodes
        self.keys = keys
        self.expect: list[tuple[torch.dtype, torch.Size]] = []

    def expecting(self, expect: "list[tuple[torch.dtype, torch.Size]]") -> "StatePlan":
        """Dtype and shape every tensor must have (in key order), e.g. the first model's."""
        self.expect = expect
        return self

    @classmethod
    def of(cls, model: "nn.Module") -> "StatePlan | None":
        """A plan for ``model``, or None when its state dict needs the general path."""
        nodes: list[_Node] = []
        keys: list[str] = []

        def visit(mod: "nn.Module", parent: int, name: str, prefix: str) -> bool:
            if not plain_class(type(mod)) or _hooked(mod):
                return False
            nonpersistent = frozenset(mod._non_persistent_buffers_set)
            take = tuple(
                [(True, k) for k, v in mod._parameters.items() if v is not None]
                + [(False, k) for k, v in mod._buffers.items() if v is not None and k not in nonpersistent]
            )
            empty = tuple(
                [(True, k) for k, v in mod._parameters.items() if v is None]
                + [(False, k) for k, v in mod._buffers.items() if v is None]
            )
            keys.extend(prefix + k for _, k in take)
            nodes.append(_Node(parent, name, type(mod), tuple(mod._parameters), tuple(mod._buffers),
                               tuple(mod._modules), nonpersistent, take, empty))
            me = len(nodes) - 1
            for child_name, child in mod._modules.items():
                if child is None:
                    continue
                if not visit(child, me, child_name, prefix + child_name + "."):
                    return False
            return True

        return cls(nodes, keys) if visit(model, -1, "", "") else None

    def tensors(self, model: "nn.Module") -> "list[torch.Tensor] | None":
        """The model's state tensors in the plan's order, or None if it does not fit the plan.

        Counts are compared and every planned name is looked up, so the name sets are equal; an
        insertion-order difference is harmless because tensors are taken by name. Each tensor
        must also be a dense, contiguous CPU tensor of the first model's dtype and shape (what
        the byte copies rely on); anything else goes the general way.
        """
        out: list[torch.Tensor] = []
        mods: list[nn.Module] = []
        append = out.append
        expect = iter(self.expect)
        try:
            for node in self.nodes:
                mod = model if node.parent < 0 else mods[node.parent]._modules[node.name]
                if mod is None:  # a child slot set to None: state_dict skips it, the plan does not
                    return None
                params, buffers = mod._parameters, mod._buffers
                if (
                    type(mod) is not node.type
                    or len(params) != len(node.params)
                    or len(buffers) != len(node.buffers)
                    or len(mod._modules) != len(node.children)
                    or mod._state_dict_hooks
                    or mod._state_dict_pre_hooks
                    or (buffers and mod._non_persistent_buffers_set != node.nonpersistent)
                ):
                    return None
                mods.append(mod)
                for is_param, name in node.take:
                    t = params[name] if is_param else buffers[name]
                    dtype, shape = next(expect)
                    if (t is None or t.dtype is not dtype or t.shape != shape or not t.is_cpu
                            or not t.is_contiguous() or t.is_neg() or t.is_conj()):
                        return None
                    append(t)
                for is_param, name in node.empty:
                    if (params[name] if is_param else buffers[name]) is not None:
                        return None
        except (KeyError, AttributeError, RuntimeError):  # RuntimeError: is_contiguous of sparse
            return None
        return out
