"""``python -m mm_jupyter.bench alsatian --figure ...``: the Alsatian evaluation's artefacts as tables."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

from .alsatian import FIGURES, SCALES, Artefact, default_scale, run_artefact

Table = Callable[[Sequence[dict[str, Any]], Sequence[tuple[str, str, str]]], str]

TIMING = [("approach", "approach", "str"), ("seconds", "median s", "s"), ("min_s", "min s", "s"),
          ("max_s", "max s", "s"), ("t_inference", "inference s", "s"), ("t_proxy", "proxy s", "s"),
          ("vs_base", "vs base", "x"), ("vs_shift", "vs shift", "x"), ("block_inferences", "block inf.", "str"),
          ("cache_peak_bytes", "cache peak B", "bytes"), ("chunks", "chunks", "str"), ("best", "best", "str")]
KEYS = {"fig10": ["arch", "distribution", "items"], "fig13": ["set", "models"], "fig15": ["modality", "models"],
        "fig16": [], "fig17": ["distribution", "items"], "fig5": ["arch"]}
TABLE1 = [("architecture", "architecture", "str"), ("params", "parameters", "bytes"),
          ("reference_params", "reference", "bytes"), ("blocks", "blocks", "str"),
          ("model_bytes", "model B", "bytes"), ("block_ms_mean", "ms/item/block (mean)", "ms"),
          ("block_ms_max", "(max)", "ms"), ("model_ms", "ms/item (model)", "ms"),
          ("inter_bytes_mean", "intermediate B/item (mean)", "bytes"), ("inter_bytes_max", "(max)", "bytes")]


def columns(figure: str) -> list[tuple[str, str, str]]:
    """The printed table's columns of an artefact: (row key, header, kind)."""
    if figure == "table1":
        return TABLE1
    keys = [(k, k, "str") for k in KEYS[figure]]
    if figure == "fig5":
        from .alsatian import PARTS

        return keys + TIMING[:4] + [(f"share_{p}", f"{p} %", "%") for p in PARTS]
    if figure == "fig16":
        return keys + [TIMING[0], ("budget", "budget B", "bytes")] + TIMING[1:]
    return keys + TIMING


def _cells(row: dict[str, Any], cols: Sequence[tuple[str, str, str]]) -> dict[str, Any]:
    """Rows with ``ms`` columns (and percentages) formatted here; the table formats the rest."""
    out = dict(row)
    for key, _, kind in cols:
        if kind == "ms" and row.get(key) is not None:
            out[key] = f"{row[key]:.3f}"
    return out


def report(art: Artefact, table: Table) -> str:
    """The artefact as text: title, table, checks and the paper's values."""
    cols = columns(art.figure)
    printable = [(k, h, "str" if kind == "ms" else kind) for k, h, kind in cols]
    lines = [art.title, f"config: {art.config}", table([_cells(r, cols) for r in art.rows], printable), "checks:"]
    lines += [f"  [{'ok' if ok else 'FAILED'}] {name}" for name, ok in art.checks.items()]
    from .reproduction import Results, claims_for, evaluate

    lines.append("the paper beside ours (python -m mm_jupyter.bench report: every claim):")
    for r in evaluate(Results.of([art.to_json()]), claims_for(art.figure)):
        ours = "-" if r.ours is None else r.ours.text
        lines.append(f"  [{r.status}] {r.claim.artefact}: {r.claim.claim}: paper {r.claim.paper_text()}; ours {ours}")
    lines.append(f"[{art.figure} took {art.seconds:.1f} s; results: {', '.join(art.files)}]")
    return "\n".join(lines)


def add_parser(sub: Any, table: Table, say: Callable[[str], None]) -> None:
    from .alsatian import DEFAULT_OUT

    p = sub.add_parser("alsatian", help="the Alsatian paper's evaluation: Table 1, Figs. 5, 10-17",
                       description="Run one artefact of the Alsatian evaluation (or all of them) and print its "
                                   "table. Each artefact's cpu default takes 0.5-6 minutes on a 2-core machine; "
                                   "`--figure all` runs them one after another (about 15 minutes at the cpu scale; "
                                   "--scale quick for a smoke run), so the artefact is named, not defaulted.")
    p.add_argument("--figure", required=True, choices=list(FIGURES) + ["all"],
                   help="table1, fig5, fig10 (Figs. 10-12), fig13 (13-14), fig15, fig16, fig17 or all")
    p.add_argument("--scale", choices=[*SCALES, "full"], default=None,
                   help="quick (seconds), cpu (default; minutes) or paper (the paper's sizes, for a GPU; "
                        "the default when MM_JUPYTER_FULL=1; 'full' is its older name)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats, median shown (default 3; 1 quick)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1, steadier on a busy machine; 0: torch's default)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.set_defaults(func=lambda args: cmd(args, table, say))


def cmd(args: argparse.Namespace, table: Table, say: Callable[[str], None]) -> int:
    figures = FIGURES if args.figure == "all" else (args.figure,)
    scale = args.scale or default_scale()
    failed = []
    for figure in figures:
        extra = {} if args.repeats is None else {"repeats": args.repeats}
        art = run_artefact(figure, scale, out=args.out, threads=args.threads or None, progress=say,
                           device=args.device, **extra)
        print(report(art, table))
        print()
        if not art.ok:
            failed.append(figure)
    if failed:
        print(f"error: a correctness check failed in {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
