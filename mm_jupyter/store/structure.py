"""Structural architecture records: any ``nn.Module`` as its module tree, rebuilt without ``__init__``.

Guessing constructor arguments is impossible in general (``Net(width=12, depth=3)``,
``nn.LSTM(6, 8, num_layers=2)``), and pickling a module would run arbitrary code on load. A module's
*state* is fully described by its tree instead: per node its class, its plain attributes, its
children and the specs of its parameters and buffers. Rebuilding creates each node with
``object.__new__`` plus ``nn.Module``'s own bookkeeping, restores attributes and children and
allocates tensors of the recorded dtypes and shapes, so no constructor of the recorded classes runs.

Record (JSON)::

    {"classes": ["torch.nn.modules.linear:Linear", "@Net", ...],   # "@X": defined in `source`
     "source": {"code": "...", "names": ["Net", ...]} | null,      # notebook classes and functions
     "root": node}
    node = {"c": class index, "t": training,
            "p": [[name, [dtype, shape, requires_grad(, strides)] | {"tie": path} | null], ...],
            "b": [[name, [dtype, shape(, base64 bytes | null(, strides))] | {"tie": path} | null], ...],
            "np": [non-persistent buffer names], "m": [[name, node | {"ref": path} | null], ...],
            "a": [[attribute, value], ...]}

The bytes are recorded for non-persistent buffers only (they are not in the state dict); strides
only for non-contiguous tensors (a transposed weight gives other float rounding in a matmul, so
the layout is part of what the model computes). Ordered name/value pairs are lists, not JSON objects, so a record
survives key-sorting serialisers (the order of parameters and children is the order of the state dict).

Attribute values are JSON scalars and lists, or tagged: ``$tuple``, ``$dict``, ``$set``,
``$frozenset``, ``$float`` (non-finite), ``$dtype``, ``$device``, ``$size``, ``$fn`` (an
allow-listed function), ``$class`` (an ``nn.Module`` class), ``$enum`` (an enum member: class and
member name), ``$ref`` (a tensor of this tree, e.g. an RNN's flat weights), ``$module`` (a module of
this tree), ``$state`` (a plain tensor — alone, in a list, tuple or dict, such as a cache an eval
forward fills: stored per model like a buffer under the key ``<module path>.<attribute>#<n>``, the
record holding its key, dtype and shape), ``$tensor`` (a small plain tensor inline: records written
before ``$state``) and ``$hfconfig`` (a Hugging Face config). Anything else cannot be recorded and
raises ``ArchitectureError`` naming the attribute path and its type. Restored attributes are data
only (``attribute_refusal``).
"""
from __future__ import annotations

import base64
import copy
import enum
import functools
import math
import types
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, NoReturn, Sequence

from ..errors import ArchitectureError, MMError, StoreError, TrustError, a_type
from . import trust
from .limits import MAX_RECORD_DEPTH, check_depth
from .sourcecode import capture_code, defining_namespace, definition_source, exec_source, ref_of, session_namespaces
from .tensors import Layout, TensorSpec, _as_storable, spec_of, torch_dtype

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .trust import HFConfigClass

#: A non-persistent buffer is recorded by value (in the record) up to this size.
MAX_INLINE_BYTES = 1 << 20
#: Separates an attribute's path from the position of a tensor in its value in a state key
#: (``stages.2.attn.attention_bias_cache#0``): tensors held in plain attributes are stored per model
#: under such keys, after the state dict's own (which never hold it).
STATE_MARK = "#"
_KEEP = ("training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_modules")
#: frozen record types a clone may share between models (``architectures.py`` adds ``Architecture``;
#: kept here as a set so this module need not import the one that imports it)
FROZEN_RECORDS: set[type] = set()
_FUNCTION_TYPES = (types.FunctionType, types.BuiltinFunctionType, types.BuiltinMethodType)


@functools.lru_cache(maxsize=1)
def internal_attributes() -> frozenset[str]:
    """The attributes ``nn.Module.__init__`` creates (bookkeeping, not architecture)."""
    from torch import nn

    return frozenset(nn.Module().__dict__)


@functools.lru_cache(maxsize=1)
def _module_own_names() -> frozenset[str]:
    """Everything ``nn.Module`` itself defines (methods, ``_compiled_call_impl``, ``_version``, ...)
    and the bookkeeping its ``__init__`` creates."""
    from torch import nn

    return frozenset(vars(nn.Module)) | internal_attributes()


def attribute_refusal(klass: type, name: Any) -> str | None:
    """Why a restored instance attribute ``name`` of a ``klass`` module would not be plain data
    (None: it is). Refused: dunders, anything ``nn.Module`` defines or keeps as bookkeeping, and any
    name the class or a base defines as a method, property or other descriptor — an instance
    attribute of that name would replace code that ``nn.Module`` or the class calls. A class-level
    plain value (``_no_split_modules = None``) may be overridden by the instance, as its
    ``__init__`` does."""
    if not isinstance(name, str) or not name.isidentifier():
        return "is not an attribute name"
    if name.startswith("__") and name.endswith("__"):
        return "is a special (dunder) name"
    if name in _module_own_names():
        return "belongs to nn.Module itself"
    for base in klass.__mro__:
        if name in vars(base):
            found = vars(base)[name]
            if base is object or callable(found) or hasattr(type(found), "__get__"):
                return f"is defined by class {base.__qualname__} (a {type(found).__name__})"
    return None


@functools.lru_cache(maxsize=1)
def _fresh_containers() -> tuple[tuple[str, type], ...]:
    return tuple((k, v) for k, v in _fresh_bookkeeping() if isinstance(v, type))


@functools.lru_cache(maxsize=1)
def _fresh_bookkeeping() -> tuple[tuple[str, Any], ...]:
    """(name, empty container type or scalar) for the hook registries of a fresh module."""
    from torch import nn

    return tuple((k, type(v) if isinstance(v, (dict, set)) else v)
                 for k, v in nn.Module().__dict__.items() if k not in _KEEP)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _hooks_of(mod: "nn.Module") -> list[str]:
    return [k for k, _ in _fresh_bookkeeping() if isinstance(mod.__dict__.get(k), (dict, set)) and mod.__dict__[k]]


def _dtype(t: "torch.Tensor", where: str) -> str:
    name = str(t.dtype).removeprefix("torch.")
    try:
        torch_dtype(name)
    except StoreError:
        raise ArchitectureError(f"{where} has dtype {t.dtype}, which the store cannot hold") from None
    return name


def _tensor_bytes(t: "torch.Tensor", where: str) -> str:
    import torch

    t = t.detach().cpu().contiguous()
    nbytes = t.numel() * t.element_size()
    if nbytes > MAX_INLINE_BYTES:
        raise ArchitectureError(
            f"{where} is a tensor of {nbytes} bytes outside the state dict; register it as a "
            "persistent buffer (module.register_buffer) so it is stored with the parameters")
    return base64.b64encode(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"").decode()


def _tensor_from(dtype: str, shape: Sequence[int], data: str, where: str) -> "torch.Tensor":
    import torch

    dt = torch_dtype(dtype)
    raw = base64.b64decode(data.encode(), validate=True)
    n = math.prod(shape) if shape else 1
    if len(raw) != n * dt.itemsize:
        raise ArchitectureError(f"{where}: recorded tensor bytes do not match dtype {dtype} and shape {list(shape)}")
    if not raw:
        return torch.empty(tuple(shape), dtype=dt)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt).reshape(tuple(shape)).clone()


def _hf_config_types() -> tuple[HFConfigClass, ...]:
    import sys

    tf = sys.modules.get("transformers")
    if tf is None:
        return ()
    return tuple(c for c in (getattr(tf, "PretrainedConfig", None), getattr(tf, "GenerationConfig", None)) if c)


# -- recording ----------------------------------------------------------------------------------------
class _Recorder:
    def __init__(self) -> None:
        self.classes: list[str] = []
        self.class_index: dict[type, int] = {}
        self.local: dict[str, Any] = {}  # notebook classes/functions, recorded as source
        self.paths: dict[int, str] = {}  # id(tensor) -> state path
        self.modules: dict[int, str] = {}  # id(module) -> module path
        self.pending: list[tuple[dict[str, Any], "nn.Module", str]] = []
        self.attribute = ""  # the attribute whose value is being recorded (names its tensors' state keys)
        self.states: list[str] = []  # state keys of the tensors found in attribute values, in order
        self.counts: dict[str, int] = {}  # tensors found so far per attribute

    def _local(self, obj: Any, where: str) -> str:
        name = obj.__name__
        qual = getattr(obj, "__qualname__", name)
        if "<locals>" in qual or "<lambda>" in qual or qual != name:
            raise ArchitectureError(
                f"{where} is {qual!r}, defined inside a function or class; define it at the top level of a "
                "module or notebook cell so it can be recorded")
        if self.local.get(name, obj) is not obj:
            raise ArchitectureError(f"{where}: two different definitions are both named {name!r}")
        self.local[name] = obj
        return f"@{name}"

    def enum_ref(self, klass: type, where: str) -> str:
        """The reference of an enum class (a notebook's enum is recorded as source)."""
        ref = ref_of(klass)
        if ref is None:
            return self._local(klass, f"class of {where}")
        if "." in ref.split(":")[1]:
            raise ArchitectureError(f"attribute {where} is a member of {ref!r}, an enum defined inside a class; "
                                    "define it at the top level of its module")
        return ref

    def cls(self, klass: type, where: str) -> int:
        if klass in self.class_index:
            return self.class_index[klass]
        ref = ref_of(klass)
        if ref is None:
            ref = self._local(klass, f"class of {where}")
        elif "." in ref.split(":")[1]:
            raise ArchitectureError(
                f"class of {where} is {ref!r}, defined inside another class; a record names only classes "
                "defined at the top level of their module — move it there")
        self.class_index[klass] = len(self.classes)
        self.classes.append(ref)
        return self.class_index[klass]

    def node(self, mod: "nn.Module", path: str) -> dict[str, Any]:
        import torch

        where = f"module {path or '(root)'}"
        hooks = _hooks_of(mod)
        if hooks:
            raise ArchitectureError(
                f"{where} ({type(mod).__name__}) has hooks registered ({', '.join(hooks)}); hooks are code and "
                "cannot be recorded — remove them before saving (or build the models with an @mm.architecture factory)")
        self.modules[id(mod)] = path
        node: dict[str, Any] = {"c": self.cls(type(mod), where), "t": bool(mod.training)}
        params: list[list[Any]] = []
        for name, p in mod._parameters.items():
            key = _join(path, name)
            if p is None:
                params.append([name, None])
            elif id(p) in self.paths:
                params.append([name, {"tie": self.paths[id(p)]}])
            else:
                if type(p) not in (torch.nn.Parameter,) and not isinstance(p, torch.nn.Parameter):
                    raise ArchitectureError(f"parameter {key} is {a_type(p)}, not an nn.Parameter")
                if isinstance(p, torch.nn.parameter.UninitializedParameter):
                    raise ArchitectureError(f"parameter {key} is uninitialised (a lazy module); run one forward first")
                self.paths[id(p)] = key
                spec = [_dtype(p, f"parameter {key}"), list(p.shape), bool(p.requires_grad)]
                if not p.is_contiguous() and is_dense_layout(p.shape, p.stride()):
                    spec.append(list(p.stride()))  # a permuted layout; a gapped view is rebuilt contiguous
                params.append([name, spec])
        buffers: list[list[Any]] = []
        nonpersistent = mod._non_persistent_buffers_set
        for name, b in mod._buffers.items():
            key = _join(path, name)
            if b is None:
                buffers.append([name, None])
            elif id(b) in self.paths:
                buffers.append([name, {"tie": self.paths[id(b)]}])
            else:
                self.paths[id(b)] = key
                spec = [_dtype(b, f"buffer {key}"), list(b.shape)]
                if name in nonpersistent:  # not in the state dict: its value is part of the architecture
                    spec.append(_tensor_bytes(b, f"non-persistent buffer {key}"))
                if not b.is_contiguous() and is_dense_layout(b.shape, b.stride()):
                    spec += [None] * (3 - len(spec)) + [list(b.stride())]
                buffers.append([name, spec])
        node["p"], node["b"] = params, buffers
        if nonpersistent:
            node["np"] = sorted(nonpersistent)
        children: list[list[Any]] = []
        for name, child in mod._modules.items():
            if child is None:
                children.append([name, None])
            elif id(child) in self.modules:
                children.append([name, {"ref": self.modules[id(child)]}])
            else:
                children.append([name, self.node(child, _join(path, name))])
        node["m"] = children
        self.pending.append((node, mod, path))
        return node

    def value(self, v: Any, where: str) -> Any:
        import torch

        t = type(v)
        if v is None or t in (bool, int, str):
            return v
        if t is float:
            return v if math.isfinite(v) else {"$float": repr(v)}
        if t is list:
            return [self.value(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if t is tuple:
            return {"$tuple": [self.value(x, f"{where}[{i}]") for i, x in enumerate(v)]}
        if t in (dict, OrderedDict):
            if any(isinstance(k, torch.Tensor) for k in v):
                raise ArchitectureError(f"attribute {where} is a dict with tensors as keys, which cannot be recorded")
            return {"$dict": [[self.value(k, f"{where} key"), self.value(x, f"{where}[{k!r}]")] for k, x in v.items()]}
        if t in (set, frozenset):
            if any(isinstance(x, torch.Tensor) for x in v):
                raise ArchitectureError(f"attribute {where} is a set of tensors, which cannot be recorded")
            items = sorted((self.value(x, f"{where} item") for x in v), key=repr)
            return {f"${t.__name__}": items}
        if isinstance(v, enum.Enum):
            if t._member_map_.get(v.name) is not v:  # e.g. a combination of Flag members
                raise ArchitectureError(f"attribute {where} is {v!r}, which is not a member by name of {t.__name__}")
            return {"$enum": [self.enum_ref(t, where), v.name]}
        if isinstance(v, torch.dtype):
            return {"$dtype": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {"$device": str(v)}
        if t is torch.Size:
            return {"$size": list(v)}
        if isinstance(v, torch.Tensor):
            if id(v) in self.paths:
                return {"$ref": self.paths[id(v)]}
            if isinstance(v, torch.nn.Parameter):
                raise ArchitectureError(f"attribute {where} holds a Parameter that no module registers")
            # a plain tensor attribute (a cache, a per-model constant): stored per model like a buffer,
            # under a key of its own; the record holds its place, dtype and shape
            key = f"{self.attribute}{STATE_MARK}{self.counts.get(self.attribute, 0)}"
            self.counts[self.attribute] = self.counts.get(self.attribute, 0) + 1
            self.states.append(key)
            _as_storable(v, f"attribute {where}")
            return {"$state": [key, _dtype(v, f"attribute {where}"), list(v.shape)]}
        if t is weakref.ReferenceType:
            target = v()
            if target is None or id(target) in self.paths or id(target) in self.modules:
                return {"$weakref": None if target is None else self.value(target, where)}
            raise ArchitectureError(f"attribute {where} is a weak reference to an object outside the module tree")
        if isinstance(v, torch.nn.Module):
            if id(v) in self.modules:
                return {"$module": self.modules[id(v)]}
            raise ArchitectureError(
                f"attribute {where} holds a {type(v).__name__} module that is not registered as a child (a plain "
                "list or dict of modules?); use nn.ModuleList / nn.ModuleDict")
        if isinstance(v, type):
            if issubclass(v, torch.nn.Module):
                return {"$class": self.classes[self.cls(v, f"attribute {where}")]}
            raise ArchitectureError(f"attribute {where} is the class {v.__qualname__}, which a record cannot hold")
        if isinstance(v, _FUNCTION_TYPES):
            ref = trust.function_ref(v)
            if ref is not None:
                trust.function(ref)  # refused now, at save, if recovery would refuse it
                return {"$fn": ref}
            if isinstance(v, types.FunctionType) and v.__module__ == "__main__":
                return {"$fn": self._local(v, f"attribute {where}")}
            raise ArchitectureError(
                f"attribute {where} is the function {getattr(v, '__qualname__', v)!r}, which cannot be recorded "
                "(a lambda or nested function); use a module-level function or an nn.Module")
        configs = _hf_config_types()
        if configs and isinstance(v, configs):
            ref = ref_of(t)
            if ref is not None:
                public = json_clean(v.to_dict(), f"attribute {where}")
                # settings chosen at model creation (e.g. the attention kernel) live in private
                # attributes that to_dict() leaves out; they change what the model computes
                private = {k: x for k, x in vars(v).items()
                           if k.startswith("_") and not k.startswith("__") and k not in public
                           and (x is None or type(x) in (bool, int, float, str))}
                from .hfrecords import check_literal

                check_literal(public, f"attribute {where}")  # refused now if recovery would refuse it
                check_literal(private, f"attribute {where}")
                return {"$hfconfig": [ref, public, private]}
        raise ArchitectureError(
            f"attribute {where} is a {t.__module__}.{t.__qualname__}, which an architecture record cannot hold; "
            "keep plain values (numbers, strings, tuples, dtypes, allow-listed functions) in module attributes")


def json_clean(value: Any, what: str) -> Any:
    import json

    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ArchitectureError(f"{what} is not JSON-serialisable: {e}") from None


def record(model: "nn.Module") -> dict[str, Any]:
    """The structural record of ``model`` (see the module docstring); ``ArchitectureError`` when a
    part of it cannot be recorded."""
    rec = _Recorder()
    root = rec.node(model, "")
    internal = internal_attributes()
    for node, mod, path in rec.pending:
        attrs = []
        for k, v in mod.__dict__.items():
            if k in internal:
                continue
            refusal = attribute_refusal(type(mod), k)
            if refusal is None and (k in mod._parameters or k in mod._buffers or k in mod._modules):
                refusal = "hides the module's own tensor or child of that name"
            if refusal is not None:  # recovery would refuse it: never store what cannot be read back
                raise ArchitectureError(f"attribute {_join(path, k)} {refusal}; an instance attribute of that name "
                                        "cannot be recorded (it would replace code)")
            rec.attribute = _join(path, k)
            attrs.append([k, rec.value(v, _join(path, k))])
        node["a"] = attrs
    source = None
    if rec.local:
        names = list(rec.local)
        source = {"code": capture_local([rec.local[n] for n in names]), "names": names}
    out = {"classes": rec.classes, "source": source, "root": root}
    check_depth(out, MAX_RECORD_DEPTH, "the module tree's record", ArchitectureError)
    return out


def capture_local(objs: Sequence[Any]) -> str:
    """One self-contained source for notebook classes/functions (and what they use), so every
    class of a record lives in one namespace, as it did in the notebook."""

    code = "\n\n".join(definition_source(o) for o in objs)
    first = objs[0]
    env = defining_namespace(first) if isinstance(first, type) else first.__globals__
    return capture_code(code, ", ".join(o.__name__ for o in objs), env)


# -- rebuilding ---------------------------------------------------------------------------------------
def _source_namespace(source: Mapping[str, Any], trusted: bool, subject: str, allow: str) -> dict[str, Any]:
    """Objects defined by a record's source: the running session's own definitions when their
    captured source is identical (no code runs), else the executed source — only with trust."""

    names, code = list(source["names"]), source["code"]
    for ns in session_namespaces():
        objs = [ns.get(n) for n in names]
        if all(o is not None for o in objs):
            try:
                if capture_local(objs) == code:
                    return dict(zip(names, objs))
            except ArchitectureError:
                pass
    if not trusted and not trust.is_own(code):
        raise trust.refuse(subject, [(f"definitions of {', '.join(names)}", code)], allow)
    mod = exec_source(code, names[0])
    missing = [n for n in names if n not in mod]
    if missing:
        raise ArchitectureError(f"recorded source does not define {', '.join(missing)}")
    return {n: mod[n] for n in names}


class _Where:
    """Where in a record the rebuild is (for the one error a hostile or damaged record gives)."""

    def __init__(self) -> None:
        self.module = ""
        self.item = "classes"

    def at(self, module: str, item: str) -> None:
        self.module, self.item = module, item

    def __str__(self) -> str:
        return f"module {self.module or '(root)'}, {self.item}"


def build(struct: Mapping[str, Any], *, meta: bool = False, trusted: bool = False, subject: str = "this set",
          allow: str = "trust_code=True") -> "nn.Module":
    """A module rebuilt from its structural record; no recorded constructor runs. Tensors are zeros
    (``meta=True``: meta tensors, for checking keys, shapes and dtypes without memory).

    The record is data from a store: every failure is one ``ArchitectureError`` naming where in the
    record it happened (``TrustError`` when it would run recorded source without trust)."""
    where = _Where()
    if not isinstance(struct, Mapping):
        raise ArchitectureError("structural architecture record is not a JSON object")
    check_depth(struct, MAX_RECORD_DEPTH, "structural architecture record", ArchitectureError)
    try:
        return _build(struct, meta, trusted, subject, allow, where)
    except TrustError:
        raise
    except MMError as e:
        raise ArchitectureError(f"structural record, {where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a malformed or hostile record: one error naming where it failed
        raise ArchitectureError(f"malformed structural record, {where}: {type(e).__name__}: {e}") from None


def _name(x: Any, what: str) -> str:
    """A parameter, buffer or child name: a non-empty string without dots (as nn.Module requires)."""
    if not isinstance(x, str) or not x or "." in x or len(x) > 1000:
        raise ArchitectureError(f"{what} name {str(x)[:80]!r} is not a module attribute name")
    return x


def _shape(x: Any) -> tuple[int, ...]:
    if not isinstance(x, list) or len(x) > 64 or not all(type(d) is int and 0 <= d < 2**48 for d in x):
        raise ArchitectureError(f"shape {str(x)[:80]} is not a list of sizes")
    if math.prod(x) >= 2**48:
        raise ArchitectureError(f"shape {x} declares more than 2**48 elements")
    return tuple(x)


def _dense_strides(shape: Sequence[int], strides: Any) -> tuple[int, ...]:
    """Strides that lay out exactly ``prod(shape)`` elements without gaps or overlaps (a permuted
    contiguous layout, such as a transposed weight): allocating them costs what the shape says."""
    if not isinstance(strides, list) or len(strides) != len(shape) or not all(
            type(s) is int and 0 <= s < 2**48 for s in strides):
        raise ArchitectureError(f"strides {str(strides)[:80]} do not match shape {list(shape)}")
    expected = 1
    for size, stride in sorted(((sz, st) for sz, st in zip(shape, strides) if sz > 1), key=lambda p: p[1]):
        if stride != expected:
            raise ArchitectureError(f"strides {strides} of shape {list(shape)} are not a dense layout")
        expected *= size
    return tuple(strides)


def is_dense_layout(shape: Sequence[int], strides: Sequence[int]) -> bool:
    try:
        _dense_strides(shape, list(strides))
    except ArchitectureError:
        return False
    return True


def _build(struct: Mapping[str, Any], meta: bool, trusted: bool, subject: str, allow: str,
           where: _Where) -> "nn.Module":
    import torch
    from torch import nn

    local: dict[str, Any] = {}
    if struct.get("source"):
        where.at("", "recorded source")
        local = _source_namespace(struct["source"], trusted, subject, allow)

    def klass(ref: Any) -> type[nn.Module]:
        if isinstance(ref, str) and ref.startswith("@"):
            obj = local.get(ref[1:])
            if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
                raise ArchitectureError(f"recorded class {ref[1:]!r} is not an nn.Module class")
            return obj
        return trust.module_class(ref, trusted=trusted)

    where.at("", "class list")
    if not isinstance(struct.get("classes"), list):
        raise ArchitectureError("the record has no class list")
    classes = [klass(r) for r in struct["classes"]]
    device = "meta" if meta else "cpu"
    tensors: dict[str, Any] = {}
    modules: dict[str, nn.Module] = {}
    pending: list[tuple[nn.Module, list[list[Any]], str]] = []

    def tensor(spec: list[Any], data: str | None, stride: Any) -> torch.Tensor:
        dtype, shape = torch_dtype(spec[0]), _shape(spec[1])
        strides = None if stride is None else _dense_strides(shape, stride)
        value = None if data is None or meta else _tensor_from(spec[0], shape, data, "recorded value")
        if strides is not None:  # the bytes were checked above, before anything is allocated
            out = torch.empty_strided(shape, strides, dtype=dtype, device=device)
            return out if meta else out.zero_() if value is None else out.copy_(value)
        if meta:
            return torch.empty(shape, dtype=dtype, device=device)
        return value if value is not None else torch.zeros(shape, dtype=dtype)

    def make(node: Mapping[str, Any], path: str) -> nn.Module:
        where.at(path, "class")
        if not isinstance(node, dict) or type(node.get("c")) is not int or not 0 <= node["c"] < len(classes):
            raise ArchitectureError("a module node names no recorded class")
        mod: nn.Module = object.__new__(classes[node["c"]])
        nn.Module.__init__(mod)  # bookkeeping only: the recorded class's own __init__ never runs
        modules[path] = mod
        for name, spec in node["p"]:
            key = _join(path, _name(name, "parameter"))
            where.at(path, f"parameter {name!r}")
            if spec is None:
                mod._parameters[name] = None
            elif isinstance(spec, dict):
                tied = tensors[spec["tie"]]
                if not isinstance(tied, nn.Parameter):
                    raise ArchitectureError(f"parameter {key} is tied to {spec['tie']}, which is not a parameter")
                mod._parameters[name] = tied
            else:
                p = nn.Parameter(tensor(spec, None, spec[3] if len(spec) > 3 else None), requires_grad=bool(spec[2]))
                tensors[key] = mod._parameters[name] = p
        nonpersistent = set(_name(n, "buffer") for n in node.get("np", []))
        for name, spec in node["b"]:
            key = _join(path, _name(name, "buffer"))
            where.at(path, f"buffer {name!r}")
            if spec is None:
                mod._buffers[name] = None
            elif isinstance(spec, dict):
                tied = tensors[spec["tie"]]
                if not isinstance(tied, torch.Tensor) or isinstance(tied, nn.Parameter):
                    raise ArchitectureError(f"buffer {key} is tied to {spec['tie']}, which is not a buffer")
                mod._buffers[name] = tied
            else:
                if name in nonpersistent and (len(spec) < 3 or spec[2] is None):
                    raise ArchitectureError(f"non-persistent buffer {key} has no recorded value")
                data = spec[2] if name in nonpersistent else None
                tensors[key] = mod._buffers[name] = tensor(spec, data, spec[3] if len(spec) > 3 else None)
        mod._non_persistent_buffers_set = nonpersistent
        for name, child in node["m"]:
            where.at(path, f"child {name!r}")
            _name(name, "child module")
            if child is None:
                mod._modules[name] = None
            elif "ref" in child:
                mod._modules[name] = modules[child["ref"]]
            else:
                mod._modules[name] = make(child, _join(path, name))
        mod.training = bool(node["t"])
        pending.append((mod, node.get("a", []), path))
        return mod

    def value(v: Any, at: str) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [value(x, at) for x in v]
        if not isinstance(v, dict) or len(v) != 1:
            raise ArchitectureError(f"value {str(v)[:80]} is not a recorded attribute value")
        (tag, x), = v.items()
        if tag == "$tuple":
            return tuple(value(i, at) for i in x)
        if tag == "$dict":
            return {value(k, at): value(i, at) for k, i in x}
        if tag == "$set":
            return {value(i, at) for i in x}
        if tag == "$frozenset":
            return frozenset(value(i, at) for i in x)
        if tag == "$float":
            if x not in ("nan", "inf", "-inf"):
                raise ArchitectureError(f"bad float {x!r}")
            return float(x)
        if tag == "$dtype":
            return torch_dtype(x)
        if tag == "$device":
            if not isinstance(x, str):
                raise ArchitectureError(f"bad device {x!r}")
            return torch.device(x)
        if tag == "$size":
            return torch.Size(_shape(x))
        if tag == "$ref":
            return tensors[x]
        if tag == "$module":
            return modules[x]
        if tag == "$weakref":
            if x is None:
                return None  # a dead reference comes back as None
            target = value(x, at)
            if not isinstance(target, (torch.Tensor, nn.Module)):
                raise ArchitectureError("a weak reference points at neither a tensor nor a module of the tree")
            return weakref.ref(target)
        if tag == "$tensor":  # records written before plain tensors were stored per model
            return _tensor_from(x[0], _shape(x[1]), x[2], f"attribute {at}")
        if tag == "$state":  # filled with the model's stored tensor (ModelSet / load_module_state)
            if not (isinstance(x, list) and len(x) == 3 and isinstance(x[0], str) and STATE_MARK in x[0]):
                raise ArchitectureError(f"bad state reference {str(x)[:80]}")
            return tensor([x[1], x[2]], None, None)
        if tag == "$enum":
            if not (isinstance(x, list) and len(x) == 2 and isinstance(x[1], str)):
                raise ArchitectureError(f"bad enum member {str(x)[:80]}")
            if isinstance(x[0], str) and x[0].startswith("@"):
                enum_class = local.get(x[0][1:])
                if not (isinstance(enum_class, type) and issubclass(enum_class, enum.Enum)):
                    raise ArchitectureError(f"recorded enum {x[0][1:]!r} is not defined")
            else:
                enum_class = trust.enum_class(x[0], trusted=trusted)
            member = enum_class._member_map_.get(x[1])  # by name, without running the enum's own lookups
            if member is None:
                raise ArchitectureError(f"enum {x[0]} has no member {x[1]!r}")
            return member
        if tag == "$class":
            return klass(x)
        if tag == "$fn":
            if isinstance(x, str) and x.startswith("@"):
                fn = local.get(x[1:])
                if not isinstance(fn, types.FunctionType):
                    raise ArchitectureError(f"recorded function {x[1:]!r} is not defined")
                return fn
            return trust.function(x)
        if tag == "$hfconfig":
            from .hfrecords import build_config

            return build_config(trust.config_class(x[0], trusted=trusted), x[1], x[2] if len(x) > 2 else {},
                                f"attribute {at}")
        raise ArchitectureError(f"unknown record tag {tag!r}")

    root = make(struct["root"], "")
    for mod, attrs, path in pending:
        for k, v in attrs:
            where.at(path, f"attribute {k!r}")
            refusal = attribute_refusal(type(mod), k)
            if refusal is None and (k in mod._parameters or k in mod._buffers or k in mod._modules):
                refusal = "would hide the module's own tensor or child of that name"
            if refusal is not None:
                raise ArchitectureError(f"attribute {k!r} {refusal}; a record restores data, never code")
            mod.__dict__[k] = value(v, _join(path, k))
    return root


# -- tensors held in plain attributes: per-model state -------------------------------------------------
def _tree_ids(model: "nn.Module") -> set[int]:
    ids: set[int] = set()
    for mod in model.modules():
        ids.update(id(t) for t in list(mod._parameters.values()) + list(mod._buffers.values()) if t is not None)
    return ids


def _value_tensors(value: Any, tree: set[int]) -> list["torch.Tensor"]:
    """The tensors of an attribute value that are not tensors of the module tree, in the order the
    recorder meets them (list and tuple items, dict values; dict keys and sets never hold any)."""
    import torch

    out: list[torch.Tensor] = []
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, torch.Tensor):
            if id(v) not in tree:
                out.append(v)
        elif type(v) in (list, tuple):
            todo.extend(reversed(v))
        elif type(v) in (dict, OrderedDict):
            todo.extend(reversed(list(v.values())))
    return out


def plain_tensors(model: "nn.Module") -> list["torch.Tensor"]:
    """Every tensor ``model``'s modules hold in plain attributes (not parameters or buffers)."""
    tree = _tree_ids(model)
    internal = internal_attributes()
    return [t for mod in model.modules() for k, v in mod.__dict__.items() if k not in internal
            for t in _value_tensors(v, tree)]


def attribute_states(model: "nn.Module", keys: Sequence[str]) -> list["torch.Tensor"]:
    """The tensors ``model`` holds in plain attributes, for the state ``keys`` its record names
    (``path.attribute#n``), in that order; StoreError when the model holds others."""
    if not keys:
        return []
    tree = _tree_ids(model)
    found: dict[str, list[torch.Tensor]] = {}
    out = []
    for key in keys:
        attr_path, _, n = key.rpartition(STATE_MARK)
        if attr_path not in found:
            path, _, attr = attr_path.rpartition(".")
            try:
                mod = model.get_submodule(path)
            except AttributeError:
                raise StoreError(f"the model has no module {path!r} holding state {key!r}") from None
            found[attr_path] = _value_tensors(mod.__dict__.get(attr), tree)
        tensors = found[attr_path]
        if not n.isdigit() or int(n) >= len(tensors):
            raise StoreError(f"the model holds no tensor for state {key!r}")
        out.append(tensors[int(n)])
    return out


def is_attribute_state(key: str) -> bool:
    return STATE_MARK in key


def module_state(module: "nn.Module", keys: Sequence[str]) -> dict[str, "torch.Tensor"]:
    """``module.state_dict()`` plus the tensors it holds in plain attributes under the state keys
    among ``keys`` (a stored layout's keys): what a set stores per model."""
    out = module.state_dict()
    extra = [k for k in keys if is_attribute_state(k)]
    out.update(zip(extra, attribute_states(module, extra)))
    return out


def load_module_state(module: "nn.Module", state: Mapping[str, "torch.Tensor"]) -> None:
    """``load_state_dict`` (strict) for the state-dict keys, and the attribute tensors copied in."""
    import torch

    extra = [k for k in state if is_attribute_state(k)]
    with torch.no_grad():
        module.load_state_dict({k: v for k, v in state.items() if not is_attribute_state(k)}, strict=True)
        for target, value in zip(attribute_states(module, extra), (state[k] for k in extra)):
            target.copy_(value)


def with_attribute_states(struct: Mapping[str, Any], layout: Layout, rows: list[list["torch.Tensor"]],
                          models: Sequence["nn.Module"], names: Sequence[str]) -> tuple[Layout, list[list[Any]]]:
    """The layout and rows of a set extended by the tensors its models hold in plain attributes
    (the ``$state`` places of their structural record): stored per model, like buffers."""
    keys = state_keys(struct)
    if not keys:
        return layout, rows
    clash = sorted(set(keys) & set(layout.keys))
    if clash:
        raise ArchitectureError(f"state key {clash[0]!r} of an attribute tensor is also a state-dict key")
    specs: list[TensorSpec] = []
    out = []
    for i, (model, name) in enumerate(zip(models, names)):
        tensors = [_as_storable(t, f"model {name!r} attribute state {k!r}") for k, t in zip(
            keys, attribute_states(model, keys))]
        if i == 0:
            specs = [spec_of(k, t) for k, t in zip(keys, tensors)]
        elif [spec_of(k, t) for k, t in zip(keys, tensors)] != specs:
            raise ArchitectureError(f"model {name!r} holds attribute tensors of other shapes or dtypes than model "
                                    f"{names[0]!r}; save them as separate sets")
        out.append(list(rows[i]) + tensors)
    return Layout.of(list(layout.specs) + specs), out


def state_keys(struct: Mapping[str, Any]) -> list[str]:
    """The ``$state`` keys a structural record holds (depth-first, in the record's own order)."""
    keys: list[str] = []
    todo: list[Any] = [struct.get("root")]
    while todo:
        v = todo.pop()
        if isinstance(v, dict):
            if len(v) == 1 and isinstance(v.get("$state"), list) and v["$state"]:
                keys.append(v["$state"][0])
            else:
                todo.extend(reversed(list(v.values())))
        elif isinstance(v, list):
            todo.extend(reversed(v))
    return keys


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
                    self._fail(name, f"attribute {_join(node.path, k)} is {v!r}, model {self.first_name!r} has {v0!r}")
            for k, v0 in node.other.items():
                if paths is None:
                    paths = _paths(model)
                if self._paths0 is None:
                    self._paths0 = _paths(self.first)
                if not _same(d.get(k, _MISSING), v0, paths, self._paths0):
                    self._fail(name, f"attribute {_join(node.path, k)} differs")

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
                out.setdefault(id(t), "t:" + _join(mname, k))
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
    if isinstance(a, (type, *_FUNCTION_TYPES)):
        return a is b
    configs = _hf_config_types()
    if configs and isinstance(a, configs):
        return a is b or a.to_dict() == b.to_dict()
    return a is b


# -- fast materialisation -----------------------------------------------------------------------------------
@dataclass
class _Node:
    cls: type[nn.Module]
    shared: dict[str, Any]  # immutable attribute values, shared by every copy
    deep: list[tuple[str, Any]]  # mutable attribute values, deep-copied per copy
    params: list[tuple[str, int | None]]  # slot index of each parameter (None: empty slot)
    buffers: list[tuple[str, int | None]]
    children: list[tuple[str, int | None]]  # node index of each child
    nonpersistent: frozenset[str]
    containers: tuple[type, type, type]


def _immutable(v: Any) -> bool:
    import torch

    if v is None or type(v) in (bool, int, float, str, bytes, torch.Size) or type(v) in FROZEN_RECORDS:
        return True  # e.g. an Architecture (a factory's tag): a frozen record nobody mutates
    if isinstance(v, (torch.dtype, torch.device, type, enum.Enum, *_FUNCTION_TYPES)):
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

    def __init__(self, nodes: list[_Node], slots: list[tuple["torch.Tensor", int, bool, bool]],
                 originals: list[int]) -> None:
        self.nodes = nodes
        self.slots = slots  # (template tensor, state index or -1, is parameter, requires_grad)
        self.originals = originals  # id() of the template module of each node (for the deepcopy memo)

    @classmethod
    def of(cls, template: "nn.Module", keys: Sequence[str]) -> "Cloner | None":
        """A plan for ``template`` whose state-dict keys are ``keys``; None when the module has
        anything the plan does not reproduce (hooks, slots, custom state-dict logic)."""

        from .statewalk import _plain

        index = {k: i for i, k in enumerate(keys)}
        nodes: list[_Node | None] = []
        slots: list[tuple[Any, int, bool, bool]] = []
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
            slots.append((t, k, is_param, bool(getattr(t, "requires_grad", False))))
            return slot_of[id(t)]

        def visit(mod: nn.Module, path: str) -> int:
            klass = type(mod)
            if not _plain(klass) or _hooks_of(mod) or not hasattr(mod, "__dict__") or "__slots__" in vars(klass):
                raise LookupError(path)
            node_of[id(mod)] = len(nodes)
            me = len(nodes)
            nodes.append(None)  # its place in pre-order; filled below
            np_set = frozenset(mod._non_persistent_buffers_set)
            params = [(n, None if p is None else tensor_slot(p, _join(path, n), True, True))
                      for n, p in mod._parameters.items()]
            buffers = [(n, None if b is None else tensor_slot(b, _join(path, n), False, n not in np_set))
                       for n, b in mod._buffers.items()]
            children: list[tuple[str, int | None]] = []
            for n, c in mod._modules.items():
                if c is None:
                    children.append((n, None))
                elif id(c) in node_of:
                    children.append((n, node_of[id(c)]))
                else:
                    children.append((n, visit(c, _join(path, n))))
            shared: dict[str, Any] = {k: v for k, v in _fresh_bookkeeping() if not isinstance(v, type)}
            shared["training"] = False
            deep: list[tuple[str, Any]] = []
            for k, v in mod.__dict__.items():
                if k in internal:
                    continue
                if _immutable(v):
                    shared[k] = v
                else:
                    deep.append((k, v))
            nodes[me] = _Node(klass, shared, deep, params, buffers, children, np_set,
                              (type(mod._parameters), type(mod._buffers), type(mod._modules)))
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
        """A fresh module in eval mode holding copies of ``state`` (tensors in key order)."""
        import torch
        from torch import nn

        memo: dict[int, Any] = {}
        new_slots = []
        for t, k, is_param, grad in self.slots:
            src = (state[k] if k >= 0 else t).detach()
            if t.is_contiguous():
                data = src.clone()
            else:  # keep the template's memory layout: it changes float rounding in matmuls
                data = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype).copy_(src)
            obj = nn.Parameter(data, requires_grad=grad) if is_param else data
            memo[id(t)] = obj
            new_slots.append(obj)
        mods = [object.__new__(n.cls) for n in self.nodes]
        for i, mod_id in enumerate(self.originals):
            memo[mod_id] = mods[i]
        containers = _fresh_containers()
        for mod, node in zip(mods, self.nodes):
            d = dict(node.shared)  # attributes and the scalar bookkeeping
            d.update({k: kind() for k, kind in containers})  # empty hook registries of its own
            pc, bc, mc = node.containers
            d["_parameters"] = pc((n, None if s is None else new_slots[s]) for n, s in node.params)
            d["_buffers"] = bc((n, None if s is None else new_slots[s]) for n, s in node.buffers)
            d["_non_persistent_buffers_set"] = set(node.nonpersistent)
            d["_modules"] = mc((n, None if c is None else mods[c]) for n, c in node.children)
            for name, v in node.deep:
                d[name] = _copy_value(v, memo)
            object.__setattr__(mod, "__dict__", d)
        return mods[0]


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
