"""Running a magic's cell body: in the user namespace with its last value, or as training code.

Kept apart from the magics so the rules (what a cell may contain, what it returns) are in one place.
"""
from __future__ import annotations

import ast
import textwrap
from typing import Any

from IPython.core.error import UsageError

TRAIN_NAME = "train_cell"
TRAIN_ARGS = ("model", "data", "config")


def run_cell(shell: Any, source: str) -> Any:
    """Run ``source`` in the user namespace as IPython would and return its last expression's value
    (None when the cell ends in a statement). The code is registered with IPython's compiler cache,
    so classes and functions defined in the cell keep a findable source (needed to record them)."""
    code = shell.transform_cell(source)
    filename = shell.compile.cache(code)
    tree = ast.parse(code, filename)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, filename, "exec"), shell.user_ns)
    if last is None:
        return None
    return eval(compile(ast.Expression(last.value), filename, "eval"), shell.user_ns)


def train_function_source(shell: Any, source: str) -> str:
    """The cell as the body of ``train_cell(model, data, config)``: the recorded training code of a
    provenance save. The cell's last expression becomes the return value (a returned module replaces
    the trained one). IPython syntax (``%magic``, ``!cmd``) is refused: recovery runs plain Python."""
    code = shell.transform_cell(source)
    if "get_ipython()" in code:
        raise UsageError("a provenance cell is plain Python training code: remove IPython magics and '!' commands")
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        raise UsageError(f"the cell is not valid Python: {e}") from None
    if not tree.body:
        raise UsageError("the cell is empty: write the code that trains `model` on `data` with `config`")
    lines = code.splitlines()
    last = tree.body[-1]
    if isinstance(last, ast.Expr):
        row = last.lineno - 1
        lines[row] = lines[row][: last.col_offset] + "return " + lines[row][last.col_offset:]
    body = textwrap.indent("\n".join(lines), "    ")
    return f"def {TRAIN_NAME}({', '.join(TRAIN_ARGS)}):\n{body}\n"
