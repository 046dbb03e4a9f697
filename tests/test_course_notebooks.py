"""The course's three exercises (01 registry, 02 transfer learning, 05 serving), written once with nbgrader's
markers: their tasks and checks, their student versions, and how those run.

The solution notebooks run under nbval in ``make test`` (a failing check cell fails that run); here the committed
reference run must show every check passed, and the student versions must run until their first gap and
fail there, in the first task, with the stub's NotImplementedError."""
from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest

from mm_jupyter.course import assess, check, release, tasks
from mm_jupyter.course.notebook import BEGIN_HIDDEN, BEGIN_SOLUTION, CODE_STUB, strip_hidden

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = {
    "01_exercise_model_registry": ("return a.content_hash() == b.content_hash()", 5),
    "02_exercise_transfer_learning": ("model[-1] = nn.Linear(model[-1].in_features, classes)", 3),
    "05_exercise_model_serving": ("runs[frac].append(open_loop(s, work, pool, cap * frac))", 3),
}


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", EXERCISES)
def test_exercise_tasks_are_numbered_checked_and_passed_in_the_reference_run(name: str) -> None:
    nb = _read(name)
    found = tasks(nb, name)
    assert len(found) == EXERCISES[name][1]
    for k, task in enumerate(found, start=1):
        assert task.title.startswith(f"Check {k}: "), task.title
        assert task.points > 0 and task.grade_id.startswith(f"check-{k}-")
        assert all(BEGIN_SOLUTION in nb.cells[i].source for i in task.solutions)
        assert f"**Task {k}.**" in "".join(c.source for c in nb.cells[:task.check] if c.cell_type == "markdown")
    report = assess(nb, name)  # the committed outputs are the reference run's: every check passed
    assert report.passed, str(report)
    assert all(any(f"check {k} passed" in o.get("text", "") for o in nb.cells[t.check].outputs)
               for k, t in enumerate(found, start=1)), "each check cell says it passed"


@pytest.mark.parametrize("name", EXERCISES)
def test_student_version_has_stubs_and_visible_checks_only(name: str) -> None:
    nb = _read(name)
    student = release(nb, name)
    text = nbformat.writes(student)
    assert EXERCISES[name][0] not in text, "a solution is left in the student version"
    assert BEGIN_SOLUTION not in text and BEGIN_HIDDEN not in text
    for task in tasks(student, name):
        assert any(CODE_STUB.splitlines()[1] in student.cells[i].source for i in task.solutions)
        kept, _ = strip_hidden(nb.cells[task.check].source)
        assert "assert " in kept and student.cells[task.check].source == kept, "visible checks stay, hidden ones go"
    assert all(not c.outputs for c in student.cells if c.cell_type == "code")
    nbformat.validate(student)


@pytest.mark.notebook
@pytest.mark.parametrize("name", EXERCISES)
def test_student_version_runs_until_its_first_gap(name: str, tmp_path: Path) -> None:
    """Executed as a student would (a fresh kernel, the notebook's folder), it stops in the first task —
    in its solution cell or at its check — with the stub's NotImplementedError."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    student = release(_read(name), name)
    first = tasks(student, name)[0]
    client = NotebookClient(student, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(CellExecutionError) as err:
        client.execute()
    assert err.value.ename == "NotImplementedError", err.value
    failed = [i for i, c in enumerate(student.cells) if c.cell_type == "code"
              and any(o.get("output_type") == "error" for o in c.outputs)]
    assert failed and failed[0] in (*first.solutions, first.check), (failed, first)


@pytest.mark.notebook
@pytest.mark.slow
def test_check_reports_every_task_of_a_student_version(tmp_path: Path) -> None:
    """``check`` on the student version of Exercise 1, its first task answered: task 1 passes, the others
    were not attempted — and nothing of the run touches the exercise's folder."""
    name = "01_exercise_model_registry"
    student = release(_read(name), name)
    (solution,) = tasks(student, name)[0].solutions
    student.cells[solution].source = _read(name).cells[solution].source.replace(BEGIN_SOLUTION, "# my answer")
    student.cells[solution].source = student.cells[solution].source.replace("### END SOLUTION", "")
    path = tmp_path / f"{name}.ipynb"
    nbformat.write(student, path)
    report = check(path)
    assert [r.status for r in report.results] == ["pass"] + ["not attempted"] * 4, str(report)
    assert (tmp_path / "registry_store").is_dir()  # the notebook ran in its own folder
    shutil.rmtree(tmp_path / "registry_store")
