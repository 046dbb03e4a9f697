"""Re-execute the notebooks and store their reference outputs, the way nbval compares them.

    python scripts/refresh_notebooks.py [notebooks/NN_name.ipynb ...]

Widget state and widget outputs are never stored (``metadata.widgets`` is dropped; a live widget's cell
keeps its static picture only when it displayed one of its own), so a saved notebook shows its tables and
figures without a kernel. Cells marked ``# NBVAL_IGNORE_OUTPUT`` (timings, float results checked with a
tolerance in a later cell) keep their outputs for the reader; nbval does not compare them. ``# NBVAL_SKIP``
cells are stored without outputs.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
#: kernel start-up log lines that land in whichever cell runs first; nbval sanitizes them too
NOISE = re.compile(r"\[IPKernelApp\] WARNING \| Kernel is running over TCP without encryption[^\n]*\n?")


def clean(nb: nbformat.NotebookNode) -> None:
    """Drop widget state, widget views (a live widget's static picture stays), execution timestamps and the
    outputs of cells nbval skips."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        if "NBVAL_SKIP" in cell.source:
            cell.outputs = []
            cell.execution_count = None
            continue
        outputs = []
        for o in cell.outputs:
            data = o.get("data", {})
            if WIDGET_MIME in data:
                data.pop(WIDGET_MIME)
                if set(data) <= {"text/plain"}:  # a widget without a static picture of its own
                    continue
            if o.get("output_type") == "stream":
                o.text = NOISE.sub("", o.text)
                if not o.text:
                    continue
            outputs.append(o)
        cell.outputs = outputs


def refresh(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                   record_timing=False).execute()
    clean(nb)
    nbformat.write(nb, path)


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for p in paths:
        refresh(p)
        sys.stdout.write(f"refreshed {p}\n")
