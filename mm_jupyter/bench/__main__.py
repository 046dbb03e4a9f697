"""``python -m mm_jupyter.bench <experiment> [options]``: run a paper experiment and print its table.

Each experiment registers one subcommand: an ``add_<name>(subparsers)`` function that builds its
parser and sets ``func`` to a ``cmd_<name>(args) -> int`` that runs the harness and prints. Add a new
experiment by writing both and listing ``add_<name>`` in ``COMMANDS``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence


def _say(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return f"{int(value):,}"
    if kind == "s":
        return f"{value:.4f}"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "%":
        return f"{100.0 * value:.3f}%"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table: ``columns`` are (key, header, kind) with kind bytes/s/x/%/str."""
    cells = [[h for _, h, _ in columns]] + [[_fmt(r.get(k), kind) for k, _, kind in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_targets(targets: Sequence[Any]) -> str:
    lines = []
    for t in targets:
        measured = "not measured" if t.measured is None else f"{t.measured:.4g} {t.unit}"
        lines.append(f"  [{t.status}] {t.name}: {measured} (target {t.comparison} {t.threshold:g})")
        if t.detail:
            lines.append(f"         {t.detail}")
    return "\n".join(lines)


# -- modelsets -----------------------------------------------------------------------------------------
MODELSET_COLUMNS = [
    ("step", "step", "str"),
    ("approach", "approach", "str"),
    ("bytes", "storage B", "bytes"),
    ("tts_s", "TTS s", "s"),
    ("ttr_s", "TTR s", "s"),
    ("ttr_min_s", "TTR min", "s"),
    ("ttr_max_s", "TTR max", "s"),
    ("tts_vs_limit", "TTS/limit", "x"),
    ("mmlib_tts_speedup", "mmlib TTS/TTS", "x"),
    ("mmlib_ttr_speedup", "mmlib TTR/TTR", "x"),
    ("storage_vs_baseline", "storage/baseline", "%"),
]


def add_modelsets(sub: Any) -> None:
    from .modelsets import APPROACHES, ARCHS, DEFAULT_OUT

    p = sub.add_parser("modelsets", help="Efficient Multi-Model Management: storage, TTS, TTR of the four approaches",
                       description="U1 (N models) then U3 retraining steps, saved by every approach.")
    p.add_argument("--arch", choices=sorted(ARCHS), default="ffnn48", help="model architecture (default ffnn48)")
    p.add_argument("--models", "-n", type=int, default=None,
                   help="models per set (default: the scale's; 1000 at cpu, 500 at quick, the paper's 5000 at paper)")
    p.add_argument("--scale", choices=("quick", "cpu", "paper"), default=None,
                   help="quick: 500 models, 1 recovery; cpu (default): 1000 models, 3 recoveries; paper: the "
                        "paper's 5000 models, median of 5 recoveries (the default when MM_JUPYTER_FULL=1)")
    p.add_argument("--steps", type=int, default=3, help="U3 update steps (default 3)")
    p.add_argument("--update-rate", type=float, default=0.10, help="fraction retrained per U3 step (default 0.10)")
    p.add_argument("--approaches", default=",".join(APPROACHES),
                   help=f"comma-separated subset of {','.join(APPROACHES)} (default: all)")
    p.add_argument("--repeat", type=int, default=None,
                   help="TTR/limit repetitions, median reported (default: the scale's)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs per retrained model (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads during the run (default: torch's; 1 is steadier on a busy machine)")
    p.add_argument("--out", default=None,
                   help=f"results folder (default {DEFAULT_OUT}/<arch>-<models>-u<update rate %%>)")
    p.add_argument("--keep", action="store_true", help="keep the stores and the limit files")
    p.add_argument("--check", action="store_true", help="verify every recovered set bit for bit")
    p.add_argument("--quick", action="store_true", help="the same as --scale quick")
    p.add_argument("--store", choices=("local", "postgresql+s3"), default="local",
                   help="postgresql+s3: also save baseline and update into a team store (a PostgreSQL server and "
                        "moto's S3 emulator started for the run) beside a local one: TTS, TTR, bytes for one model")
    p.set_defaults(func=cmd_modelsets)


def cmd_modelsets(args: argparse.Namespace) -> int:
    import os

    from .modelsets import APPROACHES, SCALES, default_out, run_modelsets

    approaches = [a.strip() for a in args.approaches.split(",") if a.strip()]
    bad = [a for a in approaches if a not in APPROACHES]
    if bad:
        print(f"error: unknown approach(es) {', '.join(bad)}; choose from {', '.join(APPROACHES)}", file=sys.stderr)
        return 2
    scale = "quick" if args.quick else (args.scale or ("paper" if os.environ.get("MM_JUPYTER_FULL") == "1"
                                                        else "cpu"))
    models = args.models if args.models is not None else SCALES[scale][0]
    repeat = args.repeat if args.repeat is not None else SCALES[scale][1]
    args.out = args.out or str(default_out(args.arch, models, args.update_rate))
    print(f"modelsets: {models} x {args.arch}, {args.steps} U3 steps at update rate {args.update_rate:g}, "
          f"approaches {', '.join(approaches)}, repeat {repeat}")
    result = run_modelsets(arch=args.arch, models=models, steps=args.steps, update_rate=args.update_rate,
                           approaches=approaches, out=args.out, repeat=repeat, keep=args.keep, check=args.check,
                           seed=args.seed, epochs=args.epochs, threads=args.threads, progress=_say)
    env = result.environment
    print(f"environment: python {env['python']}, torch {env['torch']} ({env['torch_threads']} threads), "
          f"{env['platform']}, {env['cpus']} CPUs")
    print("TTR is measured warm-cache (the OS page cache cannot be dropped); provenance TTR includes retraining.")
    print("step 0 = U1 (initial set); steps 1.. = U3. storage = bytes the version added to its store.")
    print()
    cols = MODELSET_COLUMNS + ([("verified", "verified", "str")] if args.check else [])
    print(format_table(result.rows, cols))
    print()
    print("targets (this run):")
    print(format_targets(result.targets))
    print()
    t = result.timings
    print(f"workload: initialise {t['initialise_s']:.1f} s, retrain {t['retrain_s']:.1f} s; "
          + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in t.items()
                      if k not in ("initialise_s", "retrain_s", "total_s")))
    print(f"total {t['total_s']:.1f} s; results: {', '.join(result.files)}")
    if args.store == "postgresql+s3":
        print_team(args, models, repeat)
    if args.check and any(r.get("verified") is False for r in result.rows):
        print("error: a recovered set did not match the saved models", file=sys.stderr)
        return 1
    return 0


TEAM_COLUMNS = [
    ("step", "step", "str"),
    ("approach", "approach", "str"),
    ("store", "store", "str"),
    ("bytes", "set B", "bytes"),
    ("tts_s", "TTS s", "s"),
    ("ttr_s", "TTR s", "s"),
    ("tts_vs_local", "TTS/local", "x"),
    ("ttr_vs_local", "TTR/local", "x"),
    ("one_model_fetched", "1 model fetched B", "bytes"),
    ("one_model_verified", "1 model verified B", "bytes"),
]


def print_team(args: argparse.Namespace, models: int, repeat: int) -> None:
    """The same workload (built again from the same seed) in a local store and a PostgreSQL + S3 store."""
    from .modelsets import build_workload
    from .team import run_team

    print()
    print("team store: PostgreSQL (local server) + S3 (moto's emulator on localhost, not a real object store)")
    workload = build_workload(args.arch, models, args.steps, args.update_rate, args.seed, args.epochs, _say)
    rows = run_team(workload, repeat=repeat, progress=_say)
    rows.sort(key=lambda r: (r["step"], r["approach"], r["store"] != "local"))
    print(format_table(rows, TEAM_COLUMNS))
    print("1 model fetched = payload bytes received from S3 by ranged GETs to recover one model in a fresh handle "
          "(0 for a local folder: mapped); verified = bytes hashed (its chunks)")


# -- catalog -------------------------------------------------------------------------------------------
def add_catalog(sub: Any) -> None:
    from .catalog import DEFAULT_OUT

    p = sub.add_parser("catalog", help="list and recover sets in a store holding 100,000 models",
                       description="Fill a store with tiny models, then time store.sets() and one recovery.")
    p.add_argument("--models", "-n", type=int, default=100_000, help="models in the catalog (default 100000)")
    p.add_argument("--set-size", type=int, default=1000, help="models per baseline set (default 1000)")
    p.add_argument("--repeat", type=int, default=3, help="timing repetitions, median reported (default 3)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--keep", action="store_true", help="keep the store")
    p.set_defaults(func=cmd_catalog)


def cmd_catalog(args: argparse.Namespace) -> int:
    from .catalog import plan_sets, run_catalog

    mmlib, sizes = plan_sets(args.models, args.set_size)
    print(f"catalog: {args.models:,} models = {len(sizes)} baseline sets (<= {args.set_size} models each) "
          f"+ one mmlib-base set of {mmlib:,}")
    r = run_catalog(models=args.models, out=args.out, set_size=args.set_size, repeat=args.repeat, keep=args.keep,
                    progress=_say)
    b = r.build_by_approach_s
    print(f"built in {r.build_s:.1f} s (baseline sets {b['baseline']:.1f} s, mmlib-base {b['mmlib-base']:.1f} s)")
    print(f"store.sets(): {r.sets_s:.4f} s for {r.sets} sets / {r.models:,} models")
    for approach, rec in r.recover.items():
        note = " (reference approach, no target)" if approach == "mmlib-base" else ""
        print(f"recover_set({rec['ref']}).load() [{approach}, {rec['models']:,} models]: {rec['recover_s']:.4f} s"
              f" + ms[0] {rec['first_model_s']:.4f} s = {rec['total_s']:.4f} s{note}")
    print("targets (this run, warm cache):")
    print(format_targets(r.targets))
    return 0


# -- search --------------------------------------------------------------------------------------------
SEARCH_COLUMNS = [
    ("approach", "approach", "str"),
    ("seconds", "total s", "s"),
    ("min_s", "min s", "s"),
    ("max_s", "max s", "s"),
    ("t_prepare data", "data s", "s"),
    ("t_prepare model", "model s", "s"),
    ("t_inference", "inference s", "s"),
    ("modelled_inference_s", "modelled inf. s", "s"),
    ("t_proxy", "proxy s", "s"),
    ("t_planning", "planning s", "s"),
    ("vs_base", "vs base", "x"),
    ("vs_shift", "vs shift", "x"),
    ("block_inferences", "block inf.", "str"),
    ("unique_edges", "unique edges", "str"),
    ("chunks", "chunks", "str"),
    ("cache_peak_bytes", "cache peak B", "bytes"),
    ("best", "best", "str"),
]


def add_search(sub: Any) -> None:
    from .search import APPROACHES, DEFAULT_OUT

    p = sub.add_parser("search", help="Alsatian model search: base vs shift vs alsatian",
                       description="Search a synthetic candidate set with every approach and compare.")
    p.add_argument("--arch", default="resnet18", help="resnet18, resnet152, vit, bert or mlp (default resnet18)")
    p.add_argument("--models", type=int, default=None,
                   help="candidates (default 16; 8 with --quick; 35 with --executor ray)")
    p.add_argument("--distribution", default="top-layers", help="top-layers, top-25 or top-50")
    p.add_argument("--items", type=int, default=None,
                   help="data items (default 400; 400 with --quick; 1500 with --executor ray)")
    p.add_argument("--approaches", default=",".join(APPROACHES))
    p.add_argument("--budget", type=int, default=None, help="cache budget in bytes for alsatian")
    p.add_argument("--budget-fraction", type=float, default=None,
                   help="also run alsatian with this fraction of its measured C_min as budget (e.g. 0.25)")
    p.add_argument("--scale", choices=["small", "cpu", "paper", "full"], default="cpu",
                   help="small: reduced widths at 32 px (tests); cpu: the real architecture at reduced "
                        "resolution (default; --resolution); paper: the paper's Fig. 10 setting, 35 candidates, "
                        "2000 items, the real architecture at 224 px (for a GPU; 'full' is its older name)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size for --scale cpu (default 32; 64 with --executor ray)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared, loaded CPU more threads spin against "
                        "each other and make timings erratic; 0 keeps torch's setting)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=None,
                   help="interleaved rounds of every approach; medians reported, min-max shown "
                        "(default 3)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--quick", action="store_true", help="8 candidates, 400 items, --scale small")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="ray: alsatian on Ray with --workers workers vs 1 worker vs one process (1 and N threads)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers for --executor ray (default 2)")
    p.set_defaults(func=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    from .search import PAPER, QUICK, run_search_bench

    if args.quick:
        args.scale = "small"
    if args.scale == "paper":
        args.scale = "full"
        args.models = args.models or PAPER["models"]
        args.items = args.items or PAPER["items"]
    if args.repeat is None:
        args.repeat = 3
    if args.executor == "ray" and not args.quick:  # the Ray benchmark's own defaults: a CPU-bound search
        return _search_ray(args, args.models, args.items)
    models = args.models if args.models is not None else (QUICK["models"] if args.quick else 16)
    items = args.items if args.items is not None else (QUICK["items"] if args.quick else 400)
    if args.resolution is None:
        args.resolution = 32
    if args.executor == "ray":
        return _search_ray(args, models, items)
    approaches = [a.strip() for a in args.approaches.split(",") if a.strip()]
    print(f"search: {models} x {args.arch} ({args.distribution}), {items} items, approaches "
          f"{', '.join(approaches)}, budget {args.budget or 'unlimited'}, scale {args.scale}, "
          f"{args.repeat} interleaved rounds (medians; min-max of the totals shown)")
    res = run_search_bench(arch=args.arch, models=models, distribution=args.distribution, items=items,
                           approaches=approaches, budget=args.budget, reduced=args.scale == "small",
                           image_size=args.resolution if args.scale == "cpu" else None, device=args.device,
                           batch_size=args.batch_size, seed=args.seed, budget_fraction=args.budget_fraction,
                           repeat=args.repeat, threads=args.threads or None, out=args.out, progress=_say)
    print(format_table(res.rows, SEARCH_COLUMNS))
    al = next((r for r in res.rows if r["approach"] == "alsatian"), None)
    if al is not None:
        print(f"ranking matches shift: {al.get('ranking_matches_shift')}; "
              f"best matches base: {al.get('best_matches_base')}")
        if "sharing_bound_vs_shift" in al:
            runs = al["inference_vs_shift_runs"]
            verdict = ("holds" if al["bound_holds"] else "EXCEEDED: noise or work outside the blocks") + (
                "" if al["bound_holds_every_round"] else "; exceeded in a round")
            print(f"inference vs shift: measured {al['inference_vs_shift']:.2f}x (rounds {min(runs):.2f}-"
                  f"{max(runs):.2f}x); bound from the work (counts only) {al['sharing_bound_vs_shift']:.2f}x "
                  f"({verdict})")
            print(f"  estimate from calibrated block costs {al['sharing_estimate_vs_shift']:.2f}x, its error "
                  f"{100 * al['sharing_estimate_error']:+.0f}% (per-item costs by depth, min/median/max us: "
                  + ", ".join(f"{1e6 * lo:.1f}/{1e6 * m:.1f}/{1e6 * hi:.1f}"
                              for (lo, hi), m in zip(res.cost_range, res.block_costs)) + ")")
    print(f"planning a 500-candidate task tree: {res.planning_500_s:.3f} s")
    print()
    print("targets (this run):")
    print(format_targets(res.targets))
    print(f"results: {', '.join(res.files)}")
    return 0


# -- materialize ---------------------------------------------------------------------------------------
MATERIALIZE_COLUMNS = [
    ("record", "record", "str"),
    ("variant", "variant", "str"),
    ("s", "median s", "s"),
    ("min_s", "min s", "s"),
    ("max_s", "max s", "s"),
    ("per_model_us", "us/model", "str"),
    ("vs_construct", "vs construct+load", "x"),
]


def add_materialize(sub: Any) -> None:
    p = sub.add_parser("materialize", help="list(ms) vs constructing models and loading their state",
                       description="Build every module of a stored set, against the plain construct-and-load loop.")
    p.add_argument("--models", "-n", type=int, default=5000, help="models per set (default 5000)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved repetitions, median reported (default 3)")
    p.set_defaults(func=cmd_materialize)


def cmd_materialize(args: argparse.Namespace) -> int:
    from .materialize import run_materialize

    r = run_materialize(models=args.models, repeat=args.repeat, progress=_say)
    print(f"materialize: {r.models} FFNN-48 models per set, median of {r.repeat} interleaved runs")
    rows = [dict(row, per_model_us=f"{row['per_model_us']:.1f}") for row in r.rows]
    print(format_table(rows, MATERIALIZE_COLUMNS))
    print("targets (this run):")
    print(format_targets(r.targets))
    return 0


# -- serving -------------------------------------------------------------------------------------------
SERVING_COLUMNS = [
    ("mode", "mode", "str"),
    ("spread", "spread", "str"),
    ("cache", "cache", "str"),
    ("capacity", "capacity/s", "str"),
    ("at_p99", "at p99 bound/s", "str"),
    ("hits", "cache hits", "str"),
]
CURVE_COLUMNS = [
    ("config", "configuration", "str"),
    ("offered", "offered/s", "str"),
    ("answered", "answered/s", "str"),
    ("p50", "p50 ms", "str"),
    ("p95", "p95 ms", "str"),
    ("p99", "p99 ms", "str"),
    ("rejected", "rejected", "str"),
    ("hits", "hits", "str"),
]


def add_serving(sub: Any) -> None:
    from .serving import DEFAULT_OUT, MODES, SPREADS

    p = sub.add_parser("serving", help="serving 5,000 FFNN-48 models: one at a time, per-model, multi-model batching",
                       description="Open-loop Poisson load at rising rates; throughput at a p99 bound, latency curves.")
    p.add_argument("--models", "-n", type=int, default=None,
                   help="models in the set (default 5000; 500 with --quick)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    p.add_argument("--spreads", default=",".join(SPREADS), help="uniform, zipf or both (default both)")
    p.add_argument("--repeat", type=float, default=0.3,
                   help="fraction of requests repeating an earlier one (default 0.3)")
    p.add_argument("--p99-ms", type=float, default=50.0, help="the p99 latency bound (default 50 ms)")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--step-s", type=float, default=None,
                   help="seconds of load per rate (default 1.5; 0.4 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="500 models, two rates per configuration, short steps")
    p.set_defaults(func=cmd_serving)


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def cmd_serving(args: argparse.Namespace) -> int:
    from .serving import FRACTIONS, QUICK, run_serving_bench

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    spreads = [s.strip() for s in args.spreads.split(",") if s.strip()]
    models = args.models if args.models is not None else (QUICK["models"] if args.quick else 5000)
    step_s = args.step_s if args.step_s is not None else (QUICK["step_s"] if args.quick else 1.5)
    print(f"serving: {models} x FFNN-48 (baseline set), modes {', '.join(modes)}; spreads {', '.join(spreads)}; "
          f"repeat rate {args.repeat:g} (cache off / on); max_batch {args.max_batch}, "
          f"max_wait {args.max_wait_ms:g} ms; p99 bound {args.p99_ms:g} ms; torch threads {args.threads or 'default'}")
    try:
        res = run_serving_bench(models=models, modes=modes, spreads=spreads, repeat=args.repeat,
                                max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, p99_ms=args.p99_ms,
                                step_s=step_s, probe_s=QUICK["probe_s"] if args.quick else 1.0,
                                fractions=QUICK["fractions"] if args.quick else FRACTIONS,
                                threads=args.threads or None, seed=args.seed, out=args.out, progress=_say)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("latency curves (open-loop Poisson arrivals; latency = scheduled arrival to answer):")
    curve = [{"config": f"{s['mode']}, {s['spread']}, cache {'on' if s['cache'] else 'off'}",
              "offered": f"{s['offered_rps']:,.0f}", "answered": f"{s['throughput_rps']:,.0f}",
              "p50": _ms(s["p50_ms"]), "p95": _ms(s["p95_ms"]), "p99": _ms(s["p99_ms"]),
              "rejected": str(s["rejected"]), "hits": f"{100 * s['hit_rate']:.0f}%"} for s in res.steps]
    print(format_table(curve, CURVE_COLUMNS))
    print()
    print(f"throughput at p99 <= {args.p99_ms:g} ms (capacity: closed loop, cache off):")
    rows = [{"mode": r["mode"], "spread": r["spread"], "cache": "on" if r["cache"] else "off",
             "capacity": f"{r['capacity_rps']:,.0f}", "at_p99": f"{r['at_p99_rps']:,.0f}",
             "hits": f"{100 * r['hit_rate']:.0f}%"} for r in res.rows]
    print(format_table(rows, SERVING_COLUMNS))
    print()
    for r in res.ratios:
        vs = "-" if r["vs_one_at_a_time"] is None else f"{r['vs_one_at_a_time']:.1f}x"
        warm = "-" if r["vs_warm"] is None else f"{r['vs_warm']:.1f}x"
        print(f"multi-model / one-at-a-time ({r['spread']}, cache {'on' if r['cache'] else 'off'}): {vs} "
              f"(vs one-at-a-time warm: {warm})")
    print()
    print("targets (this run):")
    print(format_targets(res.targets))
    print(f"results: {', '.join(res.files)}")
    return 0


RAY_COLUMNS = [
    ("run", "run", "str"),
    ("seconds", "median s", "s"),
    ("min_s", "min s", "s"),
    ("max_s", "max s", "s"),
    ("t_inference", "inference s", "s"),
    ("t_proxy", "proxy s", "s"),
    ("vs_ray_1", "vs ray 1 worker", "x"),
    ("cpu_share", "CPU share", "%"),
    ("block_inferences", "block inf.", "str"),
    ("bytes_loaded", "bytes loaded", "bytes"),
    ("transfer_bytes", "handed on B", "bytes"),
    ("same_ranking", "same ranking", "str"),
    ("same_scores", "same scores", "str"),
]


def _search_ray(args: argparse.Namespace, models: int | None, items: int | None) -> int:
    from .distributed import run_ray_bench

    given = {k: v for k, v in (("models", models), ("items", items), ("image_size", args.resolution)) if v is not None}
    if args.scale != "cpu":
        given["image_size"] = None
    res = run_ray_bench(arch=args.arch, distribution=args.distribution, workers=args.workers,
                        reduced=args.scale == "small", batch_size=args.batch_size, seed=args.seed, repeat=args.repeat,
                        budget=args.budget, out=args.out, progress=_say, **given)
    c = res.config
    size = f"{c['image_size']} px" if c["image_size"] else "its input size"
    print(f"search on Ray: {c['models']} x {args.arch} ({args.distribution}), {c['items']} items at {size}, "
          f"alsatian; {args.workers} Ray workers vs 1 worker vs one process; {args.repeat} interleaved rounds "
          "(order rotating), medians with min-max")
    print("timed: the mm.search call (shipping candidates to the workers included); worker start-up and a "
          f"{c['warmup_items']}-item warm-up search per run excluded alike; 1 torch thread per worker")
    print(format_table(res.rows, RAY_COLUMNS))
    print("same scores: bit-identical to one process with 1 thread (workers run 1 thread each)")
    for r in res.rows:
        if r["rung_balance"]:
            print(f"{r['run']}: modelled balance per rung (modelled time / even share) {r['rung_balance']}, "
                  f"{r['item_split_rungs']} rung(s) split by items, trunk blocks {r['trunk_blocks']}, busy s per "
                  f"worker {[round(s, 1) for s in r['worker_seconds']]} "
                  f"(CPU s {[round(s, 1) for s in r['worker_cpu_seconds']]})")
    print(f"per round, ray 1 worker / ray {args.workers} workers: {[round(x, 3) for x in res.ratios]}")
    print(f"load average (1 min) per measurement: {[round(r['load'], 2) for r in res.rounds]} on {c['cpus']} CPUs")
    if not res.quiet:
        print("NOTE: the machine was busy (load average above its CPUs + 1, or Ray workers got < 90% of a CPU): "
              "these timings measure contention as much as the search; re-run on a quiet machine")
    print()
    print("targets (this run):")
    print(format_targets(res.targets))
    print(f"results: {', '.join(res.files)}")
    print(f"benchmark wall time: {res.seconds:.0f} s")
    return 0


PARTITION_COLUMNS = [
    ("workers", "workers", "str"),
    ("trunk_blocks", "trunk", "str"),
    ("subtrees", "subtrees", "str"),
    ("ours_balance", "balance", "x"),
    ("ours_bytes", "moved B/item", "bytes"),
    ("ours_speedup", "speed-up", "x"),
    ("queue_dup", "q:recompute dup", "%"),
    ("queue_recompute_speedup", "q:recompute speed-up", "x"),
    ("queue_bytes", "q:transfer B/item", "bytes"),
    ("queue_transfer_speedup", "q:transfer speed-up", "x"),
    ("queue_cheaper_dup", "q:cheaper dup", "%"),
    ("queue_cheaper_bytes", "q:cheaper B/item", "bytes"),
    ("queue_cheaper_speedup", "q:cheaper speed-up", "x"),
    ("queue_cheaper_balance", "q:cheaper balance", "x"),
    ("overhead_ratio", "q:cheaper/ours overhead", "x"),
]


def add_partition(sub: Any) -> None:
    p = sub.add_parser("partition", help="distributed search, simulated: subtree partitioning vs a shared queue",
                       description="A mixed candidate set's task tree split over many workers (no model runs).")
    p.add_argument("--models", type=int, default=500, help="candidates (default 500)")
    p.add_argument("--workers", default="8,64,512", help="worker counts (default 8,64,512)")
    p.add_argument("--archs", default="resnet18,resnet152,vit,bert", help="architectures mixed in the set")
    p.add_argument("--flops", type=float, default=1e13, help="FLOP/s of one worker (default 1e13)")
    p.add_argument("--bandwidth", type=float, default=1e10, help="bytes/s between workers (default 1e10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results/distributed")
    p.set_defaults(func=cmd_partition)


def cmd_partition(args: argparse.Namespace) -> int:
    from .distributed import run_partition_sim

    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    res = run_partition_sim(models=args.models, workers=workers, archs=archs, flops=args.flops,
                            bandwidth=args.bandwidth, seed=args.seed, out=args.out, progress=_say)
    t = res.tree
    print(f"partition: {t['candidates']} candidates ({', '.join(archs)}; top-layers/top-25/top-50 mixed), "
          f"{t['edges']} task-tree edges, {t['unique_gflop_per_item']:.1f} GFLOP per item of unique block work")
    print(f"cost model: a block step costs its counted FLOPs; moving a byte costs {args.flops:g}/{args.bandwidth:g} "
          "FLOPs (FLOP/s over bytes/s); the trunk runs before the subtrees; queue = shared queue of block steps in "
          "DFS order (recompute / transfer / cheaper of the two when the parent output is elsewhere)")
    print("dup = recomputed block work as a share of the unique work; subtree partitioning recomputes nothing; "
          "balance = busiest worker's work / mean work; speed-up = unique work / modelled makespan")
    print(format_table(res.rows, PARTITION_COLUMNS))
    print()
    print("targets (this run):")
    print(format_targets(res.targets))
    print(f"results: {', '.join(res.files)}")
    return 0



# -- alsatian (the paper's evaluation artefacts; parser and printing in alsatian_cli.py) ------------------
def add_alsatian(sub: Any) -> None:
    from .alsatian_cli import add_parser

    add_parser(sub, format_table, _say)


# -- gpu (scripts/gpu_check.sh) ---------------------------------------------------------------------------
def add_gpu(sub: Any) -> None:
    from .gpu import DEFAULT_OUT

    p = sub.add_parser("gpu", help="the GPU check: CUDA tests, transfer vs recompute, Fig. 10 on the device",
                       description="What scripts/gpu_check.sh runs once the dependencies are installed.")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (with --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="every step at a tiny size (4 candidates, 128 items)")
    p.add_argument("--no-tests", action="store_true", help="skip tests/test_gpu.py")
    p.add_argument("--tests-k", default=None, help="only the tests of tests/test_gpu.py matching this -k expression")
    p.add_argument("--requirements", action="store_true",
                   help="print what the check needs installed (a requirements file) and exit")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default {DEFAULT_OUT})")
    p.set_defaults(func=cmd_gpu)


def cmd_gpu(args: argparse.Namespace) -> int:
    from .gpu import requirements, run_gpu_check

    if args.requirements:
        print("\n".join(requirements()))
        return 0
    doc = run_gpu_check(args.device, dry_run=args.dry_run, out=args.out, tests=not args.no_tests,
                        select=args.tests_k, progress=_say)
    env = doc["environment"]
    print(f"gpu check on {env['device_name']} ({args.device}; torch {env['torch']}, CUDA {env['cuda']})"
          + (" - DRY RUN at a tiny size" if args.dry_run else ""))
    if "tests" in doc:
        print(f"tests/test_gpu.py: rc {doc['tests']['rc']}, {doc['tests']['counts']}")
    if "transfer" in doc:
        t = doc["transfer"]
        print(f"Sec. 4.1: one block {t['block_ms']:.3f} ms vs moving its input {t['transfer_ms']:.3f} ms ({t['what']})")
    c = doc["fig10"]["config"]
    print(f"Fig. 10: {c['models']} x {c['arch']} ({c['distribution']}), {c['items']} items:")
    print(format_table(doc["fig10"]["rows"], [("approach", "approach", "str"), ("seconds", "median s", "s"),
                                              ("vs_base", "vs base", "x"), ("vs_shift", "vs shift", "x"),
                                              ("t_inference", "inference s", "s"),
                                              ("block_inferences", "block inf.", "str"),
                                              ("ranking_matches_shift", "ranking == shift", "str")]))
    print(f"results: {Path(args.out) / 'gpu_check.json'}, {doc['fig10']['file']}")
    return 0 if doc["ok"] else 1


# -- report (docs/reproduction.md from the results files) -------------------------------------------------
def add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="docs/reproduction.md: every claim of both papers beside our results",
                       description="Read every results file below --results and write the reproduction report: "
                                   "one row per paper claim with the paper's value, ours, and a status.")
    p.add_argument("--results", default="bench_results", help="the results folder (default bench_results)")
    p.add_argument("--out", default="docs/reproduction.md", help="the report (default docs/reproduction.md)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from .reproduction import STATUSES, Results, evaluate, report

    folder = Path(args.results)
    if not folder.is_dir():
        print(f"error: no results folder {folder}", file=sys.stderr)
        return 2
    results = Results.read(folder)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(results, source=args.results), encoding="utf-8")
    rows = evaluate(results)
    print(f"{out}: {len(rows)} claims from {len(results.docs)} results files in {folder}")
    print(", ".join(f"{s}: {sum(r.status == s for r in rows)}" for s in STATUSES))
    if results.skipped:
        print(f"skipped (not results documents): {', '.join(results.skipped)}")
    return 0


def add_limits(sub: Any) -> None:
    from .limits import DEFAULT_OUT, SECTIONS

    p = sub.add_parser("limits", help="the roofline table: every hot path beside its physical limit, one run",
                       description="Save, update save, list(ms), serving (client threads, a burst, Ray Serve) "
                                   "and proxy scoring, each interleaved with its limit; median of the rounds.")
    p.add_argument("--models", type=int, default=5000, help="FFNN-48 models in the set (default 5000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, median reported (default 3)")
    p.add_argument("--threads", type=int, default=8, help="client threads calling predict (default 8)")
    p.add_argument("--requests", type=int, default=4000, help="requests per serving measurement (default 4000)")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray Serve comparison")
    p.add_argument("--only", default=None, help=f"comma-separated parts to measure: {', '.join(SECTIONS)} "
                                                "(default: all)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default {DEFAULT_OUT})")
    p.set_defaults(func=cmd_limits)


def cmd_limits(args: argparse.Namespace) -> int:
    import os

    from .limits import format_limits, machine, run_limits

    print(f"limits: {args.models} FFNN-48 models, {args.rounds} rounds, {args.threads} client threads, "
          f"{args.requests} requests; machine: {machine()}")
    print("load average before: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    only = None if args.only is None else [part.strip() for part in args.only.split(",") if part.strip()]
    result = run_limits(models=args.models, rounds=args.rounds, threads=args.threads, requests=args.requests,
                        ray_serve=not args.no_ray, out=args.out, only=only, progress=_say)
    print("load average after: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    print()
    print(format_limits(result))
    print()
    print(f"took {result.seconds:.0f} s; results: {', '.join(result.files) or '-'}")
    return 0


# -- lake ---------------------------------------------------------------------------------------------
def add_lake(sub: Any) -> None:
    p = sub.add_parser("lake", help="the model lake: incremental searches and layers as arms vs a fresh search",
                       description="Search again, with appended items, with derived candidates, and with "
                                   "layers=3; each against a fresh search (interleaved rounds, medians).")
    p.add_argument("--arch", default="resnet18", help="resnet18, resnet152, vit, bert or mlp (default resnet18)")
    p.add_argument("--models", type=int, default=35, help="candidates (default 35, the paper's)")
    p.add_argument("--derived", type=int, default=5, help="candidates derived from existing ones (default 5)")
    p.add_argument("--items", type=int, default=2000, help="data items (default 2000, the paper's)")
    p.add_argument("--append", type=float, default=0.25, help="part of the items appended (default 0.25)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's)")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels for image architectures (default 32; 224: the papers' resolution, "
                        "reduced widths; use fewer --items)")
    p.add_argument("--zoo", choices=("trained", "random"), default="trained",
                   help="trained (default): candidates derived from a base trained briefly on the task, so they "
                        "differ in quality as pretrained models do; random: random weights, every candidate about "
                        "equally bad, noise picks each rung's survivors (the adversarial case for appended items)")
    p.add_argument("--quick", action="store_true", help="mlp, 8+2 candidates, 400 items, 1 round (the test run)")
    p.set_defaults(func=cmd_lake)


def cmd_lake(args: argparse.Namespace) -> int:
    from .lake import PHASES, run_lake_bench

    if args.quick:
        args.arch, args.models, args.derived, args.items, args.rounds = "mlp", 8, 2, 400, 1
    print("load average before: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    res = run_lake_bench(arch=args.arch, models=args.models, items=args.items, derived=args.derived,
                         append=args.append, rounds=args.rounds, device=args.device, threads=args.threads or None,
                         size=args.size, zoo=args.zoo, progress=_say)
    size = f" at {args.size} px" if args.size else ""
    print(f"lake: {args.arch}{size}, {res.zoo} zoo, {args.models}+{args.derived} candidates, {args.items} items, "
          f"{args.rounds} round(s); candidates built in {res.build_s:.1f} s; "
          "times in seconds (median, min-max); timings on a shared machine are noisy")
    print(format_table(res.rows, [("step", "step", "str"), ("versus", "versus", "str"), ("median_s", "median s", "s"),
                                  ("min_s", "min s", "s"), ("max_s", "max s", "s"), ("ratio", "ratio", "x"),
                                  ("work", "block work", "x"), ("goal", "goal", "x")]))
    print("block work: items through blocks (all depths) against the step it is compared with; it does not "
          "vary with load, and leaves out preparing candidates (split checks, block hashing) and the proxy")
    print("search phases (median s): " + "; ".join(
        f"{step}: " + ", ".join(f"{phase} {res.phases[step][phase]:.3f}" for phase in PHASES)
        for step in ("fresh", "appended") if step in res.phases))
    print("appended: candidates per rung (from the second) that were there in the first search too: "
          + (", ".join(f"{same}/{of}" for same, of in res.kept_survivors) or "-")
          + " (a candidate new on a rung computes its old chunks)")
    print("kept features (round 1, MiB): " + ", ".join(f"after {step} {n / 2**20:.1f}"
                                                        for step, n in res.kept_bytes.items()))
    print(format_targets(res.targets))
    print("load average per round: " + ", ".join(f"{v:.2f}" for v in res.loads))
    print("load average after: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    return 0 if all(res.equal.values()) else 1


# -- zoo (issue 20: saving a set of 3 zoo models vs one torch.save) ----------------------------------------
def add_zoo(sub: Any) -> None:
    from .zoosave import GOAL, QUICK

    p = sub.add_parser("zoo", help="save speed over the model zoo: a set of 3 models vs one torch.save",
                       description="For each zoo architecture (random weights, tiny configs), save a set of 3 "
                                   "models into a fresh store and write their state dicts with one torch.save "
                                   "+ fsync (same disk), in interleaved rounds; the median ratio over the zoo "
                                   f"against the goal (<= {GOAL:g}x).")
    p.add_argument("names", nargs="*", metavar="ARCH",
                   help=f"architectures of mm_jupyter.bench.zoo (default: a quick subset of {len(QUICK)})")
    p.add_argument("--full", action="store_true", help="every architecture of the zoo")
    p.add_argument("--rounds", type=_positive, default=3, help="timed rounds per architecture (default 3)")
    p.add_argument("--dir", default=None, help="folder for the stores and files (default: the temp folder)")
    p.set_defaults(func=cmd_zoo)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def zoo_names(args: argparse.Namespace) -> list[str]:
    """The architectures a parsed ``zoo`` command measures (unknown names: one BenchError)."""
    from ..errors import BenchError
    from .zoo import ZOO
    from .zoosave import QUICK

    if args.full and args.names:
        raise BenchError("give architectures or --full, not both")
    names = list(ZOO) if args.full else list(args.names or QUICK)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        raise BenchError(f"unknown zoo architecture(s) {', '.join(unknown)}; known: {', '.join(ZOO)}")
    return names


def cmd_zoo(args: argparse.Namespace) -> int:
    from .limits import machine
    from .zoosave import format_zoo, run_zoo

    names = zoo_names(args)
    print(f"zoo save speed: {len(names)} architectures, {args.rounds} rounds (+1 warm-up); machine: {machine()}")
    result = run_zoo(names, rounds=args.rounds, folder=args.dir, progress=_say)
    print()
    print(format_zoo(result))
    return 0


COMMANDS: list[Callable[[Any], None]] = [add_modelsets, add_catalog, add_search, add_materialize, add_serving,
                                         add_partition, add_alsatian, add_gpu, add_report, add_limits, add_lake,
                                         add_zoo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mm_jupyter.bench",
                                     description="Run one of the papers' experiments and print its results.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="EXPERIMENT")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..errors import MMError

    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        code: int = args.func(args)
    except MMError as e:  # bad input or a machine that cannot run it: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not getattr(args, "requirements", False):  # a requirements file is read by pip: nothing else on stdout
        print(f"[{args.command} finished in {time.perf_counter() - t0:.1f} s]")
    return code


if __name__ == "__main__":
    sys.exit(main())
