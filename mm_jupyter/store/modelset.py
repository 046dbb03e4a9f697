"""ModelSet: a recovered set whose models materialise lazily from memory-mapped, verified objects.

A recovered version is *resolved* into two arrays, ``obj[i, k]`` and ``off[i, k]``: which object and
which byte offset hold tensor ``k`` of model ``i``. ``ms.state_dict(i)`` reads just those ranges
(verifying only the chunks they touch); ``ms[i]`` builds one module; ``ms.state_dicts()`` makes
every parameter usable with one vectorised gather per key and object.
"""
from __future__ import annotations

import contextlib
import copy
import gc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from ..errors import MMError, RecoveryError, StoreError, TrustError
from .architectures import Architecture
from .contracts import ObjectArea, Reader
from .structure import load_module_state
from .structure_clone import make_cloner
from .tensors import Layout, TensorSpec, match_dtypes, torch_dtype, view_tensor

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class SetRef:
    """Identifies one stored set version."""

    id: int
    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class ObjectShape:
    """How entries sit in one object: model-major rows or key-major blocks."""

    oid: str
    kind: str  # "rows" (model-major, `stride` bytes per model) or "blocks" (key-major)
    stride: int = 0
    rows: int = 0
    starts: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)


@dataclass
class Resolved:
    """Where every tensor of every model of a version lives."""

    names: list[str]
    layout: Layout
    architecture: Architecture
    objects: list[ObjectShape]
    obj: np.ndarray  # (n, K) int32 index into objects; -1 = held in `memory`
    off: np.ndarray  # (n, K) int64 byte offset inside that object
    memory: dict[int, list["torch.Tensor"]] = field(default_factory=dict)
    digests: np.ndarray | None = None  # (n, K, 16) when known

    @property
    def n(self) -> int:
        return len(self.names)


def default_names(n: int) -> list[str]:
    return [str(i) for i in range(n)]


_ITER_MODELS = 256  # iteration makes at most this many models at once ...
_ITER_BYTES = 4 << 20  # ... holding together at most about this many bytes of tensors


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (restored only if it was on: nesting and another
    thread's pause stay correct). For library code that creates many objects and runs no user code."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class ModelSet:
    """A recovered set of same-architecture models. Nothing is read until asked for."""

    def __init__(self, ref: SetRef, approach: str, resolved: Resolved, objects: ObjectArea,
                 trust_code: bool = False) -> None:
        self.ref = ref
        self.approach = approach
        self.trust_code = trust_code
        self._r = resolved
        self._objects = objects
        self._readers: dict[str, Reader] = {}
        self._index = {name: i for i, name in enumerate(resolved.names)}
        self._template: "nn.Module | None" = None
        self._make: "Callable[[Sequence[torch.Tensor]], nn.Module] | None" = None
        self._stacked: dict[int, "torch.Tensor"] = {}

    # -- basic protocol -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._r.n

    @property
    def names(self) -> list[str]:
        return list(self._r.names)

    @property
    def layout(self) -> Layout:
        return self._r.layout

    @property
    def architecture(self) -> Architecture:
        return self._r.architecture

    def __repr__(self) -> str:
        return f"ModelSet({self.ref}, approach={self.approach!r}, models={len(self)})"

    def _pos(self, item: int | str) -> int:
        if isinstance(item, str):
            if item not in self._index:
                raise StoreError(f"set {self.ref} has no model named {item!r}")
            return self._index[item]
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            i = int(item)
            if not -len(self) <= i < len(self):
                raise StoreError(f"model index {i} is out of range for set {self.ref} of {len(self)} models")
            return i % len(self)
        raise StoreError(f"models are addressed by index or name, not {type(item).__name__}")

    def __getitem__(self, item: int | str) -> "nn.Module":
        return self.model(item)

    def __iter__(self) -> Iterator["nn.Module"]:
        """Every model in order. Once the set is loaded, models are made a few at a time (about
        ``_ITER_BYTES`` of tensors, so a break wastes little) with the cyclic garbage collector
        paused while they are made: a list of thousands of small models otherwise spends more time
        in collections traversing the new models than in making them."""
        n, keys = len(self), len(self._r.layout.specs)
        chunk = max(1, min(_ITER_MODELS, _ITER_BYTES // max(1, sum(s.nbytes for s in self._r.layout.specs))))
        i = 0
        while i < n:
            if self._make is None or len(self._stacked) < keys:
                yield self.model(i)  # builds the template; not loaded: reads each model's bytes
                i += 1
                continue
            hi = min(n, i + chunk)
            cols = [self._stacked[k][i:hi].unbind(0) for k in range(keys)]  # one call per key
            make = self._make
            with gc_paused():
                batch = [make(state) for state in zip(*cols)]
            batch.reverse()
            while batch:
                yield batch.pop()  # the set keeps no reference to a model it handed out
            i = hi

    # -- tensors ---------------------------------------------------------------------------------
    def _reader(self, o: int) -> Reader:
        oid = self._r.objects[o].oid
        reader = self._readers.get(oid)
        if reader is None:
            reader = self._readers[oid] = self._objects.open(oid)
        return reader

    def state_dict(self, item: int | str) -> dict[str, "torch.Tensor"]:
        """Model ``item``'s tensors without building a module; reads only that model's bytes.

        The tensors view a private copy-on-write mapping: changing them never touches the store.
        """
        i = self._pos(item)
        if self._stacked and len(self._stacked) == len(self._r.layout.specs):
            return {s.name: self._stacked[k][i] for k, s in enumerate(self._r.layout.specs)}
        out = {}
        mem = self._r.memory.get(i)
        for k, spec in enumerate(self._r.layout.specs):
            o = int(self._r.obj[i, k])
            if o < 0:
                assert mem is not None
                out[spec.name] = mem[k]
            else:
                raw = self._reader(o).tensor(int(self._r.off[i, k]), spec.nbytes)
                out[spec.name] = view_tensor(raw, spec)
        return out

    def stacked(self, key: str | int) -> "torch.Tensor":
        """Tensor ``key`` of all models as one (models, *shape) tensor (a view when possible)."""
        keys = self._r.layout.keys
        if isinstance(key, str) and key in keys:
            k = keys.index(key)
        elif isinstance(key, (int, np.integer)) and not isinstance(key, bool) and -len(keys) <= key < len(keys):
            k = int(key) % len(keys)
        else:
            shown = ", ".join(repr(x) for x in keys[:8]) + (", ..." if len(keys) > 8 else "")
            raise StoreError(f"set {self.ref} has no tensor {key!r}; its keys are {shown} (or their indices "
                             f"0..{len(keys) - 1})")
        if k not in self._stacked:
            self._stacked[k] = self._gather(k)
        return self._stacked[k]

    def state_dicts(self) -> list[dict[str, "torch.Tensor"]]:
        """Every model's state dict: all parameters verified and usable."""
        for k in range(len(self._r.layout.specs)):
            self.stacked(k)
        return [self.state_dict(i) for i in range(len(self))]

    def load(self) -> "ModelSet":
        """Verify and map every parameter now (what time-to-recover measures)."""
        for k in range(len(self._r.layout.specs)):
            self.stacked(k)
        return self

    def _block(self, o: int, k: int, spec: TensorSpec) -> "torch.Tensor":
        """The (entries, nbytes) uint8 view of key ``k`` inside object ``o``; verifies it."""
        shape = self._r.objects[o]
        reader = self._reader(o)
        nb = spec.nbytes
        if shape.kind == "rows":
            payload = reader.tensor(0, shape.rows * shape.stride)
            key_off = self._r.layout.offsets[k] if shape.stride == self._r.layout.stride else None
            if key_off is None:
                raise StoreError(f"object {shape.oid[:12]}… has a layout that does not match its set")
            return payload.view(shape.rows, shape.stride)[:, key_off : key_off + nb]
        start, count = shape.starts[k], shape.counts[k]
        return reader.tensor(start, count * nb).view(count, nb)

    def _gather(self, k: int) -> "torch.Tensor":
        """All models' tensor ``k``: a zero-copy view when one object holds them in order,
        otherwise one bulk copy of the main source plus indexed row copies of the others."""
        import torch

        spec = self._r.layout.specs[k]
        n, nb = len(self), spec.nbytes
        dt = torch_dtype(spec.dtype)
        if nb == 0:
            return torch.empty((n, *spec.shape), dtype=dt)
        col_obj = self._r.obj[:, k]
        col_off = self._r.off[:, k]
        used, counts = np.unique(col_obj, return_counts=True)
        # copy as machine words of the element size: bit-exact (no float arithmetic) and fast
        word = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(spec.itemsize, torch.int64)
        width = nb // word.itemsize

        def rows_of(o: int, sel: np.ndarray) -> tuple["torch.Tensor", np.ndarray]:
            shape = self._r.objects[o]
            block = self._block(o, k, spec).view(word)
            step = shape.stride if shape.kind == "rows" else nb
            first = self._r.layout.offsets[k] if shape.kind == "rows" else shape.starts[k]
            return block, (col_off[sel] - first) // step

        out = None
        order = np.argsort(-counts, kind="stable")
        for pos in order:
            o = int(used[pos])
            sel = np.flatnonzero(col_obj == o)
            if o < 0:
                if out is None:
                    out = torch.empty((n, width), dtype=word)
                for i in sel:
                    out[i] = self._r.memory[int(i)][k].reshape(-1).view(torch.uint8).view(word)
                continue
            block, rows = rows_of(o, sel)
            identity = len(sel) == n and block.shape[0] == n and np.array_equal(rows, np.arange(n))
            if out is None and identity:
                return block.view(torch.uint8).view(dt).view((n, *spec.shape))
            if out is None:
                out = torch.empty((n, width), dtype=word)
                if block.shape[0] == n and np.array_equal(rows, sel):
                    out.copy_(block)  # bulk copy; rows owned by other objects are overwritten below
                    continue
            if np.array_equal(rows, sel) and block.shape[0] == n:
                idx = torch.from_numpy(sel)
                out[idx] = block[idx]
            else:
                out[torch.from_numpy(sel)] = block[torch.from_numpy(rows)]
        assert out is not None
        return out.view(torch.uint8).view(dt).view((n, *spec.shape))

    # -- modules ---------------------------------------------------------------------------------
    def model(self, item: int | str) -> "nn.Module":
        """Build model ``item`` as a fresh module (eval mode) holding its own copy of the parameters.
        Each parameter's ``requires_grad`` is the record's: a structural record's is the first saved
        model's, a factory or Hugging Face record's what it builds. Training flags and per-model
        freezing are not recorded: a layer frozen in only some models is frozen again by the caller.

        The architecture is built once per set (recorded code runs only if the set's store is
        trusted, see :mod:`.trust`); every model is then a compiled copy of that template.
        """
        import torch

        i = self._pos(item)
        if self._make is not None and len(self._stacked) == len(self._r.layout.specs):
            return self._make([self._stacked[k][i] for k in range(len(self._stacked))])  # loaded: no dict
        sd = self.state_dict(i)
        if self._template is None:
            template = build_template(self._r.architecture, self._r.layout, self.trust_code, f"set '{self.ref}'",
                                      f"model {self._r.names[i]!r}")
            self._make = make_cloner(template, self._r.layout.keys)
            self._template = template
        if self._make is not None:
            return self._make(list(sd.values()))
        module = copy.deepcopy(self._template)
        with torch.no_grad():
            load_module_state(module, sd)
        module.eval()
        return module

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


def build_template(arch: Architecture, layout: Layout, trusted: bool, subject: str, what: str) -> "nn.Module":
    """The module a recovered set's models are copies of, built from the (untrusted) record through
    ``Architecture.build_for``; every failure is one ``RecoveryError`` naming the set, the model
    and where in the record it failed (``TrustError`` stays: it says how to allow recorded code)."""
    try:
        template = arch.build_for(layout, trusted=trusted, subject=subject)
        match_dtypes(template, layout)
    except TrustError:
        raise
    except MMError as e:
        raise RecoveryError(f"cannot build {what} of {subject} from its architecture record "
                            f"({arch.kind} record): {e}") from None
    return template


def require_layout(found: Layout, base: Layout, what: str) -> None:
    """StoreError naming the first tensor whose key, shape or dtype differs from the base version's:
    a delta against another layout would be meaningless (``approach="auto"`` stores it in full)."""
    a, b = found.signature(), base.signature()
    if a == b:
        return
    for x, y in zip(a, b):
        if x != y:
            change = (f"tensor {x[0]!r} is {list(x[2])} {x[1]}, in the base {list(y[2])} {y[1]}" if x[0] == y[0]
                      else f"tensor {x[0]!r} stands where the base has {y[0]!r}")
            break
    else:
        change = (f"tensor {a[len(b)][0]!r} is new" if len(a) > len(b)
                  else f"tensor {b[len(a)][0]!r} of the base is gone")
    raise StoreError(f"{what}: the models' architecture changed against the base version ({change}); "
                     "save with approach='auto' or 'baseline' to store this version in full")
