"""One walk per model of a set: its state tensors and, for a structural record, the check that it
has the first model's architecture.

``nn.Module.state_dict()`` costs ~40 µs for a small MLP (recursion, prefixes, hooks, detach), which
for 5,000 models is more than writing their parameters; a second walk comparing each model's tree
with the first model's cost as much again. ``SetWalk`` records the first model once, node by node
in pre-order: what ``state_dict`` reads (class, parameter/buffer/child names, ``None`` slots,
non-persistent buffers, each tensor's dtype and shape) and what the structural record holds (child
names, the instance attribute keys and values). Every further model is walked once against that
record; at each module a fingerprint of the first model's (its ``__dict__`` keys in order, its scalar
attributes fetched by one ``itemgetter``, compared by identity, else by value and type) decides
equality without a loop per attribute, and only a mismatch runs the exact comparison that names the
difference. What depends on a module's class only (whether ``state_dict`` is the plain one, which
attributes are bookkeeping) is decided once per save from the first model, never per model.

Two outcomes are kept apart. A *structural difference* (another class, other child names, an
attribute added, removed or of another value: what the set's one record would lose) is remembered
as the message of an ``ArchitectureError`` for the first model that has one; the caller raises it
where the architecture is settled, so errors come in the order they always did. A model that merely
does not fit the fast path (a state-dict hook, a non-contiguous or other-dtype tensor, another
parameter count) gives ``None``: its tensors come from ``state_dict()``, which also names any
difference in the state. The tensors returned are always the ones ``state_dict()`` holds.
"""
from __future__ import annotations

import functools
import math
import sys
import types
import weakref
from dataclasses import dataclass
from operator import is_, itemgetter
from typing import TYPE_CHECKING, Any

from ..errors import a_type

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .trust import HFConfigClass

FUNCTION_TYPES = (types.FunctionType, types.BuiltinFunctionType, types.BuiltinMethodType)
#: the attribute an ``@mm.architecture`` factory tags its model with (``architectures.py``): which
#: factory built a model is bookkeeping, compared by the factory record, never by a structural one
TAG = "__mm_architecture__"


@functools.lru_cache(maxsize=1)
def internal_attributes() -> frozenset[str]:
    """The attributes ``nn.Module.__init__`` creates (bookkeeping, not architecture)."""
    from torch import nn

    return frozenset(nn.Module().__dict__)


@functools.lru_cache(maxsize=1)
def hook_registries() -> tuple[str, ...]:
    """The hook containers ``nn.Module.__init__`` creates: hooks are code, which no record holds."""
    from torch import nn

    state = {"_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"}
    return tuple(k for k, v in nn.Module().__dict__.items() if isinstance(v, (dict, set)) and k not in state)


def hooks_of(mod: "nn.Module") -> list[str]:
    """The hook registries of ``mod`` that hold something."""
    d = mod.__dict__
    return [k for k in hook_registries() if isinstance(d.get(k), (dict, set)) and d[k]]


@functools.lru_cache(maxsize=1)
def _hooks_getter() -> Any:
    return itemgetter(*hook_registries(), *hook_registries()[:1])  # (at least two: always a tuple)


def same_class(a: type, b: type) -> bool:
    """Whether modules of classes ``a`` and ``b`` are alike for a set's record: the same class, or
    two that ``torch.nn.utils.parametrize`` made (one per module it parametrizes) for one class with
    the same parametrized tensors."""
    return a is b or (_parametrized(a) and _parametrized(b) and a.__bases__ == b.__bases__
                      and _properties(a) == _properties(b))


def _parametrized(c: type) -> bool:
    return (c.__module__ == "torch.nn.utils.parametrize" and len(c.__bases__) == 1
            and c.__name__ == f"Parametrized{c.__bases__[0].__name__}")


def _properties(c: type) -> set[str]:
    return {k for k, v in vars(c).items() if isinstance(v, property)}


def _hook_sizes(mod: "nn.Module") -> tuple[tuple[str, int], ...]:
    d = mod.__dict__
    return tuple((k, len(d[k])) for k in hooks_of(mod))


def _maybe_hooked(d: dict[str, Any]) -> bool:
    """One C call over a module's hook registries; True also when one is missing (the exact path decides)."""
    try:
        return any(_hooks_getter()(d))
    except KeyError:
        return True


def join_path(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def hf_config_types() -> tuple[HFConfigClass, ...]:
    tf = sys.modules.get("transformers")
    if tf is None:
        return ()
    return tuple(c for c in (getattr(tf, "PretrainedConfig", None), getattr(tf, "GenerationConfig", None)) if c)


def plain_class(klass: type[nn.Module]) -> bool:
    """Whether ``klass`` keeps ``nn.Module``'s own state-dict code. Not cached: a class may be
    patched between saves, and the walk asks once per module of the first model only."""
    from torch import nn

    return (
        klass.state_dict is nn.Module.state_dict
        and klass._save_to_state_dict is nn.Module._save_to_state_dict
        and getattr(klass, "get_extra_state", nn.Module.get_extra_state) is nn.Module.get_extra_state
    )


def _hooked(mod: "nn.Module") -> bool:
    return bool(getattr(mod, "_state_dict_hooks", None) or getattr(mod, "_state_dict_pre_hooks", None))


@dataclass(frozen=True)
class _Node:
    parent: int  # index of the parent node, -1 for the root
    name: str  # child name in the parent
    path: str
    type: Any  # the module's class (Any: an identity test must not narrow what is compared)
    children: tuple[str, ...]
    none_children: tuple[str, ...]  # child slots holding None
    check: bool  # compare the structure here (the module's first place in the tree)
    keys: frozenset[str]  # attribute keys without nn.Module's bookkeeping
    simple: tuple[tuple[str, Any], ...]  # attributes compared with ==
    other: tuple[tuple[str, Any], ...]  # attributes compared structurally
    hooked: tuple[tuple[str, int], ...] = ()  # non-empty hook registries and their sizes (``SetWalk`` factory=True)


_SCALARS = (type(None), bool, int, float, str)


def _fingerprint(node: _Node, mod: "nn.Module") -> tuple[Any, ...]:
    """What one walk compares at ``node`` without a Python loop per attribute: the ``__dict__`` keys
    in order, a getter of the scalar attributes with their values and types, and whether the exact
    comparison must run anyway (None slots, sequences, structural values). Equal fingerprints imply
    what ``SetWalk._differs`` would find equal; a mismatch runs it to decide and to name the difference."""
    scalars = [(k, v) for k, v in node.simple if type(v) in _SCALARS]
    keys = [k for k, _ in scalars]
    getter = itemgetter(*keys, *keys[:1]) if keys else None  # at least 2 keys: always a tuple
    values = tuple(v for _, v in scalars) + tuple(v for _, v in scalars[:1])
    exact = bool(node.none_children or node.other or len(scalars) != len(node.simple))
    return tuple(mod.__dict__), getter, values, tuple(map(type, values)), exact


class SetWalk:
    """The first model of a set, recorded for walking every further model once (see the module).

    ``structure``: also check each model's module tree and attribute values (a structural record);
    ``keys``/``expect``: the state-dict keys and the (dtype, shape) of each, in order, that the
    tensors must have for the fast path (None: every model takes ``state_dict()``). ``factory``: the
    record is a factory call, which makes its code again: modules must have the first model's hooks
    in number (hook code cannot be compared) instead of none, and code held in attributes is
    compared by definition (a lambda or closure of the same source, a partial of the same function
    and arguments, a method of the same function), other objects only by type.
    """

    def __init__(self, first: "nn.Module", first_name: str, *, structure: bool, keys: list[str] | None = None,
                 expect: "list[tuple[torch.dtype, torch.Size]] | None" = None, factory: bool = False) -> None:
        self.first, self.first_name, self.structure, self.factory = first, first_name, structure, factory
        self.difference: str | None = None  # the first structural difference met, as an error message
        self.why: str | None = None  # that difference itself ("attribute act.p is 0.5, model 'a' has 0.1")
        self._paths0: dict[int, str] | None = None
        self._paths: tuple[Any, dict[int, str]] = (None, {})  # (model, its paths): computed once per model
        self.nodes: list[_Node] = []
        steps: list[tuple[Any, ...]] = []
        state_keys: list[str] = []
        state_slots: list[tuple[int, bool, str]] = []
        internal = internal_attributes()
        seen: dict[int, int] = {}  # id of a module -> its first node
        tensors: dict[int, int] = {}  # id of a tensor -> its first slot
        #: sharing, which the record keeps: (node, node of its first place) of a module met again, the
        #: (node, is_param, name) of every tensor slot of a first place, and (slot, slot it is tied to)
        self._same_module: list[tuple[int, int]] = []
        self._slots: list[tuple[int, bool, str]] = []
        self._in_state: list[bool] = []  # per slot: in the state dict (a None there is a state difference)
        self._ties: list[tuple[int, int]] = []
        plain = True
        pending = list(expect or [])[::-1]

        def visit(mod: "nn.Module", parent: int, name: str, path: str) -> None:
            nonlocal plain
            plain = plain and plain_class(type(mod)) and not _hooked(mod)
            check = structure and id(mod) not in seen
            if id(mod) in seen:
                self._same_module.append((len(self.nodes), seen[id(mod)]))
            seen.setdefault(id(mod), len(self.nodes))
            if check:
                for is_param, slots in ((True, mod._parameters), (False, mod._buffers)):
                    for k, t in slots.items():
                        if t is not None:
                            if id(t) in tensors:
                                self._ties.append((len(self._slots), tensors[id(t)]))
                            tensors.setdefault(id(t), len(self._slots))
                            self._slots.append((len(self.nodes), is_param, k))
                            self._in_state.append(is_param or k not in mod._non_persistent_buffers_set)
            params, buffers = mod._parameters, mod._buffers
            nonpersistent = frozenset(mod._non_persistent_buffers_set)
            take = [(True, k) for k, v in params.items() if v is not None] + [
                (False, k) for k, v in buffers.items() if v is not None and k not in nonpersistent]
            state_keys.extend(join_path(path, k) for _, k in take)
            state_slots.extend((len(self.nodes), is_param, k) for is_param, k in take)
            # each tensor's place with the dtype and shape it must have (the first model's)
            placed = tuple((is_param, k, dtype, shape, dtype.is_complex)
                           for (is_param, k), (dtype, shape) in zip(take, [pending.pop() for _ in take if pending]))
            empty = tuple([(True, k) for k, v in params.items() if v is None]
                          + [(False, k) for k, v in buffers.items() if v is None])
            attrs = {k: v for k, v in mod.__dict__.items() if k not in internal and k != TAG} if check else {}
            node = _Node(parent, name, path, type(mod), tuple(mod._modules),
                         tuple(k for k, c in mod._modules.items() if c is None), check, frozenset(attrs),
                         tuple((k, v) for k, v in attrs.items() if simple_value(v)),
                         tuple((k, v) for k, v in attrs.items() if not simple_value(v)), _hook_sizes(mod))
            self.nodes.append(node)
            steps.append((node, parent, name, type(mod), node.children, check,
                          *(_fingerprint(node, mod) if check else (None, None, None, None, False)),
                          len(params), len(buffers), nonpersistent, placed, empty, node.none_children))
            me = len(self.nodes) - 1
            for child_name, child in mod._modules.items():
                if child is not None:
                    visit(child, me, child_name, join_path(path, child_name))

        visit(first, -1, "", "")
        self._steps = steps
        self._n_modules, self._n_tensors = len(seen), len(tensors)
        #: the slots are exactly the state dict's tensors: a walk that read them compares those
        self._slots_are_state = self._slots == state_slots
        #: the fast path: every class plain, no state-dict hooks, the walk's keys those of state_dict
        self.collect = plain and expect is not None and keys == state_keys

    def walk(self, model: "nn.Module", name: str) -> "list[torch.Tensor] | None":
        """``model``'s state tensors in ``state_dict`` order, or None when they must come from
        ``state_dict()``; a structural difference is remembered in ``difference`` (first one only)."""
        return self._walk(model, name, self.structure)

    def _walk(self, model: "nn.Module", name: str, structure: bool) -> "list[torch.Tensor] | None":
        collect = self.collect
        if not (collect or structure):
            return None
        out: list[torch.Tensor] = []
        append = out.append
        mods: list[Any] = []
        push = mods.append
        for (node, parent, key, klass, children, check, order, getter, values, kinds, exact,
             n_params, n_buffers, nonpersistent, placed, empty, none_children) in self._steps:
            if parent < 0:
                mod: Any = model
            else:
                up = mods[parent]
                mod = None if up is None else up._modules.get(key)
            if structure and check:
                d = None if mod is None or type(mod) is not klass else mod.__dict__
                if (d is None or exact or (tuple(d["_modules"]) != children if children else d["_modules"])
                        or tuple(d) != order or _maybe_hooked(d)
                        or (getter is not None and not all(map(is_, got := getter(d), values))  # mostly so
                            and (got != values or tuple(map(type, got)) != kinds))):
                    why = self._differs(node, mod, model)
                    if why is not None:  # the save fails; its tensors only decide which error comes first
                        if self.difference is None:
                            self.difference, self.why = self._message(name, why), why
                        return self._walk(model, name, False)
            push(mod)
            if not collect:
                continue
            try:  # the tests state_dict() makes, on this module and its tensors
                d = mod.__dict__
                params, buffers = d["_parameters"], d["_buffers"]
                fits = ((structure and check  # class, children and None slots compared above
                         or type(mod) is klass and len(d["_modules"]) == len(children)
                         and (not none_children or all(d["_modules"][k] is None for k in none_children)))
                        and len(params) == n_params and len(buffers) == n_buffers
                        and not d["_state_dict_hooks"] and not d["_state_dict_pre_hooks"]
                        and (not buffers or d["_non_persistent_buffers_set"] == nonpersistent)
                        and (not empty or all((params if p else buffers)[k] is None for p, k in empty)))
                if fits:
                    for is_param, k, dtype, shape, complex_ in placed:
                        t = params[k] if is_param else buffers[k]
                        if (t is None or t.dtype is not dtype or t.shape != shape or not t.is_cpu
                                or not t.is_contiguous() or t.is_neg() or complex_ and t.is_conj()):
                            fits = False
                            break
                        append(t)
            except (KeyError, AttributeError, RuntimeError):  # RuntimeError: is_contiguous of sparse
                fits = False
            if not fits:  # state_dict() gives the tensors; the rest of the tree is still checked
                if not structure:
                    return None
                collect = False
        if structure:
            why = self._sharing(mods, out if collect and self._slots_are_state else None)
            if why is not None:
                if self.difference is None:
                    self.difference, self.why = self._message(name, why), why
                return self._walk(model, name, False)
        return out if collect else None

    def _sharing(self, mods: list[Any], ts: "list[torch.Tensor] | None") -> str | None:
        """How the modules and tensors ``mods`` (one per node) are shared otherwise than the first
        model's: a recovered model is built with the first model's sharing, so a tensor kept apart
        from one the first model ties it to would be lost."""
        nodes = self.nodes
        for i, j in self._same_module:
            if mods[i] is not mods[j]:
                return (f"module {nodes[i].path} is not module {nodes[j].path or '(root)'}, which model "
                        f"{self.first_name!r} shares at both places")
        if len(set(map(id, mods))) != self._n_modules:
            first: dict[int, int] = {}
            for i, m in enumerate(mods):
                j = first.setdefault(id(m), i)
                if j != i and (i, j) not in self._same_module:
                    return (f"module {nodes[i].path} is module {nodes[j].path or '(root)'}; model "
                            f"{self.first_name!r} has two modules there")
        if not self._slots:
            return None
        if ts is None:
            ts = [(mods[n]._parameters if is_param else mods[n]._buffers).get(k) for n, is_param, k in self._slots]
        ids = set(map(id, ts))
        if len(ids) == self._n_tensors and _NONE not in ids and all(ts[a] is ts[b] for a, b in self._ties):
            return None

        def where(a: int) -> str:
            n, is_param, k = self._slots[a]
            return f"{'parameter' if is_param else 'buffer'} {join_path(nodes[n].path, k)}"

        seen: dict[int, int] = {}
        for a, t in enumerate(ts):
            if t is None:  # in the state dict, reading the state names it (that error comes first)
                return None if self._in_state[a] else f"{where(a)} is None, model {self.first_name!r} has a tensor"
            b = seen.setdefault(id(t), a)
            if b != a and (a, b) not in self._ties:
                return f"{where(a)} is {where(b)}; model {self.first_name!r} keeps them apart"
        for a, b in self._ties:
            if ts[a] is not ts[b]:
                return f"{where(a)} is not {where(b)}, which model {self.first_name!r} ties to it"
        return None

    def _differs(self, node: _Node, mod: Any, model: "nn.Module") -> str | None:
        """How ``mod``, at ``node``'s place in ``model``, differs from the first model's module there."""
        if mod is None:
            return f"has no module {node.path}"
        where = node.path or "(root)"
        if not same_class(type(mod), node.type):
            return f"module {where} is {a_type(mod)}, not a {node.type.__name__}"
        modules = mod._modules
        if tuple(modules) != node.children:
            return f"module {where} has children {list(modules)}, not {list(node.children)}"
        for k in node.none_children:
            if modules[k] is not None:
                return f"module {join_path(node.path, k)} is {a_type(modules[k])}, model {self.first_name!r} has None"
        if self.factory:
            sizes = _hook_sizes(mod)
            if sizes != node.hooked:
                return f"module {where} has hooks {dict(sizes)}, model {self.first_name!r} has {dict(node.hooked)}"
        elif hooked := hooks_of(mod):  # (the first model's are refused where its record is made)
            return (f"module {where} ({type(mod).__name__}) has hooks registered ({', '.join(hooked)}); hooks are "
                    "code, which the set's record cannot hold — remove them before saving")
        d = mod.__dict__
        keys = d.keys() - internal_attributes() - {TAG}
        if keys != node.keys:
            extra, missing = sorted(keys - node.keys), sorted(node.keys - keys)
            return (f"module {where} has attributes {extra or missing} that model "
                    f"{self.first_name!r} {'lacks' if extra else 'has'}")
        for k, v0 in node.simple:
            v = d.get(k, _MISSING)
            if v is not v0 and (type(v) is not type(v0) or not _equal_simple(v, v0)):
                return f"attribute {join_path(node.path, k)} is {v!r}, model {self.first_name!r} has {v0!r}"
        if node.other:
            if self._paths[0] is not model:
                self._paths = (model, _paths(model))
            paths = self._paths[1]
            if self._paths0 is None:
                self._paths0 = _paths(self.first)
            for k, v0 in node.other:
                if not _same(d.get(k, _MISSING), v0, paths, self._paths0, self.factory):
                    return f"attribute {join_path(node.path, k)} differs"
        return None

    def _message(self, name: str, what: str) -> str:
        return (f"all models of a set must share one architecture: model {name!r} {what} (compared with model "
                f"{self.first_name!r}); save them as separate sets")


_MISSING = object()
_NONE = id(None)


def simple_value(v: Any) -> bool:
    """A value compared with ``==`` (and its type): None, bool, int, float, str and lists/tuples of them."""
    if v is None or type(v) in (bool, int, float, str):
        return True
    if type(v) in (tuple, list):
        return all(simple_value(x) for x in v)
    return False


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


def _cells(f: types.FunctionType) -> list[Any]:
    """What closure ``f`` holds: its cells' values (an empty cell, or ``f`` itself, as a marker)."""
    out: list[Any] = []
    for cell in f.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:  # (not assigned yet)
            value = _MISSING
        out.append("<itself>" if value is f else "<empty>" if value is _MISSING else value)
    return out


def _same(a: Any, b: Any, pa: dict[int, str], pb: dict[int, str], loose: bool = False, depth: int = 0) -> bool:
    """Whether attribute values ``a`` (of one model, paths ``pa``) and ``b`` (of another) are alike
    for a set's record. ``loose`` (a factory record, see ``SetWalk``): code made per call counts as
    alike when it has the same definition, and other objects when they have the same type."""
    import torch

    if a is _MISSING or type(a) is not type(b):
        return False
    if depth > 32:  # (a structure that deep, or a cycle: not alike, so the save is refused, never wrong)
        return False

    def same(x: Any, y: Any) -> bool:
        return _same(x, y, pa, pb, loose, depth + 1)

    if type(a) is weakref.ReferenceType:
        x, y = a(), b()
        return (x is None and y is None) or (x is not None and y is not None and same(x, y))
    if isinstance(a, (torch.Tensor, torch.nn.Module)):
        if id(a) in pa or id(b) in pb:
            return pa.get(id(a)) == pb.get(id(b))
        # a plain tensor is stored per model (like a buffer): the set shares its place, dtype and shape
        return isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.device) and loose:  # (the record is rebuilt on the meta device)
        return True
    if isinstance(a, (set, frozenset)) or simple_value(a) or isinstance(a, (torch.dtype, torch.device)):
        return bool(a == b)
    configs = hf_config_types()
    if configs and isinstance(a, configs):
        return a is b or a.to_dict() == b.to_dict()
    if loose and a is not b:
        if isinstance(a, types.FunctionType):  # a lambda or closure made per call: its source and values
            return (a.__code__ is b.__code__ and same(a.__defaults__, b.__defaults__)
                    and same(_cells(a), _cells(b)))
        if isinstance(a, types.MethodType):
            return same(a.__func__, b.__func__) and same(a.__self__, b.__self__)
        if isinstance(a, functools.partial):
            return same(a.func, b.func) and same(a.args, b.args) and same(a.keywords, b.keywords)
        if not isinstance(a, (type, *FUNCTION_TYPES)):
            return True  # another object of the same type: what it holds is the factory's to make
    return a is b
