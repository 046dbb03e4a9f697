"""Exercise notebooks written once, with nbgrader's markers: the tasks they hold and their student version.

An exercise is the solution notebook. nbgrader's conventions, so instructors who use nbgrader can use
it as it is:

* a **solution cell** (``metadata.nbgrader.solution: true``) holds the answer between comment lines
  ``### BEGIN SOLUTION`` and ``### END SOLUTION`` (a markdown answer likewise); the student version
  replaces the region with ``# YOUR CODE HERE`` / ``raise NotImplementedError()`` at the marker's
  indentation (``YOUR ANSWER HERE`` in markdown), and a solution cell without markers entirely;
* a **check cell** (``metadata.nbgrader.grade: true``, ``locked``, ``points``, a unique ``grade_id``)
  holds visible checks that stay, and ``### BEGIN HIDDEN TESTS`` / ``### END HIDDEN TESTS`` regions
  the student version drops.

A *task* is a check cell together with the solution cells since the previous check cell. The student
version also drops every output (they would show the answers) and widget state. Nothing here imports
nbgrader, torch or the rest of mm_jupyter: only nbformat.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import nbformat

from ..errors import CourseError

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
BEGIN_HIDDEN = "BEGIN HIDDEN TESTS"
END_HIDDEN = "END HIDDEN TESTS"
CODE_STUB = "# YOUR CODE HERE\nraise NotImplementedError()"
TEXT_STUB = "YOUR ANSWER HERE"
#: what a stub raises: a task whose solution cell still raises it was not attempted
STUB_ERROR = "NotImplementedError"


@dataclass(frozen=True)
class Task:
    """One graded task: its check cell and the solution cells before it (cell indices)."""

    grade_id: str
    points: float
    check: int
    solutions: tuple[int, ...]
    title: str

    def __str__(self) -> str:
        return self.title or self.grade_id


def meta(cell: Any) -> dict[str, Any]:
    """The cell's nbgrader metadata ({} when it has none)."""
    value = cell.get("metadata", {}).get("nbgrader", {})
    return value if isinstance(value, dict) else {}


def is_solution(cell: Any) -> bool:
    return bool(meta(cell).get("solution"))


def is_check(cell: Any) -> bool:
    return bool(meta(cell).get("grade")) and cell.cell_type == "code"


def _where(name: str, index: int) -> str:
    return f"{name}: cell {index + 1}"


def _replace_regions(source: str, begin: str, end: str, region: str, where: str, exact: bool,
                     stub: list[str]) -> tuple[str, bool]:
    """``source`` with each ``begin``..``end`` region (marker lines included) replaced by ``stub``, indented
    like its BEGIN line; whether it had one. ``exact``: a marker is a whole line, else any line holding it."""

    def marks(line: str, marker: str) -> bool:
        return line.strip() == marker if exact else marker in line

    out: list[str] = []
    inside = found = False
    for line in source.split("\n"):
        if marks(line, begin):
            if inside:
                raise CourseError(f"{where}: '{begin}' inside {region}")
            inside = found = True
            indent = line[: line.index(begin)]
            out += [indent + s for s in stub]
        elif marks(line, end):
            if not inside:
                raise CourseError(f"{where}: '{end}' without '{begin}'")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise CourseError(f"{where}: '{begin}' is never closed by '{end}'")
    return "\n".join(out), found


def strip_solution(source: str, code: bool, where: str = "a cell") -> tuple[str, bool]:
    """``source`` with each solution region replaced by the stub (indented like its BEGIN line);
    whether it had one. Nested or unclosed regions are a CourseError."""
    stub = (CODE_STUB if code else TEXT_STUB).split("\n")
    return _replace_regions(source, BEGIN_SOLUTION, END_SOLUTION, "a solution region", where, True, stub)


def strip_hidden(source: str, where: str = "a cell") -> tuple[str, bool]:
    """``source`` without its hidden-test regions (marker lines included); whether it had one."""
    return _replace_regions(source, BEGIN_HIDDEN, END_HIDDEN, "a hidden-test region", where, False, [])


def _title(source: str) -> str:
    """A check cell's first comment line, e.g. '# Check 2: the grown fleet is stored as a delta'."""
    for line in source.splitlines():
        text = line.strip()
        if text.startswith("#") and not text.startswith("# NBVAL_") and BEGIN_HIDDEN not in text:
            return text.lstrip("#").strip()
    return ""


def tasks(nb: Any, name: str = "notebook") -> list[Task]:
    """The notebook's tasks, checked: markers only in cells marked as solution / check cells, every
    check cell with a unique ``grade_id`` and its ``points``, a solution cell before every check."""
    found: list[Task] = []
    pending: list[int] = []
    ids: set[str] = set()
    for i, cell in enumerate(nb.cells):
        where = _where(name, i)
        source = cell.source
        has_solution = strip_solution(source, cell.cell_type == "code", where)[1]
        has_hidden = strip_hidden(source, where)[1]
        if has_solution and not is_solution(cell):
            raise CourseError(f"{where} has a solution region but is not a solution cell "
                              "(metadata.nbgrader.solution)")
        if has_hidden and not is_check(cell):
            raise CourseError(f"{where} has hidden tests but is not a check cell (metadata.nbgrader.grade)")
        if is_solution(cell) and is_check(cell):
            raise CourseError(f"{where} is marked as both a solution and a check cell")
        if is_solution(cell):
            pending.append(i)
        elif is_check(cell):
            m = meta(cell)
            grade_id, points = m.get("grade_id"), m.get("points")
            if not isinstance(grade_id, str) or not grade_id or grade_id in ids:
                raise CourseError(f"{where}: a check cell needs a unique grade_id, not {grade_id!r}")
            if isinstance(points, bool) or not isinstance(points, (int, float)) or points < 0:
                raise CourseError(f"{where}: check {grade_id!r} needs points (a number >= 0), not {points!r}")
            if not pending:
                raise CourseError(f"{where}: check {grade_id!r} has no solution cell before it")
            ids.add(grade_id)
            found.append(Task(grade_id, float(points), i, tuple(pending), _title(source)))
            pending = []
    if pending:
        raise CourseError(f"{_where(name, pending[0])}: a solution cell after the last check cell is never checked")
    return found


def release(nb: Any, name: str = "notebook") -> Any:
    """The student version of an exercise (a new notebook; ``nb`` is left as it is): solutions
    replaced by stubs, hidden tests dropped, visible checks kept, no outputs, no widget state."""
    if not tasks(nb, name):
        raise CourseError(f"{name} holds no tasks (no check cells with nbgrader metadata)")
    out = copy.deepcopy(nb)
    out.metadata.pop("widgets", None)
    for i, cell in enumerate(out.cells):
        where = _where(name, i)
        code = cell.cell_type == "code"
        source, replaced = strip_solution(cell.source, code, where)
        if is_solution(cell) and not replaced:
            source = CODE_STUB if code else TEXT_STUB  # a whole-cell answer
        source, _ = strip_hidden(source, where)
        cell.source = source
        if code:
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
    return out


def read(path: Any) -> Any:
    """A notebook file, validated (a CourseError names a file that is not one)."""
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except (OSError, ValueError, nbformat.ValidationError) as e:  # JSON errors are ValueErrors
        raise CourseError(f"{path}: not a readable notebook ({type(e).__name__}: {e})") from None
    return nb
