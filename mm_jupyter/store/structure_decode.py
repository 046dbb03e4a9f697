"""Decoding a structural record: rebuilding the module tree without running any constructor of the
recorded classes (the format is in ``structure.py``)."""
from __future__ import annotations

import enum
import math
import types
import weakref
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import ArchitectureError, MMError, TrustError
from . import trust
from .consistency import check_consistent
from .limits import MAX_RECORD_DEPTH, check_depth
from .sourcecode import exec_source, session_namespaces
from .tensors import torch_dtype

if TYPE_CHECKING:
    import torch
    from torch import nn


from .hfrecords import build_config
from .statewalk import join_path
from .structure import STATE_MARK, attribute_refusal, capture_local, dense_strides, tensor_from


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
        strides = None if stride is None else dense_strides(shape, stride)
        value = None if data is None or meta else tensor_from(spec[0], shape, data, "recorded value")
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
            key = join_path(path, _name(name, "parameter"))
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
            key = join_path(path, _name(name, "buffer"))
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
                mod._modules[name] = make(child, join_path(path, name))
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
            return tensor_from(x[0], _shape(x[1]), x[2], f"attribute {at}")
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
            mod.__dict__[k] = value(v, join_path(path, k))
    check_consistent(root)
    return root
