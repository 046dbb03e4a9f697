"""``python -m mm_jupyter store verify|gc|rebuild PATH``: maintenance of a store from a shell.

Exit status: 0 done (verify: intact), 1 verify found problems (rebuild: some versions could not be
restored), 2 the command failed (one line on stderr).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import MMError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mm_jupyter", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="group", required=True)
    store = commands.add_parser("store", help="maintain a model store folder")
    actions = store.add_subparsers(dest="action", required=True)
    for name, text in (
        ("verify", "check the catalog against the objects; every object is hashed"),
        ("gc", "remove objects, pending rows and temp files no version references (safe while others save)"),
        ("rebuild", "recreate the catalog from the objects alone (versions, lineage, names, candidate sets)"),
    ):
        sub = actions.add_parser(name, help=text, description=text)
        sub.add_argument("path", help="store folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .store import Store

    if not Path(args.path).is_dir():
        print(f"StoreError: no store folder at {args.path!r}", file=sys.stderr)
        return 2
    try:
        if args.action == "rebuild":
            report = Store.rebuild_catalog(args.path)
            print(report)
            return 1 if report.problems else 0
        store = Store(args.path)
        try:
            if args.action == "gc":
                print(store.gc())
                return 0
            problems = store.verify()
        finally:
            store.close()
    except MMError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s)" if problems else "intact")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
