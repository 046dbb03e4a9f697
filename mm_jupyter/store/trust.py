"""The trust gate: what a store record may make this process import or run.

A store written by someone else must not be able to run code here. Like
``torch.load(weights_only=True)`` with ``torch.serialization.add_safe_globals``, records may only
name exact objects on an allow-list, never a path to walk:

* a reference is ``module:name`` — one module, exactly one attribute step (a record cannot reach
  ``torch.os.system`` or ``torch.hub.load`` through a module's attributes) — and the object found
  must be *that* object: its own ``__module__`` and name are the reference (so ``torch.nn:Linear``
  or an object re-exported under another name is refused);
* the module must already be imported in this process, or belong to an allowed package
  (:data:`ALLOWED_PACKAGES`: ``torch``, ``transformers``, ``mm_jupyter``, ``timm``, ``torchvision``,
  plus :func:`allow_modules`); anything else is refused *before* it is imported, so a record cannot
  make this process run a module's import-time code;
* what a reference may resolve to depends on where it stands: **classes** — ``nn.Module``
  subclasses (built without their ``__init__`` from structural records), Hugging Face config
  classes, ``enum.Enum`` subclasses; **functions** stored as data (an activation) — only the
  reviewed pure tensor functions of :data:`PURE_FUNCTIONS` plus what :func:`allow_functions` adds;
  **callables a record calls with recorded arguments** — only functions registered by the code that
  defines them (``@mm.architecture`` factories, ``@mm.trusted`` training functions and loaders) and
  ``nn.Module`` classes (constructed with JSON keyword arguments, on the meta device first).

Recorded *source* (classes defined in a notebook cell, provenance training code) runs only when
the user trusts the store (``trust_code=True``), as Hugging Face's ``trust_remote_code`` — except
when identical source is already defined in the running session, which is then used as it is.
A trusted store may also name modules outside the allowed packages (they are imported). See
SECURITY.md for what this allows and what it does not.
"""
from __future__ import annotations

import ast
import contextvars
import enum
import functools
import hashlib
import importlib
import sys
import types
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from ..errors import ArchitectureError, TrustError, a_type

if TYPE_CHECKING:
    from torch import nn
    from transformers import GenerationConfig, PretrainedConfig

    #: What a ``$hfconfig`` record names (transformers is imported only when a record needs it).
    HFConfigClass = type[PretrainedConfig] | type[GenerationConfig]

F = TypeVar("F", bound=Callable[..., Any])

#: Packages whose modules a record may make this process import (their import-time code is
#: trusted like the package itself); extended by :func:`allow_modules`.
ALLOWED_PACKAGES: set[str] = {"torch", "transformers", "mm_jupyter", "timm", "torchvision"}
#: Modules whose own functions a record may reference as attribute values, added by
#: :func:`allow_functions` (the reviewed defaults are :data:`PURE_FUNCTIONS`).
ALLOWED_FUNCTION_MODULES: set[str] = set()
_ALLOWED_FUNCTIONS: dict[str, Callable[..., Any]] = {}  # exact functions added by allow_functions(fn)

#: The reviewed default allow-list of functions a record may hold as attribute values: pure
#: functions of tensors and numbers (activations, normalisations, pooling, losses, elementwise
#: math, operators). Nothing that reads or writes files, opens connections, starts processes,
#: compiles code or touches global state (seeds and the random generator — so no dropout, rrelu or
#: ``nn.init`` —, default dtype/device, thread counts, printing, flags) is on it. Each name is looked
#: up once in its module; the object found is allowed under its *own* ``__module__:__name__``.
PURE_FUNCTIONS: dict[str, tuple[str, ...]] = {
    "torch.nn.functional": (
        "relu", "relu_", "relu6", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish", "hardsigmoid",
        "hardtanh", "leaky_relu", "prelu", "glu", "logsigmoid", "softplus", "softsign", "softshrink",
        "hardshrink", "tanhshrink", "tanh", "sigmoid", "softmax", "softmin", "log_softmax", "normalize",
        "layer_norm", "group_norm", "rms_norm", "batch_norm", "instance_norm", "local_response_norm", "linear",
        "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
        "pad", "interpolate", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d",
        "max_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
        "adaptive_max_pool1d", "adaptive_max_pool2d", "lp_pool1d", "lp_pool2d", "pixel_shuffle",
        "pixel_unshuffle", "embedding",
        "one_hot", "scaled_dot_product_attention", "cosine_similarity", "pairwise_distance", "threshold",
        "unfold", "fold", "cross_entropy", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "nll_loss",
        "kl_div", "binary_cross_entropy", "binary_cross_entropy_with_logits",
    ),
    "torch": (
        "relu", "tanh", "sigmoid", "exp", "log", "log1p", "expm1", "abs", "neg", "sin", "cos", "erf", "erfc",
        "sqrt", "rsqrt", "square", "sign", "floor", "ceil", "round", "clamp", "add", "sub", "mul", "div",
        "matmul", "mm", "bmm", "softmax", "log_softmax", "cat", "stack", "flatten", "sum", "mean", "amax",
        "amin", "maximum", "minimum", "logsumexp", "cumsum", "where", "transpose", "permute", "reshape",
        "squeeze", "unsqueeze", "einsum", "selu", "celu", "hardshrink", "prelu",
    ),
    "math": (
        "sqrt", "exp", "log", "log2", "log10", "log1p", "expm1", "tanh", "sin", "cos", "erf", "erfc", "floor",
        "ceil", "fabs", "pow", "gamma", "lgamma", "isfinite", "isnan", "prod", "fsum", "hypot",
    ),
    "operator": (
        "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "matmul", "and_", "or_",
        "xor", "not_", "eq", "ne", "lt", "le", "gt", "ge", "getitem",
    ),
}

_REGISTERED: dict[str, Callable[..., Any]] = {}
_OWN: set[str] = set()  # sha256 of source this process captured from its own definitions
#: Modules that hold executed recorded source (``architectures.exec_source``): imported only
#: because a trusted store was recovered, so they never count as "already imported".
SOURCE_MODULE_PREFIX = "mm_jupyter_source_"

_TRUST: contextvars.ContextVar[bool] = contextvars.ContextVar("mm_jupyter_trust_code", default=False)


def allow_functions(*items: str | Callable[..., Any]) -> None:
    """Let records hold these functions as attribute values: a module name (``'mypkg.layers'``:
    every function defined in it) or a function object (exactly that one). Recovery in another
    process needs the same call."""
    for item in items:
        if callable(item) and not isinstance(item, type):
            ref = _own_ref(item)
            if ref is None:
                raise ArchitectureError(f"allow_functions: {item!r} is not a module-level function of an "
                                        "importable module")
            _ALLOWED_FUNCTIONS[ref] = item
            continue
        if not isinstance(item, str) or not _module_name(item):
            raise ArchitectureError(f"allow_functions takes module names such as 'mypkg.layers' or functions, "
                                    f"not {item!r}")
        if item in PURE_FUNCTIONS or _stdlib(item) or item.split(".")[0] == "torch":
            raise ArchitectureError(
                f"allow_functions({item!r}) would allow every function of {item!r}, including ones that touch files, "
                "processes or global state; allow the functions you need one by one: mm.allow_functions(fn)")
        ALLOWED_FUNCTION_MODULES.add(item)


def allow_modules(*packages: str) -> None:
    """Let records make this process import modules of these packages (``'mypkg'`` allows
    ``mypkg.models`` too) to find ``nn.Module`` classes, Hugging Face configs, enums and
    registered factories. Only allow packages whose import-time code and ``nn.Module`` classes
    you trust: a store may build any of those classes and run their ``forward``."""
    for pkg in packages:
        if not isinstance(pkg, str) or not _module_name(pkg):
            raise ArchitectureError(f"allow_modules takes package names such as 'mypkg', not {pkg!r}")
        ALLOWED_PACKAGES.add(pkg)


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


# -- references ------------------------------------------------------------------------------------
#: Packages that were renamed: records written before name the old module (stores stay readable).
RENAMED_PACKAGES = {"mm_jupyter.search": "mm_jupyter.modelsearch", "mm_jupyter.serve": "mm_jupyter.serving"}
#: Objects that moved to another module: records written before name the old place. Exact
#: ``module:name`` pairs (after the package renames above), never patterns: the paper's model
#: factories went to ``usecases``, the candidate-set generator to ``bench``.
MOVED_OBJECTS = {
    "mm_jupyter.modelsearch.synthetic:base_model": "mm_jupyter.usecases.candidates:base_model",
    "mm_jupyter.modelsearch.synthetic:digits_cnn": "mm_jupyter.usecases.candidates:digits_cnn",
    "mm_jupyter.modelsearch.synthetic:_Logits": "mm_jupyter.bench.synthetic:_Logits",
}


def _current_module(mod: str) -> str:
    for old, new in RENAMED_PACKAGES.items():
        if mod == old or mod.startswith(old + "."):
            return new + mod[len(old):]
    return mod


def _module_name(mod: str) -> bool:
    return bool(mod) and len(mod) <= 300 and all(p.isidentifier() for p in mod.split("."))


def _split(ref: Any) -> tuple[str, str]:
    """(module, qualname) of a reference, with a renamed package's old name replaced by its new one
    and a moved object's old place by its new one (any qualname: also for references a trusted
    record imports)."""
    if not isinstance(ref, str) or ref.count(":") != 1 or len(ref) > 400:
        raise ArchitectureError(f"reference {str(ref)[:100]!r} is not of the form 'module:qualname'")
    mod, qual = ref.split(":")
    if not _module_name(mod) or not qual or not all(p.isidentifier() for p in qual.split(".")):
        raise ArchitectureError(f"reference {ref!r} is not of the form 'module:qualname'")
    mod = _current_module(mod)
    moved = MOVED_OBJECTS.get(f"{mod}:{qual}")
    if moved is not None:
        mod, qual = moved.split(":")
    return mod, qual


def split_ref(ref: Any) -> tuple[str, str]:
    """(module, name) of a reference a record may hold: exactly one attribute step after the module
    (``torch.nn.modules.linear:Linear``), never a path through attributes (``torch:os.system``)."""
    mod, name = _split(ref)
    if "." in name:
        raise ArchitectureError(
            f"reference {ref!r} walks through attributes ({name!r}); a record may only name an object "
            "defined at the top level of its module ('module:name')")
    return mod, name


def import_ref(ref: str) -> Any:
    """Resolve ``module:qualname`` by importing and walking attributes — only for what the user
    already trusts (their own objects at save, a trusted store's provenance code)."""
    mod, qual = _split(ref)
    try:
        obj: Any = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # noqa: BLE001 - a module's import code may raise anything (a missing name: AttributeError)
        raise ArchitectureError(f"cannot import {ref!r}: {type(e).__name__}: {e}") from None
    return obj


def _stdlib(mod: str) -> bool:
    return mod.split(".")[0] in sys.stdlib_module_names


#: Modules imported by the session this process works for (a search's Ray workers: the driver's).
SESSION_MODULES: set[str] = set()


def session_modules() -> tuple[str, ...]:
    """The modules this session has imported that records may name (not the standard library, not
    executed recorded source): what a worker process of this session may import as if it had."""
    return tuple(sorted(m for m, mod in list(sys.modules.items())
                        if mod is not None and _module_name(m) and m != "__main__" and not _stdlib(m)
                        and not m.startswith(SOURCE_MODULE_PREFIX)))


def adopt_session(modules: tuple[str, ...]) -> None:
    """Treat ``modules`` (``session_modules()`` of the session this process works for) as imported."""
    SESSION_MODULES.update(m for m in modules if isinstance(m, str) and _module_name(m) and not _stdlib(m))


def _in_allowed_package(mod: str) -> bool:
    """A public module of an allowed package (private modules such as ``torch._dynamo`` or test
    helpers may change global state when imported: they must already be imported), a module whose
    functions the user allowed, or one the session this process works for has imported."""
    if mod in ALLOWED_FUNCTION_MODULES or mod in SESSION_MODULES:
        return True
    parts = mod.split(".")
    return (not any(p.startswith("_") for p in parts)
            and any(mod == p or mod.startswith(p + ".") for p in ALLOWED_PACKAGES))


def module_for(mod: str, ref: str, what: str, trusted: bool = False) -> types.ModuleType:
    """The module ``mod`` of a record's reference: already imported (nothing runs), else imported
    only from an allowed package (or any non-standard-library module when the store is trusted)."""
    if mod == "__main__" or mod.startswith(SOURCE_MODULE_PREFIX):
        if not (trusted and mod.startswith(SOURCE_MODULE_PREFIX)):
            raise ArchitectureError(f"{what} {ref!r} names the running session's own module; refused")
    module = sys.modules.get(mod)
    if isinstance(module, types.ModuleType):
        return module
    if not (_in_allowed_package(mod) or (trusted and not _stdlib(mod))):
        top = mod.split(".")[0]
        raise ArchitectureError(
            f"{what} {ref!r} is in module {mod!r}, which this session has not imported and which is not in an "
            f"allowed package ({', '.join(sorted(ALLOWED_PACKAGES))}): refused before importing it. If you trust "
            f"that package, import it first or call mm.allow_modules({top!r}) (or trust the store: trust_code=True)")
    try:
        return importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 - any failure of a module's own import code: one clear error
        raise ArchitectureError(f"cannot import module {mod!r} for {what} {ref!r}: {type(e).__name__}: {e}") from None


def lookup(ref: Any, what: str, trusted: bool = False) -> Any:
    """The object a one-step reference names, checked to be that very object (its own
    ``__module__`` and ``__qualname__``); the module's attribute hooks never run."""
    mod, name = split_ref(ref)
    module = module_for(mod, ref, what, trusted)
    obj = vars(module).get(name)
    if obj is None:
        raise ArchitectureError(f"cannot import {what} {ref!r}: module {mod!r} defines no {name!r}")
    if getattr(obj, "__module__", None) != mod or getattr(obj, "__qualname__", None) != name:
        own = f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', '?')}"
        raise ArchitectureError(f"{what} {ref!r} resolves to an object defined as {own!r}, not to {ref!r}; refused")
    return obj


def module_class(ref: str, what: str = "class", trusted: bool = False) -> type[nn.Module]:
    """An ``nn.Module`` subclass by reference; anything else is refused before it can run."""
    import torch

    obj = lookup(ref, what, trusted)
    if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        raise ArchitectureError(f"{what} {ref!r} is {a_type(obj)}, not an nn.Module class; refused")
    return obj


def config_class(ref: str, trusted: bool = False) -> HFConfigClass:
    """A Hugging Face configuration class (``PretrainedConfig``/``GenerationConfig``) by reference."""
    obj = lookup(ref, "config class", trusted)
    bases = hf_config_bases()
    if not (isinstance(obj, type) and bases and issubclass(obj, bases)):
        raise ArchitectureError(f"{ref!r} is not a Hugging Face configuration class; refused")
    return obj


def enum_class(ref: str, trusted: bool = False) -> type[enum.Enum]:
    """An ``enum.Enum`` subclass by reference (its members are plain data)."""
    obj = lookup(ref, "enum class", trusted)
    if not (isinstance(obj, type) and issubclass(obj, enum.Enum)):
        raise ArchitectureError(f"{ref!r} is a {type(obj).__name__}, not an Enum class; refused")
    return obj


def hf_config_bases() -> tuple[HFConfigClass, ...]:
    if "transformers" not in sys.modules:
        try:
            importlib.import_module("transformers")
        except ImportError:
            return ()
    tf = sys.modules["transformers"]
    return tuple(c for c in (getattr(tf, "PretrainedConfig", None), getattr(tf, "GenerationConfig", None)) if c)


_FUNCTION_TYPES = (types.FunctionType, types.BuiltinFunctionType)


@functools.lru_cache(maxsize=1)
def pure_functions() -> dict[str, Callable[..., Any]]:
    """The reviewed allow-list (:data:`PURE_FUNCTIONS`) as ``{own module:name: function}``."""
    table: dict[str, Callable[..., Any]] = {}
    for modname, names in PURE_FUNCTIONS.items():
        module = importlib.import_module(modname)
        for name in names:
            fn = getattr(module, name, None)  # a name missing from this torch version is left out
            if isinstance(fn, _FUNCTION_TYPES):
                table[f"{fn.__module__}:{fn.__name__}"] = fn
    return table


def _own_ref(fn: Any) -> str | None:
    """``module:name`` by the function's own ``__module__`` and ``__name__`` (a Python function's
    ``__qualname__`` must be that name too: nested functions and lambdas have none)."""
    mod, name = getattr(fn, "__module__", None), getattr(fn, "__name__", None)
    if not isinstance(mod, str) or not isinstance(name, str) or not name.isidentifier() or mod == "__main__":
        return None
    if isinstance(fn, types.FunctionType) and fn.__qualname__ != name:
        return None
    return f"{mod}:{name}"


def function(ref: str) -> Callable[..., Any]:
    """A function a record holds as an attribute value: on the reviewed allow-list, allowed
    exactly, or defined in a module the user allowed (``mm.allow_functions``)."""
    mod, name = split_ref(ref)
    key = f"{mod}:{name}"
    fn = pure_functions().get(key) or _ALLOWED_FUNCTIONS.get(key)
    if fn is not None:
        return fn
    if mod not in ALLOWED_FUNCTION_MODULES:
        reviewed = mod in PURE_FUNCTIONS or _stdlib(mod) or mod.split(".")[0] == "torch"
        hint = ("it is not one of the reviewed pure tensor functions (it may touch files, processes or global "
                "state): refused; if you trust it, call mm.allow_functions(<the function>)" if reviewed else
                f"if you trust it, call mm.allow_functions({mod!r}) before saving and recovering")
        raise ArchitectureError(f"function {ref!r} is not on the allow-list of functions a record may reference; "
                                f"{hint}")
    module = module_for(mod, ref, "function", trusted=True)  # the user allowed this module
    obj = vars(module).get(name)
    if not isinstance(obj, _FUNCTION_TYPES) or _own_ref(obj) != key:
        raise ArchitectureError(f"{ref!r} is not a function defined in {mod!r}; refused")
    return obj


def function_ref(fn: Any) -> str | None:
    """The reference a record holds for function ``fn`` (None: it has none — a lambda, a nested
    function, or one its module does not expose under its own name)."""
    ref = _own_ref(fn)
    if ref is None:
        return None
    if pure_functions().get(ref) is fn or _ALLOWED_FUNCTIONS.get(ref) is fn:
        return ref
    module = sys.modules.get(ref.split(":")[0])
    return ref if module is not None and vars(module).get(fn.__name__) is fn else None


def registered(ref: str, what: str, trusted: bool = False) -> Callable[..., Any]:
    """A callable the record calls with recorded arguments: must be registered by its module."""
    obj: Callable[..., Any] = lookup(ref, what, trusted)
    mod, name = split_ref(ref)
    if not is_registered(f"{mod}:{name}", obj):
        raise ArchitectureError(
            f"{what} {ref!r} is not registered; only functions decorated with "
            f"{'@mm.architecture' if what == 'factory' else '@mm.trusted'} may be called from a store record")
    return obj


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
