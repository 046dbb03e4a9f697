"""``python -m mm_jupyter.course release DIR [NOTEBOOK ...]`` / ``check NOTEBOOK``.

``release`` writes the student version of each exercise into DIR (default: every notebook in
``notebooks/`` that holds tasks); ``check`` runs a student's notebook and prints each task's check.
Exit status: 0 done (check: every check passes), 1 some check does not pass, 2 the command failed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

from ..errors import CourseError
from .check import check
from .notebook import read, release, tasks


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mm_jupyter.course", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    release = commands.add_parser("release", help="write the student versions of exercise notebooks",
                                  description="Solutions become stubs raising NotImplementedError, hidden tests "
                                              "go, visible checks stay, outputs are cleared.")
    release.add_argument("dir", help="folder for the student notebooks (created if missing)")
    release.add_argument("notebooks", nargs="*", help="exercise notebooks (default: those in ./notebooks with tasks)")
    check = commands.add_parser("check", help="run a notebook and report each task's check",
                                description="Runs a copy of the notebook in its folder on a fresh kernel.")
    check.add_argument("notebook")
    check.add_argument("--timeout", type=int, default=900, help="seconds one cell may run (default 900)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            report = check(args.notebook, timeout=args.timeout)
            print(report)
            return 0 if report.passed else 1
        out = Path(args.dir)
        sources = [Path(p) for p in args.notebooks]
        if not sources:
            sources = [p for p in sorted(Path("notebooks").glob("*.ipynb")) if tasks(read(p), p.name)]
            if not sources:
                raise CourseError("no exercise notebooks with tasks in ./notebooks; name them")
        for src in sources:
            target = out / src.name
            if target.resolve() == src.resolve():
                raise CourseError(f"{target} is the exercise itself: release into another folder")
        out.mkdir(parents=True, exist_ok=True)
        for src in sources:
            nb = release(read(src), src.name)
            nbformat.write(nb, out / src.name)
            print(f"{out / src.name}: {len(tasks(nb, src.name))} task(s)")
        return 0
    except CourseError as e:
        print(f"CourseError: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
