"""Every public exception lives in ``mm_jupyter.errors`` (drawn in its docstring); the old import
paths keep working and name the very same classes."""
from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mm_jupyter
from mm_jupyter import errors

PACKAGE = Path(mm_jupyter.__file__).parent

#: (old module, class name): where each class was defined before it moved to errors.py
OLD_PATHS = [
    ("mm_jupyter.serving.errors", "BadInputError"),
    ("mm_jupyter.serving.errors", "UnknownModelError"),
    ("mm_jupyter.serving.errors", "QueueFullError"),
    ("mm_jupyter.serving.errors", "ServerClosedError"),
    ("mm_jupyter.serving.errors", "ServeError"),
    ("mm_jupyter.serving", "BadInputError"),
    ("mm_jupyter.serving", "QueueFullError"),
    ("mm_jupyter.jupyter.cells", "CellError"),
    ("mm_jupyter.store.files", "OutOfSpace"),
    ("mm_jupyter.store.catalog", "MissingCatalog"),
    ("mm_jupyter.store.catalog", "EmptyCatalog"),
    ("mm_jupyter.modelsearch.verify", "ProbeMismatch"),
    ("mm_jupyter.jupyter.server", "PayloadError"),
    ("mm_jupyter.bench.papers", "PaperNumbersError"),
    ("mm_jupyter.store.testing", "ServiceError"),
]


@pytest.mark.parametrize(("module", "name"), OLD_PATHS)
def test_old_import_paths_name_the_same_class(module: str, name: str) -> None:
    assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def _exception_names(tree: ast.Module, known: set[str]) -> set[str]:
    """Public classes in ``tree`` whose bases include a known exception class (or Exception)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            bases = {b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
                     for b in node.bases}
            if bases & (known | {"Exception", "BaseException", "RuntimeError", "ValueError"}):
                found.add(node.name)
    return found


def test_no_public_exception_is_defined_outside_errors() -> None:
    known = set(errors.__all__)
    outside = {
        f"{path.relative_to(PACKAGE)}:{name}"
        for path in PACKAGE.rglob("*.py") if path.name != "errors.py" or path.parent != PACKAGE
        for name in _exception_names(ast.parse(path.read_text()), known)
    }
    assert outside == set()


def test_every_exception_is_exported_and_drawn_in_the_tree() -> None:
    classes = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, BaseException)}
    assert classes == set(errors.__all__)
    doc = errors.__doc__ or ""
    drawn = re.findall(r"^\s*[*+|\s]*\+?\s*(\w+) \.", doc, flags=re.M) + re.findall(r"^\* (\w+)$", doc, flags=re.M)
    assert set(drawn) == classes
    for name in classes:  # every class is indented one level below its base in the drawing
        cls = getattr(errors, name)
        if cls is errors.MMError:
            continue
        line = next(x for x in doc.splitlines() if re.search(rf"\b{name}\b \.", x))
        base = next(b for b in cls.__mro__[1:] if b.__name__ in classes)
        base_line = next(x for x in doc.splitlines() if re.search(rf"[*+] {base.__name__}\b", x))
        assert line.index("+") == base_line.index("+" if "+" in base_line else "*") + 2, name
    assert all(issubclass(getattr(errors, n), errors.MMError) for n in classes)


def test_errors_imports_nothing_of_the_package_and_mm_stays_light() -> None:
    tree = ast.parse((PACKAGE / "errors.py").read_text())
    inside = [n for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and (n.level or "mm_jupyter" in (n.module or ""))]
    assert inside == []
    code = ("import sys, mm_jupyter.errors, mm_jupyter.serving.errors; "
            "assert 'torch' not in sys.modules and 'mm_jupyter.store' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_out_of_space_names_the_file_system_and_keeps_it_for_another_thing(tmp_path: Path) -> None:
    from mm_jupyter.store.files import mount_point, out_of_space

    e = out_of_space(tmp_path / "x", 2_000_000, "the parameters")
    assert e.fs == mount_point(tmp_path) and e.needed == 2_000_000 and e.free > 0
    assert f"no space left on {e.fs} for the parameters: needed 2.0 MB" in str(e)
    other = e.about("set 'cells'")
    assert isinstance(other, errors.OutOfSpace) and (other.fs, other.free) == (e.fs, e.free)
    assert "for set 'cells'" in str(other)


def test_service_error_is_still_a_runtime_error() -> None:
    assert issubclass(errors.ServiceError, RuntimeError) and issubclass(errors.ServiceError, errors.MMError)
