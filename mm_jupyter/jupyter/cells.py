"""Running a magic's cell body: in the user namespace with its last value, or as training code.

Kept apart from the magics so the rules (what a cell may contain, what it returns) are in one place.
"""
from __future__ import annotations

import ast
import linecache
import textwrap
from types import CodeType, TracebackType
from typing import Any, Callable, TypeVar

from IPython.core.error import UsageError

from ..errors import CellError as CellError, MMError

T = TypeVar("T")

TRAIN_NAME = "train_cell"
TRAIN_ARGS = ("model", "data", "config")


def _first_user_frame(tb: TracebackType | None, is_user: Callable[[CodeType], bool]) -> TracebackType | None:
    while tb is not None and not is_user(tb.tb_frame.f_code):
        tb = tb.tb_next  # drop the frames above the user's code: this module, the magic, IPython
    return tb


def user_code(shell: Any, is_user: Callable[[CodeType], bool], run: Callable[[], T], source: str | None = None) -> T:
    """``run()``, turning an exception raised inside the user's code (frames ``is_user`` accepts)
    into a CellError that renders as their own traceback; errors of ours pass through unchanged.
    ``source``: the text of code compiled under a file name IPython cannot look up (recorded
    training code), so its lines show in the traceback."""
    try:
        return run()
    except MMError:
        raise
    except Exception as e:
        tb = _first_user_frame(e.__traceback__, is_user)
        if tb is None:
            raise
        filename = tb.tb_frame.f_code.co_filename
        if source is not None and filename not in linecache.cache:
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        raise CellError(e, shell.InteractiveTB.structured_traceback(type(e), e, tb)) from e


def run_cell(shell: Any, source: str) -> Any:
    """Run ``source`` in the user namespace as IPython would and return its last expression's value
    (None when the cell ends in a statement). The code is registered with IPython's compiler cache,
    so classes and functions defined in the cell keep a findable source (needed to record them).
    A syntax error or an exception in the cell raises CellError (the user's traceback)."""
    code = shell.transform_cell(source)
    filename = shell.compile.cache(code)
    try:
        tree = ast.parse(code, filename)
    except SyntaxError as e:
        raise CellError(e, shell.SyntaxTB.structured_traceback(type(e), e, None)) from None
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None

    def run() -> Any:
        exec(compile(tree, filename, "exec"), shell.user_ns)
        if last is None:
            return None
        return eval(compile(ast.Expression(last.value), filename, "eval"), shell.user_ns)

    return user_code(shell, lambda c: c.co_filename == filename, run)


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
