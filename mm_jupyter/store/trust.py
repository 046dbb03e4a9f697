"""The trust gate: what a store record may make this process import or run.

A store written by someone else must not be able to run code here. Records therefore name code
in three strictly separated ways:

* **classes** (``module:qualname``) are imported only when they are ``nn.Module`` subclasses (or
  Hugging Face config classes) from installed, non-standard-library modules; building a module
  from a structural record never calls their ``__init__``;
* **functions** used as attribute values (an activation such as ``torch.nn.functional:gelu``) only
  from allow-listed modules (:data:`ALLOWED_FUNCTION_MODULES`, extended by :func:`allow_functions`);
* **callables a record calls with recorded arguments** (architecture factories, provenance
  training functions and dataset loaders) only when registered by the code that defines them
  (``@mm.architecture``, ``@mm.trusted``).

Recorded *source* (classes defined in a notebook cell, provenance training code) runs only when
the user trusts the store (``trust_code=True``), as Hugging Face's ``trust_remote_code`` — except
when identical source is already defined in the running session, which is then used as it is.
"""
from __future__ import annotations

import contextvars
import hashlib
import importlib
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from ..errors import ArchitectureError, TrustError, a_type

if TYPE_CHECKING:
    from torch import nn
    from transformers import GenerationConfig, PretrainedConfig

    #: What a ``$hfconfig`` record names (transformers is imported only when a record needs it).
    HFConfigClass = type[PretrainedConfig] | type[GenerationConfig]

F = TypeVar("F", bound=Callable[..., Any])

#: Modules whose functions a record may reference as attribute values.
ALLOWED_FUNCTION_MODULES: set[str] = {
    "torch", "torch.nn.functional", "torch._C._nn", "torch.special", "torch.fft", "torch.linalg",
    "torch.nn.init", "math", "operator", "_operator",
}
#: torch functions that touch files, the network, global state or the compiler: never referenced.
_DENIED_TORCH = {"load", "save", "compile", "from_file", "hub", "set_default_device", "set_default_dtype",
                 "set_default_tensor_type", "use_deterministic_algorithms", "set_num_threads",
                 "set_num_interop_threads", "set_printoptions", "manual_seed", "seed", "set_rng_state",
                 "set_flush_denormal", "set_warn_always", "set_anomaly_enabled"}

_REGISTERED: dict[str, Callable[..., Any]] = {}
_OWN: set[str] = set()  # sha256 of source this process captured from its own definitions

_TRUST: contextvars.ContextVar[bool] = contextvars.ContextVar("mm_jupyter_trust_code", default=False)


def allow_functions(*modules: str) -> None:
    """Let records reference functions of these modules as attribute values (e.g. your own
    activation functions in ``mypkg.layers``). Recovery in another process needs the same call."""
    for mod in modules:
        if not isinstance(mod, str) or not mod or ":" in mod:
            raise ArchitectureError(f"allow_functions takes module names such as 'mypkg.layers', not {mod!r}")
        ALLOWED_FUNCTION_MODULES.add(mod)


def register(fn: F, ref: str | None = None) -> F:
    """Mark ``fn`` as safe for a record to call with recorded arguments."""
    target = getattr(fn, "__wrapped__", fn)
    key = ref or f"{target.__module__}:{target.__qualname__}"
    _REGISTERED[key] = fn
    return fn


def trusted(fn: F) -> F:
    """Decorator for provenance training functions and dataset loaders that stores may call by
    reference without ``trust_code`` (they must be importable: define them in a module)."""
    if "<locals>" in getattr(fn, "__qualname__", "<locals>") or getattr(fn, "__module__", "__main__") == "__main__":
        raise ArchitectureError(
            f"@mm.trusted needs an importable function; {getattr(fn, '__qualname__', fn)!r} is defined in a "
            "notebook or inside a function (its source is recorded instead and needs trust_code)")
    return register(fn)


def is_registered(ref: str, obj: Any) -> bool:
    return _REGISTERED.get(ref) is obj


# -- importing by reference -----------------------------------------------------------------------
#: Packages that were renamed: records written before name the old module (stores stay readable).
RENAMED_PACKAGES = {"mm_jupyter.search": "mm_jupyter.modelsearch", "mm_jupyter.serve": "mm_jupyter.serving"}


def _current_module(mod: str) -> str:
    for old, new in RENAMED_PACKAGES.items():
        if mod == old or mod.startswith(old + "."):
            return new + mod[len(old):]
    return mod


def _split(ref: str) -> tuple[str, str]:
    """(module, qualname) of a reference, with a renamed package's old name replaced by its new one."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise ArchitectureError(f"reference {ref!r} is not of the form 'module:qualname'")
    mod, qual = ref.split(":")
    if not mod or not qual or not all(p.isidentifier() for p in mod.split(".") + qual.split(".")):
        raise ArchitectureError(f"reference {ref!r} is not of the form 'module:qualname'")
    return _current_module(mod), qual


def import_ref(ref: str) -> Any:
    """Resolve ``module:qualname`` (callers decide first whether the reference may be imported)."""
    mod, qual = _split(ref)
    try:
        obj: Any = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ArchitectureError(f"cannot import {ref!r}: {e}") from None
    return obj


def _stdlib(mod: str) -> bool:
    top = mod.split(".")[0]
    return top in sys.stdlib_module_names and mod not in ALLOWED_FUNCTION_MODULES


def module_class(ref: str, what: str = "class") -> type[nn.Module]:
    """An ``nn.Module`` subclass by reference; anything else is refused before it can run."""
    import torch

    mod, _ = _split(ref)
    if _stdlib(mod):
        raise ArchitectureError(f"{what} {ref!r} is not an nn.Module class (standard-library reference refused)")
    obj = import_ref(ref)
    if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        raise ArchitectureError(f"{what} {ref!r} is {a_type(obj)}, not an nn.Module class; refused")
    return obj


def config_class(ref: str) -> HFConfigClass:
    """A Hugging Face configuration class (``PretrainedConfig``/``GenerationConfig``) by reference."""
    mod, _ = _split(ref)
    if _stdlib(mod):
        raise ArchitectureError(f"config class {ref!r} refused (standard-library reference)")
    obj = import_ref(ref)
    bases = _hf_config_bases()
    if not (isinstance(obj, type) and bases and issubclass(obj, bases)):
        raise ArchitectureError(f"{ref!r} is not a Hugging Face configuration class; refused")
    return obj


def _hf_config_bases() -> tuple[HFConfigClass, ...]:
    if "transformers" not in sys.modules:
        try:
            importlib.import_module("transformers")
        except ImportError:
            return ()
    tf = sys.modules["transformers"]
    return tuple(c for c in (getattr(tf, "PretrainedConfig", None), getattr(tf, "GenerationConfig", None)) if c)


def function(ref: str) -> Callable[..., Any]:
    """A function from an allow-listed module (an attribute value such as an activation)."""
    mod, qual = _split(ref)
    if mod not in ALLOWED_FUNCTION_MODULES:
        raise ArchitectureError(
            f"function {ref!r} is not on the allow-list of modules a record may reference "
            f"({', '.join(sorted(ALLOWED_FUNCTION_MODULES))}); if you trust it, call "
            f"mm.allow_functions({mod!r}) before saving and recovering")
    if mod == "torch" and qual.split(".")[-1] in _DENIED_TORCH:
        raise ArchitectureError(f"function {ref!r} is refused: it touches files, the network or global state")
    obj: Callable[..., Any] = import_ref(ref)
    if isinstance(obj, type) or not callable(obj) or type(obj).__name__ not in (
            "function", "builtin_function_or_method", "method_descriptor"):
        raise ArchitectureError(f"{ref!r} is {a_type(obj)}, not a function; refused")
    return obj


def registered(ref: str, what: str) -> Callable[..., Any]:
    """A callable the record calls with recorded arguments: must be registered by its module."""
    mod, qual = _split(ref)
    if _stdlib(mod):
        raise ArchitectureError(f"{what} {ref!r} is not a registered function; refused")
    obj: Callable[..., Any] = import_ref(ref)
    if not is_registered(f"{mod}:{qual}", obj):
        raise ArchitectureError(
            f"{what} {ref!r} is not registered; only functions decorated with "
            f"{'@mm.architecture' if what == 'factory' else '@mm.trusted'} may be called from a store record")
    return obj


def function_ref(fn: Any) -> str | None:
    """``module:name`` of a function when importing it gives back the same object."""
    mod = getattr(fn, "__module__", None)
    names = [getattr(fn, "__qualname__", None), getattr(fn, "__name__", None)]
    mods = [mod, mod.lstrip("_")] if isinstance(mod, str) else []
    for m in mods:
        for n in names:
            if not m or not n or "<" in n or m == "__main__":
                continue
            try:
                if import_ref(f"{m}:{n}") is fn:
                    return f"{m}:{n}"
            except ArchitectureError:
                continue
    return None


# -- trust for recorded source ---------------------------------------------------------------------
def remember_own(code: str) -> str:
    """Note source captured from this process's own definitions: recovering it in the same
    process runs nothing the process did not already define (e.g. a second provenance cell
    retraining the first one's version)."""
    _OWN.add(hashlib.sha256(code.encode()).hexdigest())
    return code


def is_own(code: str) -> bool:
    return hashlib.sha256(code.encode()).hexdigest() in _OWN


def current() -> bool:
    """Whether recorded code may run in the current recovery."""
    return _TRUST.get()


@contextmanager
def scope(trust: bool) -> Iterator[None]:
    """Recovery steps below run with this trust decision (resolving a provenance chain)."""
    token = _TRUST.set(bool(trust))
    try:
        yield
    finally:
        _TRUST.reset(token)


def preview(code: str, lines: int = 2) -> str:
    """The first lines of each class and function of recorded code (and what it imports), indented,
    for an error message: enough to recognise the code, not all of it."""
    import ast

    text = code.strip("\n").splitlines()
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return "\n".join("      " + ln for ln in text[:lines + 2])
    shown, imports = [], []
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            body = code.splitlines()[first - 1 : node.end_lineno]
            shown += ["      " + ln for ln in body[:lines]]
            if len(body) > lines:
                shown.append(f"      … ({len(body) - lines} more lines)")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imports += [a.name if isinstance(node, ast.Import) else f"{node.module}.{a.name}" for a in node.names]
    if imports:
        shown.append(f"      (imports {', '.join(imports)})")
    return "\n".join(shown) if shown else "\n".join("      " + ln for ln in text[:lines + 2])


def refuse(subject: str, items: list[tuple[str, str]], allow: str) -> TrustError:
    """The error for code that would run without trust: what, the code itself, how to allow it."""
    parts = [f"{subject} would run code recorded in the store, and the store is not trusted:"]
    for title, code in items:
        parts.append(f"  {title}:\n{preview(code)}")
    parts.append(f"  If you trust whoever wrote this store, allow it: {allow}")
    return TrustError("\n".join(parts))


def session_object(name: str, matches: Callable[[Any], bool]) -> Any:
    """An object named ``name`` defined in the running session (``__main__``, i.e. the notebook)
    for which ``matches`` holds, else None."""
    main = sys.modules.get("__main__")
    obj = getattr(main, name, None) if main is not None else None
    try:
        return obj if obj is not None and matches(obj) else None
    except ArchitectureError:
        return None
