"""Recorded source code: capturing a class or function defined in a notebook cell as
self-contained source, finding the session's own definitions, and running recorded source.

A leaf below ``architectures.py`` and ``structure.py`` (both record and rebuild code); whether
recorded code may run is decided by the callers through :mod:`.trust`.
"""
from __future__ import annotations

import ast
import builtins
import functools
import hashlib
import inspect
import linecache
import sys
import textwrap
import types
from typing import Any, Callable, Mapping

from ..errors import ArchitectureError, a_type
from . import trust
from .trust import import_ref


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


# -- capturing the source of notebook classes ------------------------------------------------------
def definition_source(obj: Any) -> str:
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
    return capture_code(definition_source(klass), klass.__name__, defining_namespace(klass))


def defining_namespace(klass: type | Callable[..., Any]) -> Mapping[str, Any]:
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
            add_code(definition_source(v), v.__name__)
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


__all__ = ["capture_code", "capture_source", "defining_namespace", "definition_source", "exec_source", "ref_of",
           "session_namespaces"]
