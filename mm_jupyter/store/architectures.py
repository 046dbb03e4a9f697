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

import ast
import builtins
import functools
import hashlib
import inspect
import json
import linecache
import sys
import textwrap
import threading
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, ParamSpec, TypeVar

from ..errors import ArchitectureError, MMError, a_type
from . import structure, trust
from .trust import import_ref

if TYPE_CHECKING:
    from torch import nn

    from .tensors import Layout

TAG = "__mm_architecture__"
KINDS = ("factory", "hf", "source", "structure")
#: Buffers a rebuilt module may hold beyond the stored tensors (non-persistent buffers such as
#: rotary tables and masks), in bytes, plus four times the stored bytes.
MAX_DERIVED_BYTES = 256 * 2**20


def _json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ArchitectureError(f"{what} must be JSON-serialisable: {e}") from None


def ref_of(obj: Any) -> str | None:
    """``module:qualname`` of an object when importing it gives back the same object."""
    mod = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None)
    if not mod or not qual or mod == "__main__" or "<locals>" in qual:
        return None
    try:
        found = import_ref(f"{mod}:{qual}")
    except ArchitectureError:
        return None
    found = getattr(found, "__wrapped__", found) if not isinstance(obj, type) else found
    target = getattr(obj, "__wrapped__", obj) if not isinstance(obj, type) else obj
    return f"{mod}:{qual}" if found is target else None


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
        from .hfrecords import check_literal

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
        return cls("structure", type(model).__name__, {}, None, None, structure.record(model))

    @classmethod
    def infer(cls, model: "nn.Module") -> "Architecture":
        tagged = getattr(model, TAG, None)
        if isinstance(tagged, Architecture):
            return tagged
        klass = type(model)
        if klass.__module__.startswith("transformers.") and hasattr(model, "config"):
            return cls.hf(model)
        return cls.structural(model)

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
                model = structure.build(self.structure or {}, meta=meta, trusted=trusted, subject=subject,
                                        allow=allow_hint(subject))
            else:
                make = self._constructor(trusted, subject)
                if meta:
                    with torch.device("meta"):
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
        from .tensors import layout_mismatch, match_dtypes

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
            from .hfrecords import build_config, construct

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


def session_namespaces() -> list[Mapping[str, Any]]:
    """Where the running session defines its classes: ``__main__`` and IPython's user namespace."""
    out: list[Mapping[str, Any]] = []
    main = sys.modules.get("__main__")
    if main is not None:
        out.append(vars(main))
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None) if ipython is not None else None
    shell = get() if get is not None else None
    if shell is not None and all(shell.user_ns is not ns for ns in out):
        out.append(shell.user_ns)
    return out


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


@functools.lru_cache(maxsize=64)
def _exec_cached(code: str, name: str) -> types.ModuleType:
    digest = hashlib.sha256(code.encode()).hexdigest()[:12]
    mod = types.ModuleType(f"mm_jupyter_source_{digest}")
    mod.__dict__["__builtins__"] = builtins
    try:
        exec(compile(code, f"<mm_jupyter recorded source {name}>", "exec"), mod.__dict__)  # trust checked by callers
    except Exception as e:  # noqa: BLE001 - the recorded code itself failed: say so, with its own message
        raise ArchitectureError(f"recorded source of {name} failed to run: {type(e).__name__}: {e}") from None
    sys.modules[mod.__name__] = mod
    return mod


def exec_source(code: str, name: str) -> dict[str, Any]:
    """Run recorded source in a fresh module (once per distinct source). Callers decide trust."""
    return _exec_cached(code, name).__dict__


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


# -- capturing the source of notebook classes ------------------------------------------------------
def _definition_source(obj: Any) -> str:
    """Source of a class or function, also when it was defined in an IPython cell."""
    try:
        return textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError):
        pass
    name = obj.__name__
    codes = []
    if isinstance(obj, type):
        for v in vars(obj).values():
            v = getattr(v, "__func__", v)
            if hasattr(v, "__code__"):
                codes.append(v.__code__)
    elif hasattr(obj, "__code__"):
        codes.append(obj.__code__)
    for code in codes:
        lines = linecache.getlines(code.co_filename)
        if not lines:
            continue
        text = "".join(lines)
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        kinds = (ast.ClassDef,) if isinstance(obj, type) else (ast.FunctionDef,)
        best = None
        for node in ast.walk(tree):
            if isinstance(node, kinds) and node.name == name and node.lineno <= code.co_firstlineno:
                if best is None or node.lineno > best.lineno:
                    best = node
        if best is not None:
            start = min([best.lineno] + [d.lineno for d in best.decorator_list])
            return textwrap.dedent("".join(lines[start - 1 : best.end_lineno]))
    raise ArchitectureError(f"cannot find the source of {name}; define it in a file or a notebook cell")


def _free_names(code: str) -> list[str]:
    tree = ast.parse(code)
    bound, used = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                used.append(node.id)
            else:
                bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                bound.add((a.asname or a.name).split(".")[0])
    seen: list[str] = []
    for n in used:
        if n not in bound and n not in seen and not hasattr(builtins, n):
            seen.append(n)
    return seen


_CONSTANT_TYPES = (int, float, str, bool, type(None))


def _is_constant(v: Any) -> bool:
    if isinstance(v, _CONSTANT_TYPES):
        return True
    if isinstance(v, (tuple, list)):
        return all(_is_constant(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_constant(x) for k, x in v.items())
    return False


def capture_source(klass: type | Callable[..., Any]) -> str:
    """Self-contained source for ``klass`` (a class or function): imports, constants and helpers
    it needs, then it."""
    return capture_code(_definition_source(klass), klass.__name__, _defining_namespace(klass))


def _defining_namespace(klass: type | Callable[..., Any]) -> Mapping[str, Any]:
    """The globals the class's methods see: the notebook's namespace for a class from a cell (also
    where ``sys.modules['__main__']`` is another module), else its module's namespace."""
    for v in vars(klass).values():
        fn = getattr(v, "__func__", v)
        if isinstance(fn, types.FunctionType):
            return fn.__globals__
    return vars(sys.modules.get(klass.__module__, types.ModuleType("empty")))


def capture_code(code: str, name: str, env: Mapping[str, Any]) -> str:
    """Self-contained source for ``code`` (which defines ``name``): the imports, constants and
    helper definitions its free names refer to in ``env``, then the code itself."""
    imports: list[str] = []
    consts: list[str] = []
    defs: list[str] = []
    done: set[str] = set()

    def add_code(text: str, user: str) -> None:
        for free in _free_names(text):
            need(free, user)
        defs.append(text)

    def need(free: str, user: str) -> None:
        if free in done:
            return
        done.add(free)
        if free not in env:
            raise ArchitectureError(f"{user} uses {free!r}, which is not defined where {name} is")
        v = env[free]
        if isinstance(v, types.ModuleType):
            line = f"import {v.__name__}" if v.__name__ == free else f"import {v.__name__} as {free}"
            imports.append(line)
            return
        ref = ref_of(v) if isinstance(v, (type, types.FunctionType, types.BuiltinFunctionType)) else None
        if ref is not None:
            mod, qual = ref.split(":")
            if "." in qual:
                raise ArchitectureError(f"{user} uses nested object {ref!r}; import its outer class")
            imports.append(f"from {mod} import {qual}" + ("" if qual == free else f" as {free}"))
            return
        if isinstance(v, (type, types.FunctionType)):
            add_code(_definition_source(v), v.__name__)
            return
        if _is_constant(v):
            consts.append(f"{free} = {v!r}")
            return
        raise ArchitectureError(
            f"{user} uses {free!r} ({a_type(v)}), which cannot be recorded as source; "
            "make it a constant, an import, or pass architecture=mm.Architecture.factory(...)"
        )

    done.add(name)
    add_code(code, name)
    return trust.remember_own("\n".join(imports + consts + [""] + defs))
