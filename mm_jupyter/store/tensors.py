"""State dicts as raw little-endian bytes: specs, the set layout, copying and per-tensor digests.

A set's parameters are stored model-major: model ``i`` occupies bytes ``[i*stride, (i+1)*stride)``
and key ``k`` sits at ``offsets[k]`` inside that record, each key aligned to its element size, so
one model is one contiguous range (partial reads) and each key of all models is one strided view.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import IntegrityError, StoreError, a_type
from .limits import loads
from .statewalk import SetWalk

if TYPE_CHECKING:
    import torch
    from torch import nn

DIGEST_BYTES = 16

#: Bytes per element of every dtype a store holds (known without importing torch: listing a
#: store's versions reads layouts, and the JupyterLab server never imports torch).
_ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "complex128": 16, "complex64": 8,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
}
_DTYPE_NAMES = list(_ITEMSIZE)


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    dt: torch.dtype | None = getattr(torch, name, None) if name in _DTYPE_NAMES else None
    if dt is None:
        raise StoreError(f"unsupported dtype {name!r}")
    return dt


def dtype_name(dtype: "torch.dtype") -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise StoreError(f"tensors of dtype {dtype} cannot be stored")
    return name


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one state-dict entry."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        size = _ITEMSIZE.get(self.dtype)
        if size is None:
            raise StoreError(f"unsupported dtype {self.dtype!r}")
        return size

    @property
    def numel(self) -> int:
        return math.prod(self.shape)  # exact Python ints (shapes are checked ints), 1 for a scalar

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class Layout:
    """Where each key of each model lives in a model-major parameter object."""

    specs: tuple[TensorSpec, ...]
    offsets: tuple[int, ...]
    stride: int

    @classmethod
    def of(cls, specs: Sequence[TensorSpec]) -> "Layout":
        offsets, pos, widest = [], 0, 1
        for s in specs:
            size = s.itemsize
            widest = max(widest, size)
            pos = -(-pos // size) * size
            offsets.append(pos)
            pos += s.nbytes
        stride = -(-pos // widest) * widest
        return cls(tuple(specs), tuple(offsets), stride)

    @property
    def keys(self) -> list[str]:
        return [s.name for s in self.specs]

    def to_json(self) -> dict[str, Any]:
        return {"keys": [[s.name, s.dtype, list(s.shape)] for s in self.specs]}

    @classmethod
    def from_json(cls, data: Any) -> "Layout":
        """A layout as recorded in a manifest; IntegrityError unless every entry is a distinct key,
        a stored dtype and a shape of at most 2**48 bytes."""
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, list):
            raise IntegrityError("a layout lists no keys")
        specs = []
        for entry in keys:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and isinstance(entry[1], str) and entry[1] in _DTYPE_NAMES and isinstance(entry[2], list)
                    and len(entry[2]) <= 64 and all(type(d) is int and 0 <= d < 2**48 for d in entry[2])):
                raise IntegrityError(f"layout entry {str(entry)[:80]} is not [key, dtype, shape]")
            spec = TensorSpec(entry[0], entry[1], tuple(entry[2]))
            if math.prod(spec.shape) * spec.itemsize >= 2**48:
                raise IntegrityError(f"layout entry {entry[0]!r} declares more than 2**48 bytes")
            specs.append(spec)
        if len({s.name for s in specs}) != len(specs):
            raise IntegrityError("a layout names a key twice")
        return cls.of(specs)

    def signature(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        return tuple((s.name, s.dtype, s.shape) for s in self.specs)


def match_dtypes(module: "nn.Module", layout: Layout) -> None:
    """Give a freshly built module the stored dtypes (e.g. a set saved after ``.half()``), keeping
    tied parameters tied (the Parameter objects stay the same, only their data changes)."""
    want = {s.name: torch_dtype(s.dtype) for s in layout.specs}
    seen: set[int] = set()
    for name, t in list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    ):
        dt = want.get(name)
        if dt is None or t.dtype == dt or id(t) in seen:
            continue
        seen.add(id(t))
        t.data = t.data.to(dt)


def layout_mismatch(state: Mapping[str, "torch.Tensor"], layout: Layout) -> str | None:
    """The first entry of a module's ``state`` (``structure.module_state``) whose key, shape or dtype
    differs from ``layout`` (None: they agree), as ``"'key' [shape] dtype, where ... have ..."``."""
    got = [(k, tuple(int(x) for x in v.shape), dtype_name(v.dtype)) for k, v in state.items()]
    want = [(s.name, s.shape, s.dtype) for s in layout.specs]
    if got == want:
        return None
    for g, w in zip(got, want):
        if g != w:
            return f"{g[0]!r} {list(g[1])} {g[2]}, where the stored tensors have {w[0]!r} {list(w[1])} {w[2]}"
    if len(got) > len(want):
        return f"{got[len(want)][0]!r}, which the stored tensors lack"
    return f"no {want[len(got)][0]!r}, which the stored tensors have"


def _as_storable(t: "torch.Tensor", where: str) -> "torch.Tensor":
    """A CPU, contiguous, plain-layout tensor with the same bytes as ``t``."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise StoreError(f"{where} is {a_type(t)}, not a tensor")
    if t.layout != torch.strided:
        raise StoreError(f"{where} has layout {t.layout}; only dense tensors can be stored")
    if t.is_quantized:
        raise StoreError(f"{where} is quantized; quantized tensors cannot be stored")
    if t.device.type == "meta":
        raise StoreError(f"{where} is on the meta device and has no data")
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.detach()


def spec_of(name: str, t: "torch.Tensor") -> TensorSpec:
    return TensorSpec(name, dtype_name(t.dtype), tuple(int(x) for x in t.shape))


def extract_states(models: Sequence["nn.Module"], names: Sequence[str]) -> tuple[Layout, list[list["torch.Tensor"]]]:
    """State dicts of all models as tensor lists in one shared key order (that of ``state_dict``).

    Raises StoreError naming the first model and key that differ from the first model, before
    anything is written. Models built the same way take the fast path of ``SetWalk``.
    """
    layout, rows, _ = extract_set(models, names, structure=False)
    return layout, rows


def extract_set(models: Sequence["nn.Module"], names: Sequence[str], structure: bool, factory: bool = False
                ) -> tuple[Layout, list[list["torch.Tensor"]], SetWalk]:
    """``extract_states`` and, with ``structure``, in the same walk the check that every model has
    the first model's module tree and attribute values (compared for a factory record with ``factory``): the
    walk's ``difference`` is the message of the first model that has not (None: all have), for the
    caller to raise where the architecture is settled; differences in the state raise StoreError
    here, as ``extract_states``."""
    import torch

    if sys.byteorder != "little":
        raise StoreError("the store writes little-endian bytes; this machine is big-endian")
    if not models:
        raise StoreError("a set needs at least one model")
    if not isinstance(models[0], torch.nn.Module):
        raise StoreError(f"model {names[0]!r} is {a_type(models[0])}, not a torch.nn.Module")
    sd0 = models[0].state_dict()
    first = [_as_storable(t, f"model {names[0]!r} key {k!r}") for k, t in sd0.items()]
    layout = Layout.of([spec_of(k, t) for k, t in zip(sd0.keys(), first)])
    walk = SetWalk(models[0], names[0], structure=structure, factory=factory, keys=layout.keys,
                   expect=[(torch_dtype(s.dtype), torch.Size(s.shape)) for s in layout.specs])
    out: list[list[torch.Tensor]] = [first]
    for model, mname in zip(models[1:], names[1:]):
        if not isinstance(model, torch.nn.Module):
            raise StoreError(f"model {mname!r} is {a_type(model)}, not a torch.nn.Module")
        row = walk.walk(model, mname)
        out.append(row if row is not None else _checked_row(model, mname, names[0], layout))
    return layout, out, walk


def _checked_row(model: "nn.Module", mname: str, first_name: str, layout: Layout) -> list["torch.Tensor"]:
    """One model's tensors via ``state_dict()``, checked against the layout of the first model."""
    sd = model.state_dict()
    if list(sd.keys()) != layout.keys:
        missing = [k for k in layout.keys if k not in sd]
        extra = [k for k in sd if k not in layout.keys]
        what = f"lacks key {missing[0]!r}" if missing else (
            f"has extra key {extra[0]!r}" if extra else "orders its keys differently")
        raise StoreError(
            f"all models of a set must share one architecture: model {mname!r} {what} "
            f"(compared with model {first_name!r})"
        )
    row = []
    for spec, (k, t) in zip(layout.specs, sd.items()):
        t = _as_storable(t, f"model {mname!r} key {k!r}")
        if tuple(t.shape) != spec.shape or dtype_name(t.dtype) != spec.dtype:
            raise StoreError(
                f"all models of a set must share one architecture: model {mname!r} key {k!r} is "
                f"{dtype_name(t.dtype)}{list(t.shape)}, model {first_name!r} has {spec.dtype}{list(spec.shape)}"
            )
        row.append(t)
    return row


def _addr(t: "torch.Tensor") -> int:
    return t.data_ptr()


def fill_model_major(dst: "torch.Tensor", layout: Layout, rows: Sequence[Sequence["torch.Tensor"]],
                     progress: Callable[[int], None] | None = None) -> None:
    """Copy every model's tensors into ``dst`` (uint8, len(rows) * stride bytes), model-major;
    ``progress(bytes_done)`` is called every 256 models."""
    base = _addr(dst)
    stride, offsets = layout.stride, layout.offsets
    pairs = [(off, s.nbytes) for off, s in zip(offsets, layout.specs)]
    memmove = ctypes.memmove
    for i, row in enumerate(rows):
        at = base + i * stride
        for t, (off, n) in zip(row, pairs):
            if n:
                memmove(at + off, t.data_ptr(), n)
        if progress is not None and i % 256 == 255:
            progress((i + 1) * stride)


def fill_key_major(dst: "torch.Tensor", layout: Layout, rows: Sequence[Sequence["torch.Tensor"]],
                   changed: np.ndarray) -> None:
    """Copy the changed (model, key) tensors into ``dst`` key by key (each key's changed models
    back to back)."""
    base = _addr(dst)
    memmove = ctypes.memmove
    pos = 0
    for k, spec in enumerate(layout.specs):
        n = spec.nbytes
        for i in np.flatnonzero(changed[:, k]).tolist():
            if n:
                memmove(base + pos, rows[i][k].data_ptr(), n)
            pos += n


def key_major_size(layout: Layout, changed: np.ndarray) -> int:
    return int(sum(int(changed[:, k].sum()) * s.nbytes for k, s in enumerate(layout.specs)))


def digest_rows(rows: Sequence[Sequence["torch.Tensor"]], layout: Layout) -> np.ndarray:
    """Per-tensor digests, shape (models, keys, 16) uint8: what ``update`` compares.

    Each tensor is hashed straight from its memory (one C call per tensor, no views or numpy
    wrappers: those were 80 % of the time for small tensors); the rows are what
    ``extract_states`` returns, dense contiguous CPU tensors of the layout's sizes, so
    ``data_ptr() .. + nbytes`` is exactly the tensor's bytes. Equal to ``tensor_digest`` (tested).
    """
    sizes = [s.nbytes for s in layout.specs]
    views = {n: ctypes.c_char * n for n in set(sizes) if n}
    empty = hashlib.sha256(b"").digest()[:DIGEST_BYTES]
    sha = hashlib.sha256
    out = bytearray()
    add = out.extend
    for row in rows:
        if len(row) != len(sizes):
            raise StoreError(f"a row of {len(row)} tensors does not fit a layout of {len(sizes)} keys")
        for t, n in zip(row, sizes):
            add(sha(views[n].from_address(t.data_ptr())).digest()[:DIGEST_BYTES] if n else empty)
    return np.frombuffer(out, dtype=np.uint8).reshape(len(rows), len(sizes), DIGEST_BYTES)


def tensor_digest(t: "torch.Tensor") -> bytes:
    import torch

    if t.numel() == 0:
        return hashlib.sha256(b"").digest()[:DIGEST_BYTES]
    raw = t.detach().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(raw.data).digest()[:DIGEST_BYTES]


def digest_model_major(buf: "torch.Tensor", layout: Layout, n: int) -> np.ndarray:
    """Per-tensor digests computed from a model-major buffer (e.g. a stored baseline object)."""
    raw = buf.numpy()
    out = np.empty((n, len(layout.specs), DIGEST_BYTES), dtype=np.uint8)
    empty = hashlib.sha256(b"").digest()[:DIGEST_BYTES]
    sha = hashlib.sha256
    for i in range(n):
        at = i * layout.stride
        for k, (spec, off) in enumerate(zip(layout.specs, layout.offsets)):
            nb = spec.nbytes
            d = sha(raw[at + off : at + off + nb].data).digest()[:DIGEST_BYTES] if nb else empty
            out[i, k] = np.frombuffer(d, dtype=np.uint8)
    return out


def view_tensor(raw: "torch.Tensor", spec: TensorSpec) -> "torch.Tensor":
    """Interpret ``raw`` (uint8, exactly spec.nbytes) as the spec's tensor, zero-copy."""
    import torch

    dt = torch_dtype(spec.dtype)
    if spec.nbytes == 0:
        return torch.empty(spec.shape, dtype=dt)
    return raw.view(dt).view(spec.shape)


# -- small binary arrays (digests, masks, indices) without pickle ---------------------------------
def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays as one blob: u32 header length, JSON header, then each array's raw bytes."""
    header, blobs, pos = {}, [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        header[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": pos}
        raw = a.tobytes()
        blobs.append(raw)
        pos += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    return len(head).to_bytes(4, "little") + head + b"".join(blobs)


#: The array dtypes an index object may hold (what ``pack_arrays`` writes: no objects, no structs).
_ARRAY_KINDS = "biuf"


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    """Views of the arrays of a ``pack_arrays`` blob; IntegrityError when the header is malformed or
    declares more bytes than the blob holds (nothing is allocated: the arrays view ``blob``)."""
    n = int.from_bytes(blob[:4], "little")
    if len(blob) < 4 or n > len(blob) - 4:
        raise IntegrityError("an index object's header is cut off")
    header = loads(blob[4 : 4 + n], "an index object's header", limit=4)
    body = memoryview(blob)[4 + n :]
    if not isinstance(header, dict):
        raise IntegrityError("an index object's header is not an object")
    out = {}
    for name, h in header.items():
        try:
            dt = np.dtype(h["dtype"]) if isinstance(h, dict) and isinstance(h.get("dtype"), str) else None
        except TypeError:
            dt = None
        shape, offset = (h.get("shape"), h.get("offset")) if isinstance(h, dict) else (None, None)
        if dt is None or dt.kind not in _ARRAY_KINDS or dt.hasobject or not isinstance(shape, list) or not all(
                type(d) is int and d >= 0 for d in shape) or type(offset) is not int or offset < 0:
            raise IntegrityError(f"array {str(name)[:40]!r} of an index object is malformed")
        count = math.prod(shape)
        if offset + count * dt.itemsize > len(body):
            raise IntegrityError(f"array {name!r} of an index object declares more bytes than it holds")
        out[name] = np.frombuffer(body, dtype=dt, count=count, offset=offset).reshape(shape)
    return out
