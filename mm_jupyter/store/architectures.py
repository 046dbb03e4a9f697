"""Architectures recorded without pickle, and rebuilt from that record.

Four forms, tried in this order when none is given:
1. a module built by a factory decorated with ``mm.architecture`` (it tags the module with the
   factory's ``module:qualname`` and JSON kwargs);
2. a Hugging Face ``transformers`` model: its class path and ``config.to_dict()``;
3. an importable class with a no-argument constructor;
4. a class defined in ``__main__`` (a notebook cell or script): its source, plus the imports,
   constants and helper classes/functions it refers to, so a fresh process can rebuild it.
Anything else needs ``architecture=Architecture.factory(fn, **kwargs)``.
"""
from __future__ import annotations

import ast
import builtins
import functools
import hashlib
import importlib
import inspect
import json
import linecache
import sys
import textwrap
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..errors import ArchitectureError

if TYPE_CHECKING:
    from torch import nn

TAG = "__mm_architecture__"


def _json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ArchitectureError(f"{what} must be JSON-serialisable: {e}") from None


def import_ref(ref: str) -> Any:
    """Resolve ``module:qualname``."""
    if ":" not in ref:
        raise ArchitectureError(f"reference {ref!r} is not of the form 'module:qualname'")
    mod, qual = ref.split(":", 1)
    try:
        obj: Any = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ArchitectureError(f"cannot import {ref!r}: {e}") from None
    return obj


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


@dataclass(frozen=True)
class Architecture:
    """How to build an empty model of a set. ``kind`` is factory, hf or source."""

    kind: str
    ref: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    source: str | None = None

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def factory(cls, fn: Callable[..., Any] | str, **kwargs: Any) -> "Architecture":
        """An importable callable (or ``'module:qualname'``) plus JSON kwargs."""
        if isinstance(fn, str):
            ref = fn
            import_ref(ref)
        else:
            ref = ref_of(fn)  # type: ignore[assignment]
            if ref is None:
                if isinstance(fn, type):
                    return cls.from_source(fn, **kwargs)
                raise ArchitectureError(
                    f"{getattr(fn, '__qualname__', fn)!r} is not importable; define it in a module "
                    "or pass a class (its source is recorded)"
                )
        return cls("factory", ref, _json(kwargs, "architecture kwargs"))

    @classmethod
    def hf(cls, model: Any) -> "Architecture":
        """A Hugging Face model: class path and config (weights are the set's parameters)."""
        ref = ref_of(type(model))
        if ref is None:
            raise ArchitectureError(f"{type(model).__name__} is not an importable transformers class")
        return cls("hf", ref, {}, _json(model.config.to_dict(), "the model config"))

    @classmethod
    def from_source(cls, klass: type, **kwargs: Any) -> "Architecture":
        """A class defined in a notebook cell or script, recorded as source code."""
        code = capture_source(klass)
        return cls("source", klass.__name__, _json(kwargs, "architecture kwargs"), None, code)

    @classmethod
    def infer(cls, model: "nn.Module") -> "Architecture":
        tagged = getattr(model, TAG, None)
        if isinstance(tagged, Architecture):
            return tagged
        klass = type(model)
        if klass.__module__.startswith("transformers.") and hasattr(model, "config"):
            return cls.hf(model)
        if klass.__module__ == "torch.nn.modules.container":
            raise ArchitectureError(
                f"an nn.{klass.__name__} cannot be rebuilt from its class alone; build it in an "
                "@mm.architecture factory or pass architecture=mm.Architecture.factory(fn, **kwargs)"
            )
        try:
            params = inspect.signature(klass.__init__).parameters
        except (TypeError, ValueError):
            params = {}
        required = [
            p.name for p in list(params.values())[1:]
            if p.default is inspect.Parameter.empty
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        if required:
            raise ArchitectureError(
                f"cannot tell how to rebuild {klass.__name__}: its constructor needs {required}; pass "
                "architecture=mm.Architecture.factory(fn_or_class, **kwargs) or build the models with "
                "an @mm.architecture factory"
            )
        ref = ref_of(klass)
        return cls("factory", ref, {}) if ref else cls.from_source(klass)

    # -- record -----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "ref": self.ref, "kwargs": self.kwargs}
        if self.config is not None:
            out["config"] = self.config
        if self.source is not None:
            out["source"] = self.source
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Architecture":
        if data.get("kind") not in ("factory", "hf", "source"):
            raise ArchitectureError(f"unknown architecture record kind {data.get('kind')!r}")
        return cls(data["kind"], data.get("ref", ""), data.get("kwargs", {}), data.get("config"),
                   data.get("source"))

    def describe(self) -> str:
        if self.kind == "source":
            return f"{self.ref} (source, {len(self.source or '')} chars)"
        return self.ref

    # -- build ------------------------------------------------------------------------------
    def build(self) -> "nn.Module":
        """A freshly initialised module of this architecture."""
        import torch

        if self.kind == "factory":
            model = import_ref(self.ref)(**self.kwargs)
        elif self.kind == "hf":
            klass = import_ref(self.ref)
            config = klass.config_class.from_dict(self.config)
            model = klass(config)
        else:
            klass = _load_source(self.source or "", self.ref)
            model = klass(**self.kwargs)
        if not isinstance(model, torch.nn.Module):
            raise ArchitectureError(f"{self.describe()} built a {type(model).__name__}, not an nn.Module")
        return model

    def build_meta(self) -> "nn.Module":
        """Build without allocating parameter memory (for checking shapes)."""
        import torch

        with torch.device("meta"):
            return self.build()


@functools.lru_cache(maxsize=64)
def _load_source(code: str, name: str) -> type:
    digest = hashlib.sha256(code.encode()).hexdigest()[:12]
    mod = types.ModuleType(f"mm_jupyter_source_{digest}")
    mod.__dict__["__builtins__"] = builtins
    try:
        exec(compile(code, f"<mm_jupyter architecture {name}>", "exec"), mod.__dict__)
    except Exception as e:  # the recorded code itself failed: say so, with its own message
        raise ArchitectureError(f"recorded source of {name} failed to run: {type(e).__name__}: {e}") from None
    sys.modules[mod.__name__] = mod
    klass = mod.__dict__.get(name)
    if klass is None:
        raise ArchitectureError(f"recorded source does not define {name}")
    return klass


def architecture(fn: Callable[..., "nn.Module"]) -> Callable[..., "nn.Module"]:
    """Decorator for model factories: modules they build remember how they were built.

    The factory must be importable and its arguments JSON-serialisable.
    """

    @functools.wraps(fn)
    def build(*args: Any, **kwargs: Any) -> "nn.Module":
        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        model = fn(*args, **kwargs)
        ref = f"{fn.__module__}:{fn.__qualname__}"
        object.__setattr__(model, TAG, Architecture("factory", ref, _json(dict(bound.arguments), f"{ref} arguments")))
        return model

    return build


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


def capture_source(klass: type) -> str:
    """Self-contained source for ``klass``: imports, constants and helpers it needs, then it."""
    return capture_code(_definition_source(klass), klass.__name__, _defining_namespace(klass))


def _defining_namespace(klass: type) -> Mapping[str, Any]:
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
            f"{user} uses {free!r} (a {type(v).__name__}), which cannot be recorded as source; "
            "make it a constant, an import, or pass architecture=mm.Architecture.factory(...)"
        )

    done.add(name)
    add_code(code, name)
    return "\n".join(imports + consts + [""] + defs)
