"""Results files shared between the command line, the tests, the notebooks and the report.

A benchmark writes one JSON file per run. With ``reuse`` a harness first looks for a file of the same
run: same name, same arguments and the same *fingerprint* (a hash of the package's source, the papers'
numbers and the versions of Python and torch), and returns it instead of running again. So the tests
and the paper notebooks that run the same configuration in one ``make test`` share one run
(``MM_JUPYTER_BENCH_RESULTS`` names the folder), and a results file from other code is never taken for
this code's.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import BenchError

#: the folder the tests and notebooks share results in (unset: each runs on its own)
SHARED_ENV = "MM_JUPYTER_BENCH_RESULTS"
ROOT = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def fingerprint() -> str:
    """A short hash of what a result depends on: every source and data file of the package, and the
    versions of Python and torch."""
    import torch

    h = hashlib.sha256(f"{platform.python_version()} {torch.__version__}".encode())
    for path in sorted(ROOT.rglob("*")):
        if path.suffix in (".py", ".toml") and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def shared_folder() -> Path | None:
    """The folder named by ``MM_JUPYTER_BENCH_RESULTS`` (created), else None."""
    value = os.environ.get(SHARED_ENV)
    if not value:
        return None
    folder = Path(value)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists), so stored and asked arguments compare."""
    return json.loads(json.dumps(value, default=str))


def load(path: Path, args: dict[str, Any]) -> dict[str, Any] | None:
    """The results stored at ``path`` when they came from this code with these arguments, else None.
    A file that is not a results document is an error, not a miss: it is never overwritten silently."""
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BenchError(f"results file {path} cannot be read: {e}") from None
    if not isinstance(doc, dict):
        raise BenchError(f"results file {path} does not hold a results document")
    if doc.get("fingerprint") != fingerprint() or doc.get("args") != _plain(args):
        return None
    return doc


def save(path: Path, doc: dict[str, Any], args: dict[str, Any]) -> Path:
    """Write ``doc`` (with this code's fingerprint and ``args``) atomically: a reader in another
    process sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({**doc, "fingerprint": fingerprint(), "args": _plain(args)}, indent=2, default=str) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
        os.chmod(tmp, 0o644)  # mkstemp's file is private; a results file is for every reader
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_all(folder: str | os.PathLike[str]) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    """Every results document below ``folder`` (JSON objects naming their ``experiment``), sorted by path,
    and the JSON files skipped because they are not one (unreadable, not an object, no experiment): a
    report says which files it did not use instead of dropping them silently."""
    docs, skipped = [], []
    for path in sorted(Path(folder).rglob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            skipped.append(str(path))
            continue
        if isinstance(doc, dict) and isinstance(doc.get("experiment"), str):
            docs.append((path, doc))
        else:
            skipped.append(str(path))
    return docs, skipped
