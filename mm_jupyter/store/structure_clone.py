"""Fast materialisation: cloning a rebuilt template per model instead of rebuilding each one."""
from __future__ import annotations

import copy
import enum
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import StoreError

if TYPE_CHECKING:
    import torch
    from torch import nn


from .statewalk import FUNCTION_TYPES, hooks_of, internal_attributes, join_path, plain_class
from .structure import (
    attribute_states,
    fresh_bookkeeping,
    fresh_containers,
    is_attribute_state,
    module_state,
)

#: frozen record types a clone may share between models (``architectures.py`` adds ``Architecture``;
#: kept here as a set so this module need not import the one that imports it)
FROZEN_RECORDS: set[type] = set()


# -- fast materialisation -----------------------------------------------------------------------------------
@dataclass
class _Node:
    cls: type[nn.Module]
    shared: dict[str, Any]  # immutable attribute values, shared by every copy
    deep: list[tuple[str, Any]]  # mutable attribute values, deep-copied per copy
    param_names: tuple[str, ...]
    param_slots: tuple[int, ...]  # slot index of each parameter (-1: empty slot)
    buffer_names: tuple[str, ...]
    buffer_slots: tuple[int, ...]
    child_names: tuple[str, ...]
    child_nodes: tuple[int, ...]  # node index of each child (-1: empty)
    nonpersistent: frozenset[str]
    pc: type
    bc: type
    mc: type
    hook_names: tuple[str, ...]  # hook registries: a new empty one per copy
    hook_types: tuple[type, ...]


def _immutable(v: Any) -> bool:
    import torch

    if v is None or type(v) in (bool, int, float, str, bytes, torch.Size) or type(v) in FROZEN_RECORDS:
        return True  # e.g. an Architecture (a factory's tag): a frozen record nobody mutates
    if isinstance(v, (torch.dtype, torch.device, type, enum.Enum, *FUNCTION_TYPES)):
        return True
    if type(v) in (tuple, frozenset):
        return all(_immutable(x) for x in v)
    return False


class Cloner:
    """Makes copies of a template module whose state tensors come from the store.

    ``copy.deepcopy`` of a template followed by ``load_state_dict`` copies every tensor twice and
    walks Python's generic copy machinery for every object; this plan is compiled once per set and
    creates each module object directly, so materialising thousands of models costs about what
    constructing them would (see ``python -m mm_jupyter.bench materialize``).
    """

    def __init__(self, nodes: list[_Node], slots: list[tuple["torch.Tensor", int, bool, bool, bool]],
                 originals: list[int]) -> None:
        import torch
        from torch import nn

        self.parameter = nn.Parameter
        self.subclass = torch.Tensor._make_subclass  # what nn.Parameter(plain tensor, grad) calls
        self.nodes = nodes
        self.classes = [n.cls for n in nodes]
        self.slots = slots  # (template tensor, state index or -1, is parameter, requires_grad, contiguous)
        self.originals = originals  # id() of the template module of each node (for the deepcopy memo)
        self.deep = any(n.deep for n in nodes)

    @classmethod
    def of(cls, template: "nn.Module", keys: Sequence[str]) -> "Cloner | None":
        """A plan for ``template`` whose state-dict keys are ``keys``; None when the module has
        anything the plan does not reproduce (hooks, slots, custom state-dict logic)."""

        index = {k: i for i, k in enumerate(keys)}
        nodes: list[_Node | None] = []
        slots: list[tuple[Any, int, bool, bool, bool]] = []
        slot_of: dict[int, int] = {}
        node_of: dict[int, int] = {}
        internal = internal_attributes()
        covered: set[str] = set()

        def tensor_slot(t: Any, key: str, is_param: bool, persistent: bool) -> int:
            if id(t) in slot_of:
                covered.add(key)
                return slot_of[id(t)]
            k = index.get(key, -1) if persistent else -1
            if persistent:
                if k < 0:
                    raise LookupError(key)
                covered.add(key)
            slot_of[id(t)] = len(slots)
            slots.append((t, k, is_param, bool(getattr(t, "requires_grad", False)), bool(t.is_contiguous())))
            return slot_of[id(t)]

        def visit(mod: nn.Module, path: str) -> int:
            klass = type(mod)
            if not plain_class(klass) or hooks_of(mod) or not hasattr(mod, "__dict__") or "__slots__" in vars(klass):
                raise LookupError(path)
            node_of[id(mod)] = len(nodes)
            me = len(nodes)
            nodes.append(None)  # its place in pre-order; filled below
            np_set = frozenset(mod._non_persistent_buffers_set)
            params = [(n, -1 if p is None else tensor_slot(p, join_path(path, n), True, True))
                      for n, p in mod._parameters.items()]
            buffers = [(n, -1 if b is None else tensor_slot(b, join_path(path, n), False, n not in np_set))
                       for n, b in mod._buffers.items()]
            children: list[tuple[str, int]] = []
            for n, c in mod._modules.items():
                if c is None:
                    children.append((n, -1))
                elif id(c) in node_of:
                    children.append((n, node_of[id(c)]))
                else:
                    children.append((n, visit(c, join_path(path, n))))
            shared: dict[str, Any] = {k: v for k, v in fresh_bookkeeping() if not isinstance(v, type)}
            shared["training"] = False
            deep: list[tuple[str, Any]] = []
            for k, v in mod.__dict__.items():
                if k in internal:
                    continue
                if _immutable(v):
                    shared[k] = v
                else:
                    deep.append((k, v))
            hooks = fresh_containers()
            nodes[me] = _Node(klass, shared, deep, *_unzip(params), *_unzip(buffers), *_unzip(children), np_set,
                              type(mod._parameters), type(mod._buffers), type(mod._modules),
                              tuple(k for k, _ in hooks), tuple(kind for _, kind in hooks))
            return me

        try:
            visit(template, "")
            extra = [k for k in keys if is_attribute_state(k)]  # tensors of plain attributes: filled per model
            for key, t in zip(extra, attribute_states(template, extra)):
                tensor_slot(t, key, False, True)
        except (LookupError, StoreError):
            return None
        if covered != set(keys):
            return None
        originals = [0] * len(nodes)  # node_of covers every node
        for mod_id, i in node_of.items():
            originals[i] = mod_id
        return cls([n for n in nodes if n is not None], slots, originals)  # every visit filled its place

    def make(self, state: Sequence["torch.Tensor"]) -> "nn.Module":
        """A fresh module in eval mode holding copies of ``state`` (tensors in key order).

        Every tensor is copied into storage of its own (a write never reaches the store, another
        model or a later copy); modules are created by ``object.__new__`` with a fresh ``__dict__``
        whose immutable values are shared and whose containers (hook registries, parameter,
        buffer and child dicts) are new. Everything is planned once in ``of``: per model this is a
        handful of C-level calls per module and two per tensor.
        """
        import torch

        new: list[Any] = []
        subclass, parameter = self.subclass, self.parameter
        with torch.no_grad():  # a clone of a tensor that requires grad must not record history
            for t, k, is_param, grad, contig in self.slots:
                src = state[k] if k >= 0 else t
                if contig:
                    data = src.clone(memory_format=torch.contiguous_format)
                else:  # keep the template's memory layout: it changes float rounding in matmuls
                    data = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype).copy_(src)
                new.append(subclass(parameter, data, grad) if is_param else data)
        new.append(None)  # the index of an empty slot
        mods: list[Any] = [object.__new__(cls) for cls in self.classes]
        mods.append(None)  # the index of an empty child
        memo: dict[int, Any] | None = None
        if self.deep:
            memo = {id(slot[0]): t for slot, t in zip(self.slots, new)}
            memo.update(zip(self.originals, mods))
        pick, pick_mod, call = new.__getitem__, mods.__getitem__, type.__call__
        for mod, node in zip(mods, self.nodes):
            d = node.shared.copy()  # attributes and the scalar bookkeeping
            d.update(zip(node.hook_names, map(call, node.hook_types)))  # empty hook registries of its own
            d["_parameters"] = node.pc(zip(node.param_names, map(pick, node.param_slots)))
            d["_buffers"] = node.bc(zip(node.buffer_names, map(pick, node.buffer_slots)))
            d["_non_persistent_buffers_set"] = set(node.nonpersistent)
            d["_modules"] = node.mc(zip(node.child_names, map(pick_mod, node.child_nodes)))
            if node.deep:
                assert memo is not None
                for name, v in node.deep:
                    d[name] = _copy_value(v, memo)
            object.__setattr__(mod, "__dict__", d)
        root: nn.Module = mods[0]
        return root


def _unzip(pairs: list[tuple[str, int]]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    return tuple(n for n, _ in pairs), tuple(i for _, i in pairs)


def _copy_value(v: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy`` with the template's tensors and modules replaced by the copy's (also
    behind weak references, as an RNN keeps to its flat weights)."""
    if type(v) is weakref.ReferenceType:
        target = v()
        return weakref.ref(memo[id(target)]) if target is not None and id(target) in memo else v
    if type(v) is list:
        return [_copy_value(x, memo) for x in v]
    if type(v) is tuple:
        return tuple(_copy_value(x, memo) for x in v)
    if type(v) is dict:
        return {k: _copy_value(x, memo) for k, x in v.items()}
    return copy.deepcopy(v, memo)


def make_cloner(template: "nn.Module", keys: Sequence[str]) -> "Callable[[Sequence[torch.Tensor]], nn.Module] | None":
    """``Cloner.of(...).make`` after one trial copy (deep-copying an exotic attribute may fail:
    then the caller keeps its general path)."""
    cloner = Cloner.of(template, keys)
    if cloner is None:
        return None
    try:
        state = module_state(template, keys)
        cloner.make([state[k] for k in keys])
    except (TypeError, AttributeError, RuntimeError, ValueError, NotImplementedError, copy.Error):
        return None  # an attribute deepcopy cannot copy: the caller keeps its general path
    return cloner.make
