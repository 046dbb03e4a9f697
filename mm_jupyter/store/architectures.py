"""Architectures recorded without pickle, and rebuilt from that record.

Tried in this order when none is given:
1. a module built by a factory decorated with ``mm.architecture`` (it tags the module with the
   factory's ``module:qualname`` and JSON kwargs);
2. a Hugging Face ``transformers`` model: its class path and ``config.to_dict()``;
3. any other module: its structure (:mod:`.structure`) — classes, plain attributes, children and
   tensor specs — so a plain ``nn.Module`` never needs a decorator.
``Architecture.factory(fn, **kwargs)`` and ``Architecture.from_source(klass, **kwargs)`` record a
constructor call explicitly. What a record may import or run is decided by :mod:`.trust`.
"""
from __future__ import annotations

import functools
import inspect
import json
import threading
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, ParamSpec, TypeVar

from ..errors import ArchitectureError, MMError, a_type
from . import structure, structure_clone, structure_decode, structure_encode, trust
from .hfrecords import build_config, check_literal, construct
from .sourcecode import capture_source, exec_source, ref_of, session_namespaces
from .statewalk import TAG
from .tensors import layout_mismatch, match_dtypes
from .trust import import_ref

if TYPE_CHECKING:
    from torch import nn

    from .tensors import Layout

KINDS = ("factory", "hf", "source", "structure")
#: Buffers a rebuilt module may hold beyond the stored tensors (non-persistent buffers such as
#: rotary tables and masks), in bytes, plus four times the stored bytes.
MAX_DERIVED_BYTES = 256 * 2**20


def _json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ArchitectureError(f"{what} must be JSON-serialisable: {e}") from None


def _factory_target(ref: str, trusted: bool = False) -> Callable[..., Any]:
    """What a factory record may call: a registered ``@mm.architecture`` function or an
    ``nn.Module`` class (its constructor, with the recorded JSON arguments), each found through
    the trust gate (exact object, one attribute step, no import outside the allowed packages)."""
    import torch

    obj: Callable[..., Any] = trust.lookup(ref, "factory", trusted)
    mod, name = trust.split_ref(ref)
    if trust.is_registered(f"{mod}:{name}", obj) or (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        return obj
    raise ArchitectureError(
        f"factory {ref!r} is not registered: only functions decorated with @mm.architecture (or nn.Module "
        "classes) may be called to rebuild a model; refused")


def allow_hint(subject: str) -> str:
    """How to allow recorded code for ``subject`` ("set 'name@3'")."""
    if subject.startswith("set "):
        ref = subject[4:]
        return (f"store.recover_set({ref}, trust_code=True), mm.Store(path, trust_code=True), "
                f"or %modelset recover {ref.strip(chr(39))} --trust-code")
    if subject.startswith("candidate set "):
        return f"mm.load_candidates(store, {subject[14:]}, trust_code=True) or mm.Store(path, trust_code=True)"
    return "mm.Store(path, trust_code=True) or recover_set(..., trust_code=True)"


@dataclass(frozen=True)
class Architecture:
    """How to build an empty model of a set. ``kind`` is factory, hf, source or structure."""

    kind: str
    ref: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    source: str | None = None
    structure: dict[str, Any] | None = None

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def factory(cls, fn: Callable[..., Any] | str, **kwargs: Any) -> "Architecture":
        """A registered ``@mm.architecture`` function or an ``nn.Module`` class (or their
        ``'module:qualname'``) plus JSON kwargs. A class defined in a notebook is recorded as source."""
        if isinstance(fn, str):  # the caller names it in their own process: it may be imported,
            fn = import_ref(fn)  # and the record holds its exact reference ("torch.nn:Linear" -> ...linear:Linear)
        ref = ref_of(fn)
        if ref is None:
            if isinstance(fn, type):
                return cls.from_source(fn, **kwargs)
            raise ArchitectureError(
                f"{getattr(fn, '__qualname__', fn)!r} is not importable; define it in a module and decorate it "
                "with @mm.architecture, or pass a class (its source is recorded)")
        _factory_target(ref)
        return cls("factory", ref, _json(kwargs, "architecture kwargs"))

    @classmethod
    def hf(cls, model: Any) -> "Architecture":
        """A Hugging Face model: class path and config (weights are the set's parameters)."""

        ref = ref_of(type(model))
        if ref is None:
            raise ArchitectureError(f"{type(model).__name__} is not an importable transformers class")
        config = _json(model.config.to_dict(), "the model config")
        check_literal(config, "the model config")  # refused now if recovery would refuse it
        return cls("hf", ref, {}, config)

    @classmethod
    def from_source(cls, klass: type, **kwargs: Any) -> "Architecture":
        """A class defined in a notebook cell or script, recorded as source code (rebuilding runs it,
        so it needs ``trust_code`` unless the same class is defined in the recovering session)."""
        code = capture_source(klass)
        return cls("source", klass.__name__, _json(kwargs, "architecture kwargs"), None, code)

    @classmethod
    def structural(cls, model: "nn.Module") -> "Architecture":
        """The module tree of ``model`` (any ``nn.Module``; see :mod:`.structure`)."""
        return cls("structure", type(model).__name__, {}, None, None, structure_encode.record(model))

    @classmethod
    def infer(cls, model: "nn.Module") -> "Architecture":
        tagged = getattr(model, TAG, None)
        if isinstance(tagged, Architecture):
            return tagged
        return cls.hf(model) if cls.inferred_kind(model) == "hf" else cls.structural(model)

    @staticmethod
    def inferred_kind(model: "nn.Module") -> str:
        """The kind of record ``infer`` makes for ``model``, known without making it."""
        tagged = getattr(model, TAG, None)
        if isinstance(tagged, Architecture):
            return tagged.kind
        if type(model).__module__.startswith("transformers.") and hasattr(model, "config"):
            return "hf"
        return "structure"

    # -- record -----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "ref": self.ref, "kwargs": self.kwargs}
        if self.config is not None:
            out["config"] = self.config
        if self.source is not None:
            out["source"] = self.source
        if self.structure is not None:
            out["structure"] = self.structure
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Architecture":
        """An architecture record read from a store, its fields checked for type (what they may
        name is checked when it is built)."""
        if not isinstance(data, dict) or data.get("kind") not in KINDS:
            kind = data.get("kind") if isinstance(data, dict) else data
            raise ArchitectureError(f"unknown architecture record kind {str(kind)[:80]!r}")
        kind = data["kind"]
        fields = {"ref": (str,), "kwargs": (dict,), "config": (dict, type(None)), "source": (str, type(None)),
                  "structure": (dict, type(None))}
        for key, types_ in fields.items():
            if key in data and not isinstance(data[key], types_):
                raise ArchitectureError(f"{kind} architecture record: field {key!r} is a {type(data[key]).__name__}")
        if not all(isinstance(k, str) for k in data.get("kwargs", {})):
            raise ArchitectureError(f"{kind} architecture record: keyword argument names must be strings")
        if kind == "structure" and not isinstance(data.get("structure"), dict):
            raise ArchitectureError("structural architecture record without its structure")
        if kind == "hf" and not isinstance(data.get("config"), dict):
            raise ArchitectureError("Hugging Face architecture record without its config")
        if kind == "source" and not isinstance(data.get("source"), str):
            raise ArchitectureError("source architecture record without its source")
        return cls(kind, data.get("ref", ""), data.get("kwargs", {}), data.get("config"),
                   data.get("source"), data.get("structure"))

    def describe(self) -> str:
        if self.kind == "source":
            return f"{self.ref} (source, {len(self.source or '')} chars)"
        if self.kind == "structure":
            return f"{self.ref} (structure)"
        return self.ref

    # -- build ------------------------------------------------------------------------------
    def build(self, *, trusted: bool = False, subject: str = "this set", meta: bool = False) -> "nn.Module":
        """A module of this architecture. Recorded source runs only with ``trusted`` (or when the
        running session defines identical source); factories must be registered. Every failure is
        an ``ArchitectureError`` (``TrustError`` for recorded source without trust)."""
        import torch

        try:
            if self.kind == "structure":
                model = structure_decode.build(self.structure or {}, meta=meta, trusted=trusted, subject=subject,
                                        allow=allow_hint(subject))
            else:
                make = self._constructor(trusted, subject)
                if meta:
                    with torch.device("meta"), _meta_fills():
                        model = make()
                else:
                    model = make()
        except MMError:
            raise
        except Exception as e:  # noqa: BLE001 - a constructor failed on recorded arguments: one clear error
            raise ArchitectureError(
                f"architecture {self.describe()} cannot be built: {type(e).__name__}: {e}") from None
        if not isinstance(model, torch.nn.Module):
            raise ArchitectureError(f"{self.describe()} built {a_type(model)}, not an nn.Module")
        return model

    def build_for(self, layout: "Layout", *, trusted: bool = False, subject: str = "this set") -> "nn.Module":
        """A module to receive stored tensors of ``layout``: built on the meta device first (no memory),
        checked to have exactly those keys, shapes and dtypes (attribute tensors included) and no
        more derived tensors — non-persistent buffers, tensors in plain attributes a constructor
        made — than :data:`MAX_DERIVED_BYTES` allows, and only then built for real: a record cannot
        make this process allocate more than the stored bytes say."""

        with _registrations_bounded(MODULES_PER_KEY * len(layout.specs) + MIN_REGISTRATIONS):
            probe = self.build(trusted=trusted, subject=subject, meta=True)
        match_dtypes(probe, layout)
        diff = layout_mismatch(structure.module_state(probe, layout.keys), layout)
        if diff is not None:
            raise ArchitectureError(f"the record builds other tensors than the stored ones: {diff}")
        held = [k for k in layout.keys if structure.is_attribute_state(k)]
        if self.kind == "structure" and structure.state_keys(self.structure or {}) != held:
            raise ArchitectureError("the record's attribute tensors are not the stored ones")
        persistent = set(probe.state_dict())
        stored_ids = {id(t) for t in structure.attribute_states(probe, held)}
        derived = sum(b.numel() * b.element_size() for k, b in probe.named_buffers() if k not in persistent)
        derived += sum(t.numel() * t.element_size() for t in structure.plain_tensors(probe) if id(t) not in stored_ids)
        stored = sum(s.nbytes for s in layout.specs)
        if derived > MAX_DERIVED_BYTES + 4 * stored:
            raise ArchitectureError(f"the record builds {derived} bytes of tensors outside the stored ones "
                                    f"({stored} bytes); refused")
        return self.build(trusted=trusted, subject=subject)

    def _constructor(self, trusted: bool, subject: str) -> Callable[[], Any]:
        if self.kind == "factory":
            target = _factory_target(self.ref, trusted)
            return lambda: target(**self.kwargs)
        if self.kind == "hf":

            klass = trust.module_class(self.ref, "Hugging Face model class", trusted)
            config_class = getattr(klass, "config_class", None)
            if not (isinstance(config_class, type) and issubclass(config_class, trust.hf_config_bases())):
                raise ArchitectureError(f"{self.ref!r} is not a Hugging Face model class; refused")
            config = build_config(config_class, self.config, {}, "the recorded Hugging Face config")
            return lambda: construct(klass, config)
        klass = source_class(self.source or "", self.ref, trusted, subject)
        return lambda: klass(**self.kwargs)

    def build_meta(self, *, trusted: bool = False, subject: str = "this set") -> "nn.Module":
        """Build without allocating parameter memory (for checking keys, shapes and dtypes)."""
        return self.build(trusted=trusted, subject=subject, meta=True)


_FILLS: frozenset[str] = frozenset({
    "normal_", "uniform_", "fill_", "zero_", "random_", "bernoulli_", "exponential_", "log_normal_", "cauchy_",
    "geometric_", "constant_", "kaiming_uniform_"})


def _fill_functions() -> frozenset[Any]:
    """The exact initialisers skipped on meta tensors: ``Tensor``'s in-place random and constant
    fills, and the ``torch.nn.init`` functions that dispatch to a mode before filling."""
    import torch

    fns = {getattr(torch.Tensor, n) for n in _FILLS if hasattr(torch.Tensor, n)}
    fns |= {getattr(torch.nn.init, n) for n in _FILLS if hasattr(torch.nn.init, n)}
    return frozenset(fns)


@contextmanager
def _meta_fills() -> Iterator[None]:
    """While a record is built on the meta device, value fills of meta tensors are no-ops: a meta
    tensor holds no values, and torch runs meta random fills through slow Python decompositions
    (most of a small Hugging Face model's probe, which every save makes). Shapes, dtypes and
    registrations are untouched, so the probe sees exactly what a real build makes."""
    from torch.overrides import TorchFunctionMode

    fills = _fill_functions()

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if func in fills:
                target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
                if getattr(target, "is_meta", False):
                    return target
            return func(*args, **kwargs)

    with Mode():
        yield


structure_clone.FROZEN_RECORDS.add(Architecture)

#: A constructor may register at most this many modules, parameters and buffers per stored tensor
#: (plus MIN_REGISTRATIONS) while a record is probed: a config asking for a million layers stops
#: after a few thousand, on the meta device, instead of filling memory with module objects.
MODULES_PER_KEY = 8
MIN_REGISTRATIONS = 10_000
_PROBING = threading.local()


@contextmanager
def _registrations_bounded(limit: int) -> Iterator[None]:
    """Count the modules, parameters and buffers constructors register in this thread (torch's
    global registration hooks) and stop the build with an ArchitectureError beyond ``limit``."""
    from torch.nn.modules import module as torch_module

    def count(*_: Any) -> None:
        if getattr(_PROBING, "left", None) is None:
            return None  # another thread's modules
        _PROBING.left -= 1
        if _PROBING.left < 0:
            raise ArchitectureError(f"the record builds more than {limit} modules, parameters and buffers for "
                                    "the stored tensors; refused")
        return None

    handles = [torch_module.register_module_module_registration_hook(count),
               torch_module.register_module_parameter_registration_hook(count),
               torch_module.register_module_buffer_registration_hook(count)]
    _PROBING.left = limit
    try:
        yield
    finally:
        _PROBING.left = None
        for h in handles:
            h.remove()


def source_class(code: str, name: str, trusted: bool, subject: str) -> Any:
    """The class or function ``name`` defined by recorded ``code``: the session's own definition
    when its captured source is identical (nothing runs), otherwise the executed code — only when
    trusted."""
    for ns in session_namespaces():
        obj = ns.get(name)
        if isinstance(obj, (type, types.FunctionType)):
            try:
                if capture_source(obj) == code:
                    return obj
            except ArchitectureError:
                continue
    if not trusted and not trust.is_own(code):
        kind = "class" if f"class {name}" in code else "function"
        raise trust.refuse(subject, [(f"{kind} {name}", code)], allow_hint(subject))
    mod = exec_source(code, name)
    if name not in mod:
        raise ArchitectureError(f"recorded source does not define {name}")
    return mod[name]


P = ParamSpec("P")
M = TypeVar("M", bound="nn.Module")


def architecture(fn: Callable[P, M]) -> Callable[P, M]:
    """Decorator for model factories: modules they build remember how they were built, and stores
    may call the factory to rebuild them (it is registered with the trust gate).

    The factory must be importable and its arguments JSON-serialisable.
    """

    @functools.wraps(fn)
    def build(*args: P.args, **kwargs: P.kwargs) -> M:
        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        model = fn(*args, **kwargs)
        ref = f"{fn.__module__}:{fn.__qualname__}"
        object.__setattr__(model, TAG, Architecture("factory", ref, _json(dict(bound.arguments), f"{ref} arguments")))
        return model

    return trust.register(build, f"{fn.__module__}:{fn.__qualname__}")
