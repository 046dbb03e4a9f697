"""The committed notebooks: all seven exist, all run in CI (the Makefile names each; the tour runs in the
browser test), one flag
switches them to full scale, no widget state or widget output is committed, and no float result of training is
compared character by character."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["00_tour", "01_exercise_model_registry", "02_exercise_transfer_learning",
             "03_paper_multi_model_management", "04_paper_alsatian", "05_exercise_model_serving",
             "06_paper_alsatian_evaluation", "07_model_lake"]
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def test_every_notebook_runs_in_ci() -> None:
    """Under nbval (the Makefile names each) or, the tour, in the browser test, which compares its outputs
    by nbval's strict rules."""
    found = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert found == NOTEBOOKS
    makefile = (ROOT / "Makefile").read_text()
    nbval = re.search(r"^STRICT_NOTEBOOKS := (.*)$", makefile, re.MULTILINE)
    lax = re.search(r"^LAX_NOTEBOOKS := ((?:.*\\\n)*.*)$", makefile, re.MULTILINE)
    assert nbval and lax
    named = set(re.findall(r"notebooks/(\w+)\.ipynb", nbval.group(1) + lax.group(1)))
    assert named == set(NOTEBOOKS) - {"00_tour"}
    browser = (ROOT / "tests" / "test_browser.py").read_text()  # the tour: run, saved, compared strictly
    assert 'TOUR = "notebooks/00_tour.ipynb"' in browser and 'differences(ROOT / TOUR, lab["root"] / TOUR' in browser


def _tour() -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / "00_tour.ipynb", as_version=4)


def _checked(nb: nbformat.NotebookNode, ignored: bool) -> nbformat.NotebookNode:
    """The first code cell with a text/plain result whose output nbval compares (``ignored=False``) or not."""
    return next(c for c in nb.cells if c.cell_type == "code" and c.outputs
                and ("NBVAL_IGNORE_OUTPUT" in c.source) == ignored
                and any("text/plain" in o.get("data", {}) for o in c.outputs))


def test_outputs_are_compared_by_nbvals_strict_rules(tmp_path: Path) -> None:
    """The comparison that stands for ``pytest --nbval`` on the tour fails where nbval would, and only there."""
    from notebook_outputs import differences

    ref, cfg = ROOT / "notebooks" / "00_tour.ipynb", ROOT / "notebooks" / "nbval_sanitize.cfg"
    run = tmp_path / "run.ipynb"
    assert differences(ref, ref, cfg) == []

    def changed(edit) -> list[str]:
        nb = _tour()
        edit(nb)
        nbformat.write(nb, run)
        return differences(ref, run, cfg)

    def retext(cell: nbformat.NotebookNode, text: str) -> None:
        next(o for o in cell.outputs if "text/plain" in o.get("data", {})).data["text/plain"] = text

    def error(nb: nbformat.NotebookNode) -> None:
        _checked(nb, ignored=True).outputs.append(nbformat.v4.new_output("error", ename="ValueError", evalue="x"))

    def warning(nb: nbformat.NotebookNode) -> None:
        _checked(nb, ignored=False).outputs.append(nbformat.v4.new_output("stream", name="stderr", text="oh"))

    def rerun(nb: nbformat.NotebookNode) -> None:
        for cell in nb.cells:
            if cell.cell_type == "code" and cell.execution_count is not None:
                cell.execution_count += 100  # counts, metadata and widget views are not compared
                for out in cell.outputs:
                    out.setdefault("metadata", {})["extra"] = 1
                    if "data" in out:
                        out.data["image/png"] = "AAAA"

    assert len(changed(lambda nb: retext(_checked(nb, ignored=False), "something else"))) == 1
    assert changed(lambda nb: retext(_checked(nb, ignored=True), "timings vary")) == []
    assert "raised ValueError: x" in changed(error)[0]
    assert "stderr" in changed(warning)[0]
    assert changed(rerun) == []
    assert changed(lambda nb: setattr(_checked(nb, ignored=False), "execution_count", None)) != []
    assert changed(lambda nb: nb.cells.append(nbformat.v4.new_code_cell("1"))) == \
        ["the code cells differ from the reference's"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean_and_scalable(name: str) -> None:
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert "widgets" not in nb.metadata, "widget state must not be committed"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert any('os.environ.get("MM_JUPYTER_FULL") == "1"' in c.source for c in code[:2]), "full-scale flag"
    for cell in code:
        for out in cell.outputs:
            assert WIDGET_MIME not in out.get("data", {}), f"widget output committed in {name}"
        if "NBVAL_SKIP" in cell.source:
            assert not cell.outputs, f"{name}: a skipped cell keeps outputs in the commit"
        assert "execution" not in cell.metadata, f"{name}: execution timestamps committed"
        for line in cell.source.splitlines():  # nbval honours a marker only on a comment line of its own
            if "NBVAL_" in line and line.strip().startswith("#"):
                assert re.fullmatch(r"\s*# NBVAL_(IGNORE_OUTPUT|CHECK_OUTPUT|SKIP|RAISES_EXCEPTION)", line), \
                    f"{name}: {line.strip()!r} is not a marker nbval recognises (put the note on the next line)"


def _capability_notebook(path: Path) -> None:
    """Two cells printing the kernel's CPU kernel path: the first with a stale output (compared by strict runs
    only), the second asking to be compared (``# NBVAL_CHECK_OUTPUT``) against torch's plain path."""
    code = "import torch\nprint(torch.backends.cpu.get_cpu_capability())"
    nb = nbformat.v4.new_notebook()
    for n, (source, shown) in enumerate(((code, "STALE"), ("# NBVAL_CHECK_OUTPUT\n" + code, "DEFAULT")), 1):
        cell = nbformat.v4.new_code_cell(source, execution_count=n)
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=shown + "\n")]
        nb.cells.append(cell)
    nbformat.write(nb, path)


@pytest.mark.notebook
def test_a_lax_notebook_is_compared_only_where_a_cell_asks_on_plain_kernels(tmp_path: Path) -> None:
    """``--lax-notebook`` (tests/conftest.py) makes one notebook of a strict run lax, as ``--nbval-lax`` would,
    and starts its kernel on torch's plain CPU kernels; the other notebooks stay strict."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    _capability_notebook(tmp_path / "lax.ipynb")
    _capability_notebook(tmp_path / "strict.ipynb")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--nbval",
         "--nbval-current-env", "-rA", "--lax-notebook", "lax.ipynb", "lax.ipynb", "strict.ipynb"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"})
    outcome = {node: status
               for status, node in re.findall(r"^(PASSED|FAILED) (\S+::Cell \d+)", done.stdout, re.MULTILINE)}
    import torch

    native = torch.backends.cpu.get_cpu_capability()  # strict Cell 1 passes only where the native path is DEFAULT
    assert outcome == {"lax.ipynb::Cell 0": "PASSED", "lax.ipynb::Cell 1": "PASSED", "strict.ipynb::Cell 0": "FAILED",
                       "strict.ipynb::Cell 1": "PASSED" if native == "DEFAULT" else "FAILED"}, done.stdout[-3000:]
