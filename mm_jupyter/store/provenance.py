"""Provenance: how a derived set was trained, so it can be recovered by retraining.

A ``Provenance`` names the training function (importable ``module:qualname`` or captured source),
a JSON config (plus optional per-model overrides), a seed, and per updated model a ``DatasetRef``:
how to load its data and the data's content hash (the data itself is not copied).

Training runs the same way at save time (``Provenance.run``) and at recovery: seeded per model
from (seed, model name), ``torch.use_deterministic_algorithms(True)``, one intra-op thread, so the
result is bit-identical on the same software environment.
"""
from __future__ import annotations

import copy
import hashlib
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np

from ..errors import ArchitectureError, StoreError, a_type
from . import trust
from .architectures import _json, allow_hint, source_class
from .sourcecode import capture_source, ref_of
from .trust import import_ref

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True, init=False)
class DatasetRef:
    """A reproducible way to load a dataset: an importable loader plus JSON kwargs, or a file.

    ``DatasetRef("pkg.mod:load", cell=3)`` (keyword arguments for the loader) or
    ``DatasetRef("pkg.mod:load", {"cell": 3})``. ``sha256`` may be given when known; otherwise
    it is computed by loading the data once.
    """

    loader: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None

    def __init__(self, loader: str, kwargs: Mapping[str, Any] | None = None, sha256: str | None = None,
                 **loader_kwargs: Any) -> None:
        if not isinstance(loader, str):
            raise StoreError(f"a dataset loader is a 'module:qualname' string, not {type(loader).__name__}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise StoreError(f"dataset loader kwargs must be a dict, not {type(kwargs).__name__}")
        merged = dict(kwargs or {})
        clash = sorted(set(merged) & set(loader_kwargs))
        if clash:
            raise StoreError(f"dataset loader argument(s) {clash} given twice")
        merged.update(loader_kwargs)
        # the JSON round trip is what recovery will pass to the loader: use it at save time too
        object.__setattr__(self, "loader", loader)
        object.__setattr__(self, "kwargs", _json(merged, f"kwargs of dataset loader {loader!r}"))
        object.__setattr__(self, "sha256", sha256)

    @classmethod
    def file(cls, path: str | Path) -> "DatasetRef":
        """A data file (.npy, .npz, .pt/.safetensors or anything else as raw bytes)."""
        p = Path(path).resolve()
        if not p.is_file():
            raise StoreError(f"dataset file {str(p)!r} does not exist")
        return cls("mm_jupyter.store.provenance:load_file", {"path": str(p)})

    @classmethod
    def of(cls, value: Any, model: str) -> "DatasetRef":
        if isinstance(value, DatasetRef):
            return value
        if isinstance(value, (str, Path)):
            return cls.file(value)
        raise StoreError(
            f"dataset of model {model!r} is {a_type(value)}; provenance needs a reproducible "
            "reference (mm.DatasetRef(loader, **kwargs) or a file path), not in-memory data"
        )

    def load(self) -> Any:
        """Load the data (the caller decided to trust the loader: recovery checks first)."""
        fn = import_ref(self.loader)
        return fn(**self.kwargs)

    def content_hash(self, data: Any | None = None) -> str:
        return dataset_hash(self.load() if data is None else data)

    def to_json(self) -> list[Any]:
        return [self.loader, self.kwargs]

    @classmethod
    def from_json(cls, data: list[Any]) -> "DatasetRef":
        return cls(data[0], data[1])


@trust.trusted
def load_file(path: str) -> Any:
    """Loader behind ``DatasetRef.file``: arrays and tensors without pickle, else raw bytes."""
    p = Path(path)
    if not p.is_file():
        raise StoreError(f"dataset file {path!r} is gone")
    if p.suffix == ".npy":
        return np.load(p, allow_pickle=False)
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in sorted(z.files)}
    if p.suffix == ".safetensors":
        from safetensors.numpy import load_file as load_st

        return load_st(str(p))
    return p.read_bytes()


def dataset_hash(data: Any) -> str:
    """Content hash of tensors/arrays/bytes, nested in tuples, lists and dicts (order-aware)."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().contiguous()
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            if x.numel():
                h.update(x.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, np.ndarray):
            if x.dtype.hasobject:
                raise StoreError("datasets with object arrays cannot be hashed")
            h.update(f"A{x.dtype.str}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, (bytes, bytearray, memoryview)):
            h.update(b"B%d" % len(x))
            h.update(x)
        elif isinstance(x, Mapping):
            h.update(b"D%d" % len(x))
            for k in sorted(x):
                h.update(repr(k).encode())
                feed(x[k])
        elif isinstance(x, (tuple, list)):
            h.update(b"L%d" % len(x))
            for v in x:
                feed(v)
        elif isinstance(x, (int, float, str, bool)) or x is None:
            h.update(repr(x).encode())
        else:
            raise StoreError(f"cannot hash dataset content of type {type(x).__name__}")

    feed(data)
    return h.hexdigest()


def model_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def _set_deterministic(mode: bool) -> None:
    """``torch.use_deterministic_algorithms`` for eager code. The public call also imports
    ``torch._inductor`` (~2 s per process) to configure compiled code, which training here never
    uses; the eager switch underneath it is taken when present."""
    import torch

    switch = getattr(torch._C, "_set_deterministic_algorithms", None)
    if switch is None:
        torch.use_deterministic_algorithms(mode)
    else:
        switch(mode)


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed every RNG, force deterministic kernels and one intra-op thread; restore afterwards."""
    import torch

    was_det = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    rng = torch.random.get_rng_state()
    py = random.getstate()
    npst = np.random.get_state()
    _set_deterministic(True)
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        _set_deterministic(was_det)
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng)
        random.setstate(py)
        np.random.set_state(npst)


TrainFn = Callable[["nn.Module", Any, dict[str, Any]], Any]


@dataclass
class Provenance:
    """How a derived set was trained: ``train(model, data, config)`` trains ``model`` in place
    (or returns the trained module); ``datasets`` maps each updated model's name to its data."""

    train: TrainFn | str
    config: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self) -> None:
        self.config = _json(self.config, "provenance config")
        self.configs = {str(k): _json(v, f"config of model {k!r}") for k, v in self.configs.items()}
        if not isinstance(self.seed, int):
            raise StoreError(f"provenance seed must be an int, not {type(self.seed).__name__}")
        self.datasets = {str(k): DatasetRef.of(v, str(k)) for k, v in self.datasets.items()}

    def config_for(self, name: str) -> dict[str, Any]:
        return self.config | self.configs.get(name, {})

    def train_record(self) -> dict[str, Any]:
        """The training code as recorded: an import reference, or source code."""
        if self.source is not None:
            name = self.train if isinstance(self.train, str) else self.train.__name__
            return {"source": self.source, "name": name}
        if isinstance(self.train, str):
            import_ref(self.train)
            return {"ref": self.train}
        ref = ref_of(self.train)
        if ref is not None:
            return {"ref": ref}
        try:
            return {"source": capture_source(self.train), "name": self.train.__name__}
        except ArchitectureError as e:
            raise StoreError(f"cannot record training function: {e}") from None

    def run(self, models: Mapping[str, "nn.Module"], names: list[str] | None = None) -> dict[str, "nn.Module"]:
        """Train copies of the named models exactly as recovery will retrain them."""

        out = {}
        for name in names if names is not None else list(self.datasets):
            if name not in self.datasets:
                raise StoreError(f"provenance has no dataset for model {name!r}")
            if name not in models:
                raise StoreError(f"no model named {name!r} to train")
            data = self.datasets[name].load()
            out[name] = train_one(resolve_train(self.train_record(), trusted=True), copy.deepcopy(models[name]),
                                  data, self.config_for(name), model_seed(self.seed, name))
        return out


def _registered(ref: str) -> bool:
    try:
        trust.registered(ref, "function")
    except ArchitectureError:
        return False
    return True


def untrusted_code(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, code) of everything recovering a provenance record would run that is neither
    registered (``@mm.trusted``) nor defined identically in the running session."""
    items: list[tuple[str, str]] = []
    train = record["train"]
    if "ref" in train:
        if not _registered(train["ref"]):
            items.append((f"training function {train['ref']}", f"{train['ref']}(model, data, config)"))
    else:
        try:
            source_class(train["source"], train["name"], False, "")
        except ArchitectureError:
            items.append((f"training function {train['name']}", train["source"]))
    seen: set[str] = set()
    for loader, kwargs in record.get("datasets", []):
        if loader in seen or _registered(loader):
            continue
        seen.add(loader)
        items.append((f"dataset loader {loader}", f"{loader}(**{kwargs!r})"))
    return items


def check_trusted(record: dict[str, Any], subject: str) -> None:
    """TrustError before anything runs, unless all code a provenance recovery would run is
    allowed (registered, defined in the session, or the store is trusted)."""
    if trust.current():
        return
    items = untrusted_code(record)
    if items:
        raise trust.refuse(subject, items, allow_hint(subject))


def resolve_train(record: dict[str, Any], trusted: bool = False, subject: str = "this set") -> TrainFn:
    """The recorded training function (callers check trust first; see ``check_trusted``)."""
    if "ref" in record:
        if trusted or _registered(record["ref"]):
            fn: TrainFn = import_ref(record["ref"])
            return fn
        raise trust.refuse(subject, [(f"training function {record['ref']}", record["ref"])], allow_hint(subject))
    recorded: TrainFn = source_class(record["source"], record["name"], trusted, subject)
    return recorded


def train_one(train: TrainFn, model: "nn.Module", data: Any, config: dict[str, Any], seed: int) -> "nn.Module":
    import torch

    with deterministic(seed):
        model.train()
        result = train(model, data, config)
    if isinstance(result, torch.nn.Module):
        model = result
    model.eval()
    return model
