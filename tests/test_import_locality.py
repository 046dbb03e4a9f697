"""Imports sit at the top of a module, except to defer a heavy or optional dependency: in the core packages
and the course, a function-local import must load something (torch, transformers, Ray, a database driver, ...)
that its module does not load already — never hide an import circle or a cheap module (issue 21)."""
from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mm_jupyter"
CHECKED = ("store", "modelsearch", "serving", "usecases", "course")
#: third-party packages worth deferring: heavy to import, or an optional extra
DEFERRED = frozenset({
    "torch", "transformers", "ray", "boto3", "botocore", "psycopg", "pandas", "starlette", "uvicorn", "h11",
    "sklearn", "safetensors", "nbclient", "nbformat", "IPython", "ipywidgets", "plotly", "moto", "playwright",
    "scipy", "jupyter_server", "tornado",
})


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in PACKAGE.rglob("*.py")}


@cache
def _tree(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text())


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        if MODULES[module].name != "__init__.py":
            parts = parts[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _top_level(module: str) -> list[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported: not in functions, not under ``if TYPE_CHECKING``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                found.append(stmt)
            elif isinstance(stmt, ast.If):
                walk(stmt.orelse if "TYPE_CHECKING" in ast.unparse(stmt.test) else stmt.body + stmt.orelse)
            elif isinstance(stmt, ast.Try):
                walk(stmt.body + stmt.orelse + stmt.finalbody + [s for h in stmt.handlers for s in h.body])
            elif isinstance(stmt, (ast.With, ast.ClassDef)):
                walk(stmt.body)

    walk(_tree(module).body)
    return found


@cache
def _loads(module: str) -> frozenset[str]:
    """The deferred third-party packages importing ``module`` loads (through its packages and their imports;
    a walk over the import graph, which may hold package <-> submodule circles)."""
    seen, todo, out = {module}, [module], set()
    while todo:
        current = todo.pop()
        top = current.split(".")[0]
        if top != "mm_jupyter":
            if top in DEFERRED:
                out.add(current)  # by full name: a submodule the package does not load itself may be deferred
            continue
        if current not in MODULES:
            continue
        parts = current.split(".")
        nxt = [".".join(parts[:i]) for i in range(1, len(parts))]
        nxt += [t for node in _top_level(current) for t in _targets(current, node)]
        for target in nxt:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return frozenset(out)


def _local_imports(module: str) -> list[tuple[int, str]]:
    out = []
    for fn in ast.walk(_tree(module)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    out += [(node.lineno, t) for t in _targets(module, node)]
    return sorted(set(out))


def test_function_local_imports_only_defer_heavy_or_optional_dependencies() -> None:
    wrong = [f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {target}"
             for m in sorted(MODULES) if m.split(".")[1:2] and m.split(".")[1] in CHECKED
             for line, target in _local_imports(m)
             if not _loads(target) - _loads(m)]
    assert not wrong, "function-local imports that defer nothing heavy or optional:\n" + "\n".join(wrong)


def test_the_check_sees_a_needless_local_import() -> None:
    """The rule's own proof: a cheap local import is caught, a deferred torch is not."""
    module = "mm_jupyter.store.files"
    assert _loads("mm_jupyter.modelsearch.blocks") >= {"torch"}
    assert not _loads("mm_jupyter.errors")
    assert not _loads("mm_jupyter.errors") - _loads(module)  # what the test flags
    assert _loads("torch") - _loads(module) == {"torch"}  # what it allows
    assert _loads("torch.utils.flop_counter") - _loads("mm_jupyter.modelsearch.blocks")  # a submodule torch defers
