"""Descriptions of a module tree remembered per object, revalidated on every use.

A search asks again for the split-verdict key and the block ids of the same candidate objects;
describing them walks every attribute of every module in Python. ``IdentityCache`` keeps such a
description per root module together with an identity signature that is rebuilt and compared on
every use. The signature holds, in walk order: every module and attribute object by identity
(atoms -- ints, strings, floats, dtypes, sizes -- are immutable and kept alive by the entry, so the
same id is the same value; other objects are held by weak reference, and a dead one voids the
entry, so no id is reused meanwhile), each object's type, every mutable container's contents
(rebuilt each time, never trusted by identity) and its sharing within the walk, every parameter's
and buffer's dtype and shape, and the digest of the bytes of every buffer other than batch-norm
statistics. Parameter values are not in it: a description that depends on them (block ids) hashes
them on every use. Anything the signature cannot pin down (a tensor or function held in an
attribute, a module hook, a module outside the tree, an object without weak references) makes the
root uncached: described afresh on every call. Assumed, as for the verdict key: what a module's
methods report (``extra_repr``) follows from its class, attributes and tensors' dtypes and shapes.
"""
from __future__ import annotations

import functools
import hashlib
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

T = TypeVar("T")

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
              "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
SKIP_ATTRS = frozenset({"_parameters", "_buffers", "_modules", "training", "_backward_hooks",
                        "_backward_pre_hooks", "_is_full_backward_hook", "_state_dict_hooks",
                        "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
                        *HOOK_DICTS})
STATS = frozenset({"running_mean", "running_var", "num_batches_tracked"})
_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
                    torch.layout, torch.memory_format})
_CONTAINERS = frozenset({tuple, list, dict, OrderedDict, set, frozenset})
_OPAQUE = (Tensor, types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType,
           functools.partial, weakref.ref)


class _Uncacheable(Exception):
    """Something a signature (or a key) cannot describe faithfully."""


def digest(t: Tensor) -> bytes:
    """sha256 of a tensor's raw bytes."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().data).digest()  # hashed in place, not copied


class _Signature:
    """Identity signature of a module tree (module docstring)."""

    def __init__(self) -> None:
        self.out: list[object] = []
        self.atoms: list[object] = []  # keeps atoms alive, so equal ids stay equal values
        self.objects: dict[int, object] = {}  # id -> object, held weakly by the cache entry
        self.local: dict[int, int] = {}  # containers and objects met in this walk: sharing, cycles
        self.attr_modules: list[int] = []
        self.tree_ids: set[int] = set()

    def obj(self, v: object) -> None:
        self.objects[id(v)] = v
        self.out.append(id(v))

    def value(self, v: Any, depth: int = 0) -> None:
        t = type(v)
        if t in _ATOMS:
            self.out.append(id(v))
            self.atoms.append(v)
            return
        if depth > 8:
            raise _Uncacheable("nesting too deep")
        if isinstance(v, (nn.Module, type)):
            self.obj(v)
            if isinstance(v, nn.Module):
                self.attr_modules.append(id(v))
            return
        if id(v) in self.local:
            self.out.append(("seen", self.local[id(v)]))
            return
        self.local[id(v)] = len(self.local)
        if t in _CONTAINERS:
            self.out.append((t.__name__, len(v)))
            if t is dict or t is OrderedDict:
                for k, item in v.items():
                    self.value(k, depth + 1)
                    self.value(item, depth + 1)
            else:
                for item in v:
                    self.value(item, depth + 1)
        elif isinstance(v, _OPAQUE) or not hasattr(v, "__dict__"):
            raise _Uncacheable(f"an attribute of type {t.__name__}")
        else:
            self.obj(v)
            self.obj(t)
            self.value(dict(vars(v)), depth + 1)

    def tree(self, root: nn.Module) -> None:
        for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_with_kwargs"):
            if getattr(torch_module, name, None):
                raise _Uncacheable("a global module hook")
        out, atoms = self.out, self.atoms
        tree: set[int] = set()
        stack = [root]
        while stack:
            m = stack.pop()
            self.obj(m)
            if id(m) in tree:
                continue
            tree.add(id(m))
            d = m.__dict__
            self.obj(type(m))
            for hooks in HOOK_DICTS:
                if d.get(hooks):
                    raise _Uncacheable("a module hook")
            for k, v in d.items():
                if k in SKIP_ATTRS:
                    continue
                if type(k) is str and type(v) in _ATOMS:  # the common case, inlined
                    out.append(id(k))
                    out.append(id(v))
                    atoms.append(k)
                    atoms.append(v)
                else:
                    self.value(k)
                    self.value(v)
            stats = isinstance(m, nn.modules.batchnorm._NormBase)
            for label, tensors, hashed in (("params", m._parameters, False), ("buffers", m._buffers, True)):
                out.append(label)  # parameter values are never in it; buffers' bytes are (but BN statistics)
                for tname, t in tensors.items():
                    self.value(tname)
                    if t is None:
                        out.append(None)
                        continue
                    self.obj(t)
                    out.extend((t.dtype, t.shape))
                    if hashed and not (stats and tname in STATS):
                        out.append(digest(t))
            out.append(("children", len(m._modules)))
            children = []
            for cname, child in m._modules.items():
                self.value(cname)
                out.append(None if child is None else id(child))
                if child is not None:
                    self.objects[id(child)] = child
                    children.append(child)
            stack.extend(reversed(children))
        if any(i not in tree for i in self.attr_modules):
            raise _Uncacheable("a module outside the tree")
        self.tree_ids = tree


@dataclass
class Scope:
    """What an entry's signature covers, for descriptions of parts of the root made while that
    signature holds: ``tree`` (ids of the modules in the root's tree, kept alive by the entry's
    validity) and ``memo`` (such descriptions). It belongs to one entry: a changed root gets a new
    entry and an empty memo, so a memoised part is never older than the signature it rests on."""

    tree: frozenset[int]
    memo: dict[Any, Any] = field(default_factory=dict)


@dataclass
class _Entry(Generic[T]):
    signature: tuple[object, ...]
    atoms: list[object]
    refs: list["weakref.ref[Any]"]
    value: T | None  # None: the describer cannot describe this root
    scope: Scope


class IdentityCache(Generic[T]):
    """``describe()``'s result per root module, served only while the root's signature (module
    docstring) and ``extra`` (atoms: what else the description reads) are unchanged; LRU-bounded."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[int, _Entry[T]] = OrderedDict()

    def clear(self) -> None:
        self.entries.clear()

    def get(self, root: nn.Module, extra: tuple[object, ...], describe: Callable[[], T | None]) -> T | None:
        return self.lookup(root, extra, describe)[0]

    def lookup(self, root: nn.Module, extra: tuple[object, ...],
               describe: Callable[[], T | None]) -> tuple[T | None, Scope | None]:
        """``get``, and the entry's ``Scope`` (None when the root is uncached): valid for as long as
        nothing changes the root, which the caller must ensure (it runs no code of the model's)."""
        sig = _Signature()
        cacheable = True
        try:
            for v in extra:
                sig.value(v)
            sig.tree(root)
        except (_Uncacheable, RecursionError, TypeError, ValueError, RuntimeError):
            cacheable = False
        signature = tuple(sig.out)
        entry = self.entries.get(id(root))
        if cacheable and entry is not None and entry.signature == signature and all(
                r() is not None for r in entry.refs):
            self.entries.move_to_end(id(root))
            return entry.value, entry.scope
        value = describe()
        if not cacheable:
            self.entries.pop(id(root), None)
            return value, None
        try:  # weak references only for a new entry (a hit compares ids; the entry holds the refs)
            refs = [weakref.ref(o) for o in sig.objects.values()]
        except TypeError:
            self.entries.pop(id(root), None)
            return value, None
        entry = _Entry(signature, sig.atoms, refs, value, Scope(frozenset(sig.tree_ids)))
        self.entries[id(root)] = entry
        self.entries.move_to_end(id(root))
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value, entry.scope


__all__ = ["HOOK_DICTS", "IdentityCache", "SKIP_ATTRS", "STATS", "Scope", "_Uncacheable", "digest"]
