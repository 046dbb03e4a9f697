"""Course tooling on a small exercise: nbgrader's markers and metadata, the student version (stubs, no
hidden tests, visible checks kept, no outputs), and ``check`` (pass / fail / not attempted) on a real
kernel, through the command line too."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import mm_jupyter as mm
from mm_jupyter.course import check, release, tasks
from mm_jupyter.course.notebook import CODE_STUB, strip_hidden, strip_solution

ROOT = Path(__file__).resolve().parents[1]


def nbgrader(cell, **meta):
    cell.metadata["nbgrader"] = {"schema_version": 3, "task": False, "locked": False, "solution": False,
                                 "grade": False, **meta}
    return cell


def exercise() -> nbformat.NotebookNode:
    """Two tasks: a function to write and a value to compute, each with visible and hidden checks."""
    code, md = nbformat.v4.new_code_cell, nbformat.v4.new_markdown_cell
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        md("# A tiny exercise"),
        code("data = [3, 1, 2]"),
        nbgrader(code("def largest(xs):\n    ### BEGIN SOLUTION\n    return max(xs)\n    ### END SOLUTION"),
                 solution=True, grade_id="task-largest"),
        nbgrader(code("# Check 1: largest\nassert largest(data) == 3, 'largest([3, 1, 2]) should be 3'\n"
                      "### BEGIN HIDDEN TESTS\nassert largest([-5, -2]) == -2\n### END HIDDEN TESTS\n"
                      "print('check 1 passed')"),
                 grade=True, locked=True, points=2, grade_id="check-largest"),
        nbgrader(code("### BEGIN SOLUTION\ntotal = sum(data)\n### END SOLUTION"), solution=True,
                 grade_id="task-total"),
        nbgrader(code("# Check 2: total\nassert total == 6, f'the total of {data} is 6, not {total}'"),
                 grade=True, locked=True, points=1, grade_id="check-total"),
        nbgrader(md("Why?\n\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION"), solution=True, grade_id="why"),
        nbgrader(code("# Check 3: an answer was written\nassert True"), grade=True, locked=True, points=0,
                 grade_id="check-why"),
    ]
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="a solution's output\n")]
    return nb


def test_tasks_pair_each_check_with_its_solution_cells():
    found = tasks(exercise())
    assert [(t.grade_id, t.points, t.check, t.solutions, t.title) for t in found] == [
        ("check-largest", 2.0, 3, (2,), "Check 1: largest"),
        ("check-total", 1.0, 5, (4,), "Check 2: total"),
        ("check-why", 0.0, 7, (6,), "Check 3: an answer was written"),
    ]


def test_release_writes_stubs_drops_hidden_tests_keeps_visible_checks():
    source = exercise()
    student = release(source)
    cells = student.cells
    assert cells[2].source == "def largest(xs):\n    # YOUR CODE HERE\n    raise NotImplementedError()"
    assert cells[4].source == CODE_STUB
    assert cells[6].source == "Why?\n\nYOUR ANSWER HERE"
    assert cells[3].source == ("# Check 1: largest\nassert largest(data) == 3, 'largest([3, 1, 2]) should be 3'\n"
                               "print('check 1 passed')")
    assert "max(xs)" not in nbformat.writes(student) and "-5, -2" not in nbformat.writes(student)
    assert all(c.outputs == [] and c.execution_count is None for c in cells if c.cell_type == "code")
    assert [c.metadata["nbgrader"] for c in cells if "nbgrader" in c.metadata] == \
        [c.metadata["nbgrader"] for c in source.cells if "nbgrader" in c.metadata]  # nbgrader can still use it
    assert "max(xs)" in source.cells[2].source  # the exercise itself is untouched
    nbformat.validate(student)


@pytest.mark.parametrize("source, message", [
    ("### BEGIN SOLUTION\nx = 1", "never closed"),
    ("### END SOLUTION", "without"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside a solution region"),
])
def test_malformed_solution_markers_are_one_clear_error(source, message):
    with pytest.raises(mm.CourseError, match=message):
        strip_solution(source, True, "ex.ipynb: cell 3")
    with pytest.raises(mm.CourseError, match="never closed"):
        strip_hidden("### BEGIN HIDDEN TESTS\nassert x", "ex.ipynb: cell 4")


@pytest.mark.parametrize("change, message", [
    (lambda nb: nb.cells[2].metadata.pop("nbgrader"), "cell 3 has a solution region but is not a solution cell"),
    (lambda nb: nb.cells[3].metadata["nbgrader"].update(grade=False), "cell 4 has hidden tests but is not a check"),
    (lambda nb: nb.cells[5].metadata["nbgrader"].update(grade_id="check-largest"), "unique grade_id"),
    (lambda nb: nb.cells[5].metadata["nbgrader"].pop("points"), "needs points"),
    (lambda nb: nb.cells.pop(4), "check 'check-total' has no solution cell before it"),
    (lambda nb: nb.cells.pop(7), "a solution cell after the last check cell is never checked"),
])
def test_metadata_mistakes_are_named(change, message):
    nb = exercise()
    change(nb)
    with pytest.raises(mm.CourseError, match=message):
        release(nb, "ex.ipynb")


@pytest.mark.notebook
def test_check_reports_pass_fail_and_not_attempted(tmp_path):
    solution = tmp_path / "solution.ipynb"
    nbformat.write(exercise(), solution)
    report = check(solution, timeout=120)
    assert report.passed and [r.status for r in report.results] == ["pass", "pass", "pass"]
    assert report.points == (3.0, 3.0)
    assert str(report).splitlines()[-1] == "3 of 3 checks pass (3 of 3 points)"

    student = release(exercise())
    nbformat.write(student, tmp_path / "student.ipynb")
    report = check(tmp_path / "student.ipynb", timeout=120)
    assert [(r.status, r.detail) for r in report.results] == [
        ("not attempted", "cell 3 still raises NotImplementedError"),
        ("not attempted", "cell 5 still raises NotImplementedError"),
        ("pass", ""),  # a markdown answer is not run: its check decides
    ]
    student.cells[2].source = "def largest(xs):\n    return xs[0]"  # wrong
    student.cells[4].source = "total = sum(data)"                    # right
    nbformat.write(student, tmp_path / "student.ipynb")
    report = check(tmp_path / "student.ipynb", timeout=120)
    assert [r.status for r in report.results] == ["pass", "pass", "pass"]  # the hidden test is not there
    student.cells[4].source = "total = len(data)"
    nbformat.write(student, tmp_path / "student.ipynb")
    report = check(tmp_path / "student.ipynb", timeout=120)
    assert report.results[1].status == "fail"
    assert report.results[1].detail == "AssertionError: the total of [3, 1, 2] is 6, not 3"
    assert "1 of 3 points" not in str(report) and "2 of 3 checks pass (2 of 3 points)" in str(report)


@pytest.mark.notebook
def test_command_line_release_and_check(tmp_path):
    src = tmp_path / "ex.ipynb"
    nbformat.write(exercise(), src)
    run = [sys.executable, "-m", "mm_jupyter.course"]
    out = subprocess.run([*run, "release", str(tmp_path / "student"), str(src)], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{tmp_path / 'student' / 'ex.ipynb'}: 3 task(s)"
    assert "raise NotImplementedError()" in (tmp_path / "student" / "ex.ipynb").read_text()
    refused = subprocess.run([*run, "release", str(tmp_path), str(src)], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "is the exercise itself" in refused.stderr
    checked = subprocess.run([*run, "check", str(tmp_path / "student" / "ex.ipynb")], capture_output=True,
                             text=True, cwd=ROOT)
    assert checked.returncode == 1, checked.stderr
    assert re.search(r"Check 1: largest +not attempted: cell 3 still raises NotImplementedError", checked.stdout)
    assert checked.stdout.splitlines()[-1] == "1 of 3 checks pass (0 of 3 points)"
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not json")
    failed = subprocess.run([*run, "check", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert failed.returncode == 2 and failed.stderr.startswith("CourseError: ")
    assert "not a readable notebook" in failed.stderr
