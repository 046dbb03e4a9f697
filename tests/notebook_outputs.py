"""Compare a notebook's outputs with its committed reference by nbval's strict rules, without running it.

The browser test runs the tour in JupyterLab; this lets the same run stand for ``pytest --nbval`` on the tour,
so the tour runs once per ``make test``. The rules are nbval's (its own helpers where it has them): a cell
marked ``# NBVAL_IGNORE_OUTPUT`` or ``# NBVAL_SKIP`` (or the matching tags) is not compared; streams of one
name are merged and ``\\r``/``\\b`` applied; outputs are compared per key (``data`` flattened to its mime
types) in order, after the sanitising patterns, ignoring metadata, execution counts, tracebacks, images and
widget views; an error fails unless the cell is marked ``# NBVAL_RAISES_EXCEPTION``.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import nbformat
from nbval.plugin import (
    coalesce_streams,
    find_comment_markers,
    find_metadata_tags,
    get_sanitize_patterns,
    transform_streams_for_comparison,
)

#: What nbval does not compare (``IPyNbFile.skip_compare`` without ``--nbdime``).
SKIP = ("metadata", "traceback", "prompt_number", "output_type", "name", "execution_count",
        "application/vnd.jupyter.widget-view+json", "image/png", "image/jpeg")


def _flatten(outputs: list[Any], patterns: list[tuple[str, str]]) -> dict[str, list[Any]]:
    def clean(value: Any) -> Any:
        if isinstance(value, str):
            for regex, replace in patterns:
                value = re.sub(regex, replace, value)
        return value

    flat: dict[str, list[Any]] = defaultdict(list)
    for out in transform_streams_for_comparison(coalesce_streams(outputs)):
        for key, value in out.items():
            if key in SKIP:
                continue
            if key == "data":
                for mime, data in value.items():
                    if mime not in SKIP:
                        flat[mime].append(clean(data))
            else:
                flat[key].append(clean(value))
    return flat


def differences(reference: Path, run: Path, sanitize: Path | None = None) -> list[str]:
    """What nbval ``--nbval`` would report for ``run`` against ``reference``: one line per failing cell."""
    ref = nbformat.read(reference, as_version=4)
    got = nbformat.read(run, as_version=4)
    patterns = get_sanitize_patterns(sanitize.read_text()) if sanitize else []
    ref_cells = [c for c in ref.cells if c.cell_type == "code"]
    got_cells = [c for c in got.cells if c.cell_type == "code"]
    if [c.source for c in ref_cells] != [c.source for c in got_cells]:
        return ["the code cells differ from the reference's"]
    problems = []
    for n, (want, cell) in enumerate(zip(ref_cells, got_cells)):
        options = {"check": True, "check_exception": False, "skip": False}
        options.update(find_comment_markers(want.source))
        options.update(find_metadata_tags(want.metadata))
        if options["skip"]:
            continue
        if cell.execution_count is None:
            problems.append(f"code cell {n}: not run")
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        if errors and not options["check_exception"]:
            problems.append(f"code cell {n}: raised {errors[0].ename}: {errors[0].evalue}")
            continue
        if not options["check"] or want.execution_count is None:
            continue
        a, b = _flatten(want.outputs, patterns), _flatten(cell.outputs, patterns)
        if a != b:
            keys = sorted(set(a) | set(b))
            diff = [k for k in keys if a.get(k) != b.get(k)]
            problems.append(f"code cell {n} ({want.source.splitlines()[0][:60]!r}): outputs differ in {diff}: "
                            f"reference {[a.get(k) for k in diff]!r}, run {[b.get(k) for k in diff]!r}")
    return problems
