"""Read the state of thousands of same-structure modules without ``state_dict()``'s overhead.

``nn.Module.state_dict()`` costs ~40 µs for a small MLP (recursion, prefixes, hooks, detach), which
for 5,000 models is more than writing their parameters. The first model's structure is recorded
as a plan (pre-order modules, their parameter/buffer/child names); every further model is checked
against the plan node by node — same classes, same names in the same order, same ``None`` slots,
no state-dict hooks — and its tensors are taken straight from ``_parameters``/``_buffers``.
Anything unusual (hooks, ``get_extra_state``, overridden ``state_dict``) makes the plan refuse and
the caller falls back to ``state_dict()``; the result is always what ``state_dict()`` returns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


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


def plain_class(klass: type[nn.Module]) -> bool:
    from torch import nn

    return (
        klass.state_dict is nn.Module.state_dict
        and klass._save_to_state_dict is nn.Module._save_to_state_dict
        and getattr(klass, "get_extra_state", nn.Module.get_extra_state) is nn.Module.get_extra_state
    )


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
