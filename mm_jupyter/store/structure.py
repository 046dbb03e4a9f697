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

This module holds the format's shared rules and the per-model state of plain attributes; the four
jobs on a record are one module each: ``structure_encode`` (record a module), ``structure_decode``
(rebuild one), ``statewalk`` (every model of a set has the first one's tree, checked while its tensors are read) and
``structure_clone`` (materialise many models from one rebuilt template).
"""
from __future__ import annotations

import base64
import functools
import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import ArchitectureError, StoreError
from .sourcecode import capture_code, defining_namespace, definition_source
from .statewalk import internal_attributes
from .tensors import Layout, TensorSpec, _as_storable, spec_of, torch_dtype

if TYPE_CHECKING:
    import torch
    from torch import nn


#: A non-persistent buffer is recorded by value (in the record) up to this size.
MAX_INLINE_BYTES = 1 << 20
#: Separates an attribute's path from the position of a tensor in its value in a state key
#: (``stages.2.attn.attention_bias_cache#0``): tensors held in plain attributes are stored per model
#: under such keys, after the state dict's own (which never hold it).
STATE_MARK = "#"
_KEEP = ("training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_modules")


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
def fresh_containers() -> tuple[tuple[str, type], ...]:
    return tuple((k, v) for k, v in fresh_bookkeeping() if isinstance(v, type))


@functools.lru_cache(maxsize=1)
def fresh_bookkeeping() -> tuple[tuple[str, Any], ...]:
    """(name, empty container type or scalar) for the hook registries of a fresh module."""
    from torch import nn

    return tuple((k, type(v) if isinstance(v, (dict, set)) else v)
                 for k, v in nn.Module().__dict__.items() if k not in _KEEP)


def dtype_name(t: "torch.Tensor", where: str) -> str:
    name = str(t.dtype).removeprefix("torch.")
    try:
        torch_dtype(name)
    except StoreError:
        raise ArchitectureError(f"{where} has dtype {t.dtype}, which the store cannot hold") from None
    return name


def tensor_bytes(t: "torch.Tensor", where: str) -> str:
    import torch

    t = t.detach().cpu().contiguous()
    nbytes = t.numel() * t.element_size()
    if nbytes > MAX_INLINE_BYTES:
        raise ArchitectureError(
            f"{where} is a tensor of {nbytes} bytes outside the state dict; register it as a "
            "persistent buffer (module.register_buffer) so it is stored with the parameters")
    return base64.b64encode(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"").decode()


def tensor_from(dtype: str, shape: Sequence[int], data: str, where: str) -> "torch.Tensor":
    import torch

    dt = torch_dtype(dtype)
    raw = base64.b64decode(data.encode(), validate=True)
    n = math.prod(shape) if shape else 1
    if len(raw) != n * dt.itemsize:
        raise ArchitectureError(f"{where}: recorded tensor bytes do not match dtype {dtype} and shape {list(shape)}")
    if not raw:
        return torch.empty(tuple(shape), dtype=dt)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt).reshape(tuple(shape)).clone()


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


def dense_strides(shape: Sequence[int], strides: Any) -> tuple[int, ...]:
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
        dense_strides(shape, list(strides))
    except ArchitectureError:
        return False
    return True


def capture_local(objs: Sequence[Any]) -> str:
    """One self-contained source for notebook classes/functions (and what they use), so every
    class of a record lives in one namespace, as it did in the notebook."""

    code = "\n\n".join(definition_source(o) for o in objs)
    first = objs[0]
    env = defining_namespace(first) if isinstance(first, type) else first.__globals__
    return capture_code(code, ", ".join(o.__name__ for o in objs), env)
