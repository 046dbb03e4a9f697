"""Encoding a module tree as a structural record (the format is in ``structure.py``)."""
from __future__ import annotations

import enum
import math
import types
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ..errors import ArchitectureError, a_type
from . import trust
from .limits import MAX_RECORD_DEPTH, check_depth
from .sourcecode import ref_of
from .tensors import _as_storable

if TYPE_CHECKING:
    from torch import nn


import json

from .hfrecords import check_literal
from .statewalk import FUNCTION_TYPES, TAG, hf_config_types, hooks_of, internal_attributes, join_path
from .structure import (
    STATE_MARK,
    attribute_refusal,
    capture_local,
    dtype_name,
    is_dense_layout,
    tensor_bytes,
)


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
        hooks = hooks_of(mod)
        if hooks:
            raise ArchitectureError(
                f"{where} ({type(mod).__name__}) has hooks registered ({', '.join(hooks)}); hooks are code and "
                "cannot be recorded — remove them before saving (or build the models with an @mm.architecture factory)")
        self.modules[id(mod)] = path
        node: dict[str, Any] = {"c": self.cls(type(mod), where), "t": bool(mod.training)}
        params: list[list[Any]] = []
        for name, p in mod._parameters.items():
            key = join_path(path, name)
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
                spec = [dtype_name(p, f"parameter {key}"), list(p.shape), bool(p.requires_grad)]
                if not p.is_contiguous() and is_dense_layout(p.shape, p.stride()):
                    spec.append(list(p.stride()))  # a permuted layout; a gapped view is rebuilt contiguous
                params.append([name, spec])
        buffers: list[list[Any]] = []
        nonpersistent = mod._non_persistent_buffers_set
        for name, b in mod._buffers.items():
            key = join_path(path, name)
            if b is None:
                buffers.append([name, None])
            elif id(b) in self.paths:
                buffers.append([name, {"tie": self.paths[id(b)]}])
            else:
                self.paths[id(b)] = key
                spec = [dtype_name(b, f"buffer {key}"), list(b.shape)]
                if name in nonpersistent:  # not in the state dict: its value is part of the architecture
                    spec.append(tensor_bytes(b, f"non-persistent buffer {key}"))
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
                children.append([name, self.node(child, join_path(path, name))])
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
            return {"$state": [key, dtype_name(v, f"attribute {where}"), list(v.shape)]}
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
        if isinstance(v, FUNCTION_TYPES):
            ref = trust.function_ref(v)
            if ref is not None:
                trust.function(ref)  # refused now, at save, if recovery would refuse it
                return {"$fn": ref}
            if isinstance(v, types.FunctionType) and v.__module__ == "__main__":
                return {"$fn": self._local(v, f"attribute {where}")}
            raise ArchitectureError(
                f"attribute {where} is the function {getattr(v, '__qualname__', v)!r}, which cannot be recorded "
                "(a lambda or nested function); use a module-level function or an nn.Module")
        configs = hf_config_types()
        if configs and isinstance(v, configs):
            ref = ref_of(t)
            if ref is not None:
                public = json_clean(v.to_dict(), f"attribute {where}")
                # settings chosen at model creation (e.g. the attention kernel) live in private
                # attributes that to_dict() leaves out; they change what the model computes
                private = {k: x for k, x in vars(v).items()
                           if k.startswith("_") and not k.startswith("__") and k not in public
                           and (x is None or type(x) in (bool, int, float, str))}

                check_literal(public, f"attribute {where}")  # refused now if recovery would refuse it
                check_literal(private, f"attribute {where}")
                return {"$hfconfig": [ref, public, private]}
        raise ArchitectureError(
            f"attribute {where} is a {t.__module__}.{t.__qualname__}, which an architecture record cannot hold; "
            "keep plain values (numbers, strings, tuples, dtypes, allow-listed functions) in module attributes")


def json_clean(value: Any, what: str) -> Any:

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
            if k in internal or k == TAG:  # (which factory built it: not part of what it is)
                continue
            refusal = attribute_refusal(type(mod), k)
            if refusal is None and (k in mod._parameters or k in mod._buffers or k in mod._modules):
                refusal = "hides the module's own tensor or child of that name"
            if refusal is not None:  # recovery would refuse it: never store what cannot be read back
                raise ArchitectureError(f"attribute {join_path(path, k)} {refusal}; an instance attribute of that name "
                                        "cannot be recorded (it would replace code)")
            rec.attribute = join_path(path, k)
            attrs.append([k, rec.value(v, join_path(path, k))])
        node["a"] = attrs
    source = None
    if rec.local:
        names = list(rec.local)
        source = {"code": capture_local([rec.local[n] for n in names]), "names": names}
    out = {"classes": rec.classes, "source": source, "root": root}
    check_depth(out, MAX_RECORD_DEPTH, "the module tree's record", ArchitectureError)
    return out
