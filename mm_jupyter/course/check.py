"""Run a student's exercise notebook and report every task's check: pass, fail or not attempted.

The notebook runs as the student would run it — in its own folder, on a fresh kernel, every cell in
order — with errors allowed, so one missing answer does not hide the state of later tasks. A task is
*not attempted* while one of its solution cells still raises the stub's ``NotImplementedError``; it
*passes* when its check cell ran without an error, and *fails* otherwise (the report gives the
check's error line, and the first earlier cell that failed when that may be the cause).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CourseError
from .notebook import CODE_STUB, STUB_ERROR, Task, read, tasks

PASS, FAIL, NOT_ATTEMPTED = "pass", "fail", "not attempted"
#: seconds one cell may run (a training or load cell of the exercises takes well under a minute)
CELL_TIMEOUT = 900


@dataclass(frozen=True)
class TaskResult:
    """How one task's check came out, and why."""

    task: Task
    status: str
    detail: str = ""


@dataclass(frozen=True)
class CheckReport:
    """Every task of one notebook, in order; ``passed`` when all of them pass."""

    notebook: str
    results: list[TaskResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.status == PASS for r in self.results)

    @property
    def points(self) -> tuple[float, float]:
        """(points of the passed checks, points of all checks)."""
        return (sum(r.task.points for r in self.results if r.status == PASS),
                sum(r.task.points for r in self.results))

    def __str__(self) -> str:
        width = max((len(str(r.task)) for r in self.results), default=4)
        lines = [f"{self.notebook}:"]
        for r in self.results:
            line = f"  {str(r.task):<{width}}  {r.status}"
            lines.append(line + (f": {r.detail}" if r.detail else ""))
        got, total = self.points
        npass = sum(r.status == PASS for r in self.results)
        lines.append(f"{npass} of {len(self.results)} checks pass ({got:g} of {total:g} points)")
        return "\n".join(lines)


def _error(cell: Any) -> tuple[str, str] | None:
    """(exception name, one line) of the error a code cell raised, or None."""
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            value = str(out.get("evalue", "")).strip().splitlines()
            return str(out.get("ename", "Error")), f"{out.get('ename', 'Error')}: {value[0] if value else ''}".strip()
    return None


def _stubbed(cell: Any) -> bool:
    """The cell still holds (or raised) the stub: its answer is missing."""
    error = _error(cell)
    lines = [line.strip() for line in cell.source.splitlines()]
    stub = [line.strip() for line in CODE_STUB.splitlines()]
    return (error is not None and error[0] == STUB_ERROR) or any(
        lines[k:k + len(stub)] == stub for k in range(len(lines)))


def assess(nb: Any, name: str = "notebook") -> CheckReport:
    """The report of an *executed* notebook (its outputs hold the errors)."""
    results = []
    for task in tasks(nb, name):
        stubs = [i for i in task.solutions if nb.cells[i].cell_type == "code" and _stubbed(nb.cells[i])]
        error = _error(nb.cells[task.check])
        if stubs:
            results.append(TaskResult(task, NOT_ATTEMPTED, f"cell {stubs[0] + 1} still raises {STUB_ERROR}"))
        elif error is not None and error[0] == STUB_ERROR:
            results.append(TaskResult(task, NOT_ATTEMPTED, f"the check reached a {STUB_ERROR}"))
        elif error is None:
            results.append(TaskResult(task, PASS))
        else:
            earlier = next((i for i in range(task.check) if nb.cells[i].cell_type == "code"
                            and _error(nb.cells[i]) is not None), None)
            cause = f" (cell {earlier + 1} failed before it)" if earlier is not None else ""
            results.append(TaskResult(task, FAIL, f"{error[1]}{cause}"))
    return CheckReport(name, results)


def check(path: str | Path, timeout: int = CELL_TIMEOUT, kernel: str | None = None) -> CheckReport:
    """Run the notebook at ``path`` (a copy: the file is not changed) in its folder and report each
    task's check. ``kernel``: the kernel name (default: the notebook's, else python3)."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    path = Path(path)
    nb = read(path)
    tasks(nb, path.name)  # malformed markers are reported before anything runs
    run = copy.deepcopy(nb)
    name = kernel or run.metadata.get("kernelspec", {}).get("name") or "python3"
    client = NotebookClient(run, timeout=timeout, kernel_name=name, allow_errors=True, record_timing=False,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    try:
        client.execute()
    except (CellTimeoutError, DeadKernelError) as e:
        raise CourseError(f"{path}: the run stopped: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return assess(run, path.name)
