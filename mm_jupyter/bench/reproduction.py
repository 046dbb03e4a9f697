"""Every claim of the two papers beside our measurement: the reproduction report and the notebooks' tables.

A ``Claim`` names the paper's numbers it rests on (``paper_numbers.toml``), how to measure ours from the
results files (``Results``), the tolerance within which ours *reproduces* it, and why ours may differ
(scale, resolution, CPU vs GPU, item counts). ``evaluate`` gives one ``Row`` per claim with a status:

* **reproduced**: ours agrees with the paper's value as the paper qualifies it ("up to", "more than", a
  range), within the stated tolerance;
* **reproduced in trend**: the direction and ordering hold (who is faster, what grows), not the size (a claim
  that states a direction and no number is *reproduced* when its direction holds);
* **not reproduced**: ours contradicts the claim, size and trend;
* **not reproducible here**: the claim needs what this machine or project does not have (the paper's
  data or hardware, downloaded models); the reason is given;
* **not run**: no results file holds the measurement yet; the command that makes one is given.

``python -m mm_jupyter.bench report`` writes ``docs/reproduction.md`` from the files below a results
folder; the notebooks show ``table(evaluate(...))`` for their artefacts.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from . import papers
from .results import read_all

REPRODUCED, TREND, NOT_REPRODUCED, NOT_HERE, NOT_RUN = (
    "reproduced", "reproduced in trend", "not reproduced", "not reproducible here", "not run")
STATUSES = (REPRODUCED, TREND, NOT_REPRODUCED, NOT_HERE, NOT_RUN)
#: the results of the scales in order of preference: the paper's sizes first
SCALE_ORDER = {"paper": 0, "full": 0, "cpu": 1, "quick": 2}


# --------------------------------------------------------------------------------------------
# The results files


@dataclass
class Results:
    """The results documents a report compares with the papers, by experiment."""

    docs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, folder: str | Path) -> "Results":
        """Every results file below ``folder``."""
        docs, skipped = read_all(folder)
        return cls([(str(p), d) for p, d in docs], skipped)

    @classmethod
    def of(cls, docs: Iterable[dict[str, Any]]) -> "Results":
        """Documents held in memory (a notebook's artefacts: ``art.to_json()``)."""
        return cls([("(this notebook)", d) for d in docs])

    def _of(self, experiment: str) -> list[tuple[str, dict[str, Any]]]:
        return [(p, d) for p, d in self.docs if d.get("experiment") == experiment]

    def alsatian(self, figure: str) -> tuple[str, dict[str, Any]] | None:
        """The artefact's results at the largest scale there is (the paper's, else cpu, else quick)."""
        found = [(p, d) for p, d in self._of("alsatian") if d.get("figure") == figure]
        found.sort(key=lambda pd: SCALE_ORDER.get(pd[1].get("config", {}).get("scale"), 9))
        return found[0] if found else None

    def modelsets(self, arch: str = "ffnn48", update_rate: float = 0.10) -> tuple[str, dict[str, Any]] | None:
        """The run of ``arch`` at ``update_rate`` with the most models per set."""
        found = [(p, d) for p, d in self._of("modelsets") if d["config"].get("arch") == arch
                 and math.isclose(d["config"].get("update_rate", -1), update_rate)]
        return max(found, key=lambda pd: pd[1]["config"]["models"]) if found else None

    def searches(self, device: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Every ``bench search`` run (on ``device`` only: ``cpu`` or ``cuda``)."""
        return [(p, d) for p, d in self._of("search")
                if device is None or str(d["config"].get("device_used", "cpu")).startswith(device)]


@dataclass
class Ours:
    """Our measurement for a claim: a number comparable to the paper's (or None when only a trend is
    compared), how to read it, whether the trend holds, and the scale it was measured at."""

    value: float | None
    text: str
    scale: str
    trend: bool | None = None
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Claim:
    """One claim of a paper and how ours is measured and judged."""

    id: str
    paper: str
    artefact: str
    claim: str
    numbers: tuple[str, ...]
    why: str
    measure: Callable[[Results], Ours | None] | None = None
    tolerance: float = 0.0
    absolute: bool = False
    run: str = ""
    not_here: str = ""
    convert: Callable[[float], float] = float  # the paper's value in the unit of ours

    def paper_text(self) -> str:
        return "; ".join(papers.number(i).text() for i in self.numbers) if self.numbers else "(no number)"

    def tolerance_text(self) -> str:
        if not self.numbers:
            return "qualitative"
        if not self.tolerance:
            relation = papers.number(self.numbers[0]).relation
            return "the bound holds" if relation in ("more than", "less than") else "exact"
        unit = papers.number(self.numbers[0]).unit if self.numbers else ""
        return f"±{self.tolerance:g}{'' if unit in ('%', 'x') else ' '}{unit}" if self.absolute \
            else f"±{100 * self.tolerance:g}%"


@dataclass
class Row:
    claim: Claim
    ours: Ours | None
    status: str
    ratio: float | None
    why: str


def judge(claim: Claim, results: Results) -> Row:
    """The status of one claim against ``results``."""
    if claim.not_here:
        return Row(claim, None, NOT_HERE, None, claim.not_here)
    ours = claim.measure(results) if claim.measure is not None else None
    if ours is None:
        return Row(claim, None, NOT_RUN, None, f"run `{claim.run}`" if claim.run else "no results")
    ratio = None
    status = NOT_REPRODUCED
    if ours.value is not None and claim.numbers:
        n = papers.number(claim.numbers[0])
        target = claim.convert(n.centre)
        ratio = ours.value / target if target else None
        converted = papers.PaperNumber(**{**n.__dict__, "value": None if n.is_range else claim.convert(n.centre),
                                          "low": claim.convert(n.low) if n.is_range else None,  # type: ignore[arg-type]
                                          "high": claim.convert(n.high) if n.is_range else None})  # type: ignore[arg-type]
        if converted.matches(ours.value, claim.tolerance, claim.absolute):
            status = REPRODUCED
    if status != REPRODUCED and ours.trend:
        status = REPRODUCED if not claim.numbers else TREND  # a claim of direction alone is reproduced whole
    return Row(claim, ours, status, ratio, claim.why)


def evaluate(results: Results, claims: Sequence[Claim] | None = None, *, artefact: str | None = None,
             paper: str | None = None) -> list[Row]:
    """Judge ``claims`` (default: all), optionally of one artefact ("Fig. 10") or paper."""
    chosen = [c for c in (claims or CLAIMS) if (artefact is None or c.artefact == artefact)
              and (paper is None or c.paper == paper)]
    return [judge(c, results) for c in chosen]


#: the paper artefacts each of our Alsatian artefacts speaks to
ARTEFACTS = {"table1": ("Table 1", "Sec. 4.3", "Fig. 12"), "fig5": ("Fig. 5",),
             "fig10": ("Fig. 10", "Fig. 11", "Sec. 5.4"), "fig13": ("Fig. 13",),
             "fig15": ("Fig. 15", "Fig. 14", "Sec. 6.3"), "fig16": ("Fig. 16",), "fig17": ("Fig. 17", "Abstract")}


def claims_for(figure: str) -> list[Claim]:
    """The claims about the paper artefacts one of our Alsatian artefacts (``alsatian.FIGURES``) reproduces."""
    return [c for c in CLAIMS if c.paper == "alsatian" and c.artefact in ARTEFACTS[figure]]


def table(rows: Sequence[Row]) -> Any:
    """The rows as a DataFrame: claim, paper, ours (with its scale), ours/paper, status, why it differs."""
    import pandas as pd

    return pd.DataFrame([{
        "figure": r.claim.artefact, "claim": r.claim.claim, "paper": r.claim.paper_text(),
        "ours": "-" if r.ours is None else r.ours.text, "scale": "-" if r.ours is None else r.ours.scale,
        "ours/paper": "-" if r.ratio is None else f"{r.ratio:.2g}",
        "status": r.status + (f" ({r.claim.tolerance_text()})" if r.status == REPRODUCED else ""),
        "why it differs": r.why} for r in rows])


# --------------------------------------------------------------------------------------------
# Measuring ours: helpers over the documents


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _alsatian_scale(doc: dict[str, Any]) -> str:
    c = doc["config"]
    dev = c.get("device", "cpu")
    return f"{c.get('scale')} scale, {'GPU' if str(dev).startswith('cuda') else 'CPU'}"


def _modelsets_scale(doc: dict[str, Any]) -> str:
    c, env = doc["config"], doc.get("environment", {})
    return f"{c['models']:,} models x {c['arch']}, {c['steps']} U3 steps, CPU ({env.get('cpus', '?')} cores)"


def _search_scale(doc: dict[str, Any]) -> str:
    c = doc["config"]
    size = f"{c['image_size']} px" if c.get("image_size") else ("reduced widths" if c.get("reduced") else "224 px")
    dev = "GPU" if str(c.get("device_used", "cpu")).startswith("cuda") else "CPU"
    return f"{c['models']} x {c['items']:,} items, {c['arch']} {c['distribution']}, {size}, {dev}"


def _by(doc: dict[str, Any], step: int, approach: str) -> dict[str, Any] | None:
    return next((r for r in doc["rows"] if r["step"] == step and r["approach"] == approach), None)


def _u3(doc: dict[str, Any]) -> list[int]:
    return sorted({r["step"] for r in doc["rows"] if r["step"] > 0})


def _ms(measure: Callable[[str, dict[str, Any]], tuple[float | None, str, bool | None] | None],
        arch: str = "ffnn48", rate: float = 0.10) -> Callable[[Results], Ours | None]:
    """A measure over one modelsets results document."""
    def run(res: Results) -> Ours | None:
        found = res.modelsets(arch, rate)
        if found is None:
            return None
        got = measure(*found)
        if got is None:
            return None
        value, text, trend = got
        return Ours(value, text, _modelsets_scale(found[1]), trend, [found[0]])
    return run


def _alsa(figure: str, measure: Callable[[dict[str, Any]], tuple[float | None, str, bool | None] | None]
          ) -> Callable[[Results], Ours | None]:
    """A measure over one Alsatian artefact's results."""
    def run(res: Results) -> Ours | None:
        found = res.alsatian(figure)
        if found is None:
            return None
        got = measure(found[1])
        if got is None:
            return None
        value, text, trend = got
        return Ours(value, text, _alsatian_scale(found[1]), trend, [found[0]])
    return run


# -- MMM ---------------------------------------------------------------------------------------


PAPER_MODELS = 5000


def _u1_params(path: str, doc: dict[str, Any]) -> tuple[float, str, bool] | None:
    r = _by(doc, 0, "baseline") or _by(doc, 0, "limit")
    if r is None:
        return None
    mb = r["parameter_bytes"] / r["models"] * PAPER_MODELS / 1e6
    return mb, f"{mb:.2f} MB per 5,000 models ({r['parameter_bytes'] // r['models']:,} B per model)", True


def _baseline_overhead(path: str, doc: dict[str, Any]) -> tuple[float, str, bool] | None:
    r = _by(doc, 0, "baseline")
    if r is None:
        return None
    kb = (r["bytes"] - r["parameter_bytes"]) / 1000
    return kb, f"{kb:.1f} KB per set", kb < 0.01 * r["parameter_bytes"] / 1000


def _mmlib_overhead(path: str, doc: dict[str, Any]) -> tuple[float, str, bool] | None:
    r = _by(doc, 0, "mmlib-base")
    if r is None:
        return None
    kb = (r["bytes"] - r["parameter_bytes"]) / r["models"] / 1000
    return kb, f"{kb:.2f} KB per model ({kb * PAPER_MODELS / 1000:.1f} MB per 5,000)", kb > 1


def _saving(a: str, b: str, steps: str) -> Callable[[str, dict[str, Any]], tuple[float, str, bool] | None]:
    """Storage of ``a`` below ``b`` in percent, at U1 or over the U3 steps (the smallest saving)."""
    def run(path: str, doc: dict[str, Any]) -> tuple[float, str, bool] | None:
        which = [0] if steps == "U1" else _u3(doc)
        pairs = [(_by(doc, s, a), _by(doc, s, b)) for s in which]
        if not which or any(x is None or y is None for x, y in pairs):
            return None
        savings = [100 * (1 - x["bytes"] / y["bytes"]) for x, y in pairs]  # type: ignore[index]
        worst = min(savings)
        text = f"{worst:.2f}%" + ("" if len(savings) == 1 else " (smallest of " + ", ".join(
            f"{v:.2f}" for v in savings) + ")")
        return worst, text, worst > 0
    return run


def _update_u3_mb(path: str, doc: dict[str, Any]) -> tuple[float, str, bool] | None:
    rows = [_by(doc, s, "update") for s in _u3(doc)]
    base = _by(doc, 0, "baseline")
    if not rows or any(r is None for r in rows) or base is None:
        return None
    per = [r["bytes"] / r["models"] * PAPER_MODELS / 1e6 for r in rows]  # type: ignore[index]
    big = base["bytes"] / base["models"] * PAPER_MODELS / 1e6
    return statistics.median(per), f"{statistics.median(per):.1f} MB per U3 version per 5,000 models", \
        max(per) < big


def _growth(key: str) -> Callable[[Results], Ours | None]:
    """FFNN-69's storage over FFNN-48's per model, for ``key`` (an approach)."""
    def run(res: Results) -> Ours | None:
        a, b = res.modelsets("ffnn69"), res.modelsets("ffnn48")
        if a is None or b is None:
            return None
        ra, rb = _by(a[1], 0, key), _by(b[1], 0, key)
        if ra is None or rb is None:
            return None
        g = (ra["bytes"] / ra["models"]) / (rb["bytes"] / rb["models"])
        params = ra["parameter_bytes"] / ra["models"] / (rb["parameter_bytes"] / rb["models"])
        return Ours(g, f"{g:.2f}x (parameters {params:.2f}x)", _modelsets_scale(a[1]), 1 < g <= params * 1.001,
                    [a[0], b[0]])
    return run


def _cnn_scaling(res: Results) -> Ours | None:
    a, b = res.modelsets("cnn"), res.modelsets("ffnn48")
    if a is None or b is None:
        return None
    out = []
    for approach in ("baseline", "update", "mmlib-base"):
        ra, rb = _by(a[1], 0, approach), _by(b[1], 0, approach)
        if ra is not None and rb is not None:
            out.append((approach, (ra["bytes"] / ra["models"]) / (rb["bytes"] / rb["models"])))
    ra, rb = _by(a[1], 0, "limit") or {}, _by(b[1], 0, "limit") or {}
    if not out or not ra or not rb:
        return None
    params = (ra["parameter_bytes"] / ra["models"]) / (rb["parameter_bytes"] / rb["models"])
    base = dict(out)["baseline"]
    trend = all(1 < v for _, v in out) and abs(base / params - 1) < 0.02
    return Ours(None, ", ".join(f"{a} {v:.2f}x" for a, v in out) + f" (parameter bytes {params:.2f}x)",
                _modelsets_scale(a[1]), trend, [a[0], b[0]])


def _rates(res: Results) -> Ours | None:
    docs = {rate: res.modelsets("ffnn48", rate) for rate in (0.1, 0.2, 0.3)}
    if any(d is None for d in docs.values()):
        return None
    per = {}
    for rate, found in docs.items():
        assert found is not None
        doc = found[1]
        s = _u3(doc)[0]
        per[rate] = {a: (_by(doc, s, a) or {}).get("bytes", 0) / doc["config"]["models"]
                     for a in ("baseline", "update", "provenance", "mmlib-base")}
    grows = per[0.1]["update"] < per[0.2]["update"] < per[0.3]["update"]
    flat = all(abs(per[r]["baseline"] / per[0.1]["baseline"] - 1) < 0.01 for r in per)
    small = all(per[r]["provenance"] < 0.01 * per[r]["baseline"] for r in per)
    text = "update B/model " + " / ".join(f"{per[r]['update']:.0f}" for r in per) + \
        "; provenance B/model " + " / ".join(f"{per[r]['provenance']:.1f}" for r in per) + " at 10/20/30%"
    found = docs[0.3]
    assert found is not None
    return Ours(None, text, _modelsets_scale(found[1]), grows and flat and small,
                [d[0] for d in docs.values() if d])


def _tts_order(path: str, doc: dict[str, Any]) -> tuple[None, str, bool] | None:
    """MMlib-base is the slowest to save in every version; Baseline's median over the versions is at most
    Update's (one save per version cannot be repeated, so a single slow save is judged by the median)."""
    steps = sorted({r["step"] for r in doc["rows"]})
    tts = {(r["step"], r["approach"]): r["tts_s"] for r in doc["rows"] if r["approach"] != "limit"}
    if any((s, a) not in tts for s in steps for a in ("mmlib-base", "baseline", "update")):
        return None
    slowest = [s for s in steps if tts[(s, "mmlib-base")] == max(v for (t, _), v in tts.items() if t == s)]
    base = statistics.median(tts[(s, "baseline")] for s in steps)
    update = statistics.median(tts[(s, "update")] for s in steps)
    return None, (f"MMlib-base slowest in {len(slowest)} of {len(steps)} versions; median TTS baseline {base:.3f} s, "
                  f"update {update:.3f} s"), len(slowest) == len(steps) and base <= update


def _speedup_vs_mmlib(key: str) -> Callable[[str, dict[str, Any]], tuple[float, str, bool] | None]:
    def run(path: str, doc: dict[str, Any]) -> tuple[float, str, bool] | None:
        vals = [r[key] for r in doc["rows"] if r["approach"] == "baseline" and r.get(key)]
        if not vals:
            return None
        return min(vals), f"{min(vals):.1f}x (smallest over {len(vals)} versions; largest {max(vals):.1f}x)", \
            min(vals) > 1
    return run


def _staircase(path: str, doc: dict[str, Any]) -> tuple[float, str, bool] | None:
    steps = _u3(doc)
    rows = {a: [_by(doc, s, a) for s in steps] for a in ("update", "provenance", "baseline")}
    if len(steps) < 2 or any(r is None for v in rows.values() for r in v):
        return None
    prov = [r["ttr_s"] for r in rows["provenance"]]  # type: ignore[index]
    upd = [r["ttr_s"] for r in rows["update"]]  # type: ignore[index]
    ratio = prov[-1] / prov[0]
    rising = all(b > a for a, b in zip(prov, prov[1:])) and upd[-1] > upd[0]
    return ratio, (f"provenance TTR {' / '.join(f'{t:.2f}' for t in prov)} s: U3-{steps[-1]} is {ratio:.2f}x "
                   f"U3-1; update {upd[0]:.3f} -> {upd[-1]:.3f} s"), rising


def _baseline_flat(path: str, doc: dict[str, Any]) -> tuple[None, str, bool] | None:
    ttr = [r["ttr_s"] for r in doc["rows"] if r["approach"] == "baseline"]
    if len(ttr) < 2:
        return None
    spread = max(ttr) / min(ttr)
    return None, f"baseline TTR {min(ttr):.3f}-{max(ttr):.3f} s over the versions ({spread:.2f}x)", spread < 2


def _u3_counts(res: Results) -> Ours:
    from .modelsets import choose_updates

    full, partial = choose_updates(PAPER_MODELS, 0.10, 1)
    return Ours(float(len(full)), f"{len(full)} fully + {len(partial)} partially per U3 step",
                "the workload's own choice at 5,000 models (no timing)", len(full) == len(partial))


def _bytes_per_param(path: str, doc: dict[str, Any]) -> tuple[float, str, bool] | None:
    from .modelsets import ARCHS

    r = _by(doc, 0, "limit")
    if r is None:
        return None
    per = r["parameter_bytes"] / r["models"] / ARCHS[doc["config"]["arch"]].params
    return per, f"{per:g} bytes per parameter (float32, uncompressed)", True


# -- Alsatian: structure (computed, no results file) ----------------------------------------------


def _halving_example(res: Results) -> Ours:
    from ..modelsearch.halving import schedule

    rungs = schedule(8, 1, 800)
    models = [r.models for r in rungs]
    items = [r.items for r in rungs]
    ok = models == [8, 4, 2] and [r.keep for r in rungs] == [4, 2, 1] and items == [200, 400, 800]
    return Ours(float(len(rungs)), f"{len(rungs)} rungs: {models} models on {items} of 800 items, keeping "
                f"{[r.keep for r in rungs]}", "our schedule (no timing)", ok)


def _tree_example(res: Results) -> Ours:
    from ..modelsearch.tree import TaskTree

    tree = TaskTree(1)
    m1 = [f"B{i}" for i in range(1, 7)]
    m2 = m1[:2] + [f"B{i}" for i in range(7, 11)]
    m3 = m2[:4] + ["B11", "B12"]
    tree.add_model("M1", m1, [1] * 6)
    tree.add_model("M2", m2, [1] * 6)
    before = tree.edges
    tree.add_model("M3", m3, [1] * 6)
    added = tree.edges - before
    tree.prune_models(["M2"])
    left = tree.edges
    ok = added == 2 and left == 6 + 2 + 2  # M1's six, M2's blocks 3-4 still used by M3, M3's own two
    return Ours(float(6 - added), f"M3 adds {added} nodes; pruning M2 leaves {left} edges (M1 6 + shared 2 + M3 2)",
                "our task tree (no timing)", ok)


def _dfs_once(res: Results) -> Ours | None:
    rows = [(p, r) for p, d in res.searches() for r in d["rows"] if r["approach"] == "alsatian"]
    found = res.alsatian("fig10")
    if found:
        rows += [(found[0], r) for r in found[1]["rows"] if r["approach"] == "alsatian"]
    if not rows:
        return None
    exact = [r for _, r in rows if r.get("block_inferences") == r.get("unique_edges")]
    return Ours(None, f"block inferences == task-tree edges in {len(exact)} of {len(rows)} unlimited runs",
                f"{len(rows)} alsatian runs", len(exact) == len(rows), sorted({p for p, _ in rows}))


# -- Alsatian: measured --------------------------------------------------------------------------


def _table1_value(arch: str, key: str, scale: float = 1.0
                  ) -> Callable[[dict[str, Any]], tuple[float, str, bool] | None]:
    def run(doc: dict[str, Any]) -> tuple[float, str, bool] | None:
        row = next((r for r in doc["rows"] if r["architecture"] == arch), None)
        if row is None or row.get(key) is None:
            return None
        v = row[key] * scale
        return v, (f"{v:,.0f}" if scale == 1 else f"{v:,.1f} MB"), True
    return run


def _feature_kb(doc: dict[str, Any]) -> tuple[float, str, bool] | None:
    rows = [r for r in doc["rows"] if r["params"] == r.get("reference_params")]  # measured at full width
    if not rows:
        return None
    per = {r["architecture"]: r["per_block_bytes"][-1] / 1000 for r in rows}
    worst = max(per.values())
    return worst, ", ".join(f"{a} {v:.1f} KB" for a, v in per.items()), worst < 10


def _fig5_share(arch: str, cached: bool, smallest: bool = True) -> Callable[[dict[str, Any]], tuple[Any, ...] | None]:
    def run(doc: dict[str, Any]) -> tuple[float, str, bool] | None:
        rows = [r for r in doc["rows"] if r["arch"] == arch]
        plain = sorted((r for r in rows if not r["cached_blocks"]), key=lambda r: r["items"])
        hit = next((r for r in rows if r["cached_blocks"]), None) if cached else (plain[0] if plain else None)
        if hit is None or not plain:
            return None
        share = 100 * hit["share_prepare model"]
        modelled = 100 * hit["share_prepare model (200 MB/s)"]
        if cached:  # model preparation weighs more once the cached input replaces most inference
            same = next((r for r in plain if r["items"] == hit["items"]), plain[-1])
            trend = hit["share_prepare model"] > same["share_prepare model"]
        else:  # and more with fewer items
            trend = plain[0]["share_prepare model"] > plain[-1]["share_prepare model"]
        return share, f"{share:.1f}% measured, {modelled:.1f}% with the store read at 200 MB/s " \
                      f"({hit['items']} items{', cached' if cached else ''})", trend
    return run


def _fig5_inference_dominates(doc: dict[str, Any]) -> tuple[None, str, bool] | None:
    big = [r for r in doc["rows"] if not r["cached_blocks"] and r["arch"] != "ResNet-18"]
    if not big:
        return None
    largest = max(r["items"] for r in big)
    sel = [r for r in big if r["items"] == largest]
    phases = ("prepare data", "prepare model", "inference", "proxy")
    ok = [r["arch"] for r in sel if r["share_inference"] == max(r[f"share_{p}"] for p in phases)]
    return None, f"inference is the largest phase for {len(ok)} of {len(sel)} models at {largest} items", \
        len(ok) == len(sel)


def _fig5_resnet18_data(doc: dict[str, Any]) -> tuple[None, str, bool] | None:
    rows = [r for r in doc["rows"] if r["arch"] == "ResNet-18" and not r["cached_blocks"]]
    if not rows:
        return None
    r = rows[0]
    phases = ("prepare data", "prepare model", "inference", "proxy")
    top = max(phases, key=lambda p: r[f"share_{p}"])
    return None, f"largest phase at {r['items']} items: {top} ({100 * r[f'share_{top}']:.0f}%); prepare data " \
                 f"{100 * r['share_prepare data']:.0f}%", top == "prepare data"


SearchRun = tuple[str, dict[str, Any], dict[str, dict[str, Any]]]


def _search_rows(res: Results, distribution: str | None = None, min_items: int = 0) -> list[SearchRun]:
    """(path, doc, rows by approach) of every search run (and fig10 configuration) with ``distribution``."""
    out = []
    for path, doc in res.searches():
        c = doc["config"]
        if (distribution is None or c["distribution"] == distribution) and c["items"] >= min_items:
            out.append((path, doc, {r["approach"]: r for r in doc["rows"]}))
    return out


def _best_search(res: Results, distribution: str, items: int | None = None,
                 min_items: int = 0) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """The search run closest to the paper's setting: GPU first, then the most items (up to ``items``
    when given, at least ``min_items``), then the most candidates."""
    runs = _search_rows(res, distribution, min_items)
    if items is not None:
        runs = [r for r in runs if r[1]["config"]["items"] <= items] or runs
    if not runs:
        return None

    def key(run: tuple[str, dict[str, Any], dict[str, Any]]) -> tuple[Any, ...]:
        c = run[1]["config"]
        return (str(c.get("device_used", "cpu")).startswith("cuda"), c["items"], c["models"],
                c.get("image_size") or 224)
    return max(runs, key=key)


def _speedup_claim(distribution: str, vs: str, items: int | None = None,
                   min_items: int = 0) -> Callable[[Results], Ours | None]:
    """Alsatian's end-to-end speed-up over ``vs`` in the search run closest to the paper's setting (at least
    ``min_items`` items), else the largest in the fig10 artefact for that distribution."""
    def run(res: Results) -> Ours | None:
        best = _best_search(res, distribution, items, min_items)
        if best is not None:
            path, doc, by = best
            if "alsatian" in by and vs in by:
                a, b = by["alsatian"], by[vs]
                v = b["seconds"] / a["seconds"]
                bound = a.get("sharing_bound_vs_shift")
                extra = f"; inference vs shift {a['inference_vs_shift']:.2f}x within the sharing " \
                        f"bound {bound:.2f}x" if bound and vs == "shift" else ""
                if a.get("min_s") is not None and b.get("min_s") is not None and b["min_s"] != b["max_s"]:
                    extra += f" (medians; {vs} {b['min_s']:.0f}-{b['max_s']:.0f} s, alsatian " \
                             f"{a['min_s']:.0f}-{a['max_s']:.0f} s)"
                return Ours(v, _x(v) + extra, _search_scale(doc), v > 1, [path])
        found = res.alsatian("fig10")
        if found is None:
            return None
        rows = [r for r in found[1]["rows"] if r["distribution"] == distribution and r["approach"] == "alsatian"
                and r.get(f"vs_{vs}") and r["items"] >= min_items]
        if not rows:
            return None
        values = [r[f"vs_{vs}"] for r in rows]
        best_row = max(rows, key=lambda r: r[f"vs_{vs}"])
        return Ours(max(values), f"{_x(max(values))} (largest of {len(rows)}: {best_row['arch']}, "
                    f"{best_row['items']} items)", _alsatian_scale(found[1]), min(values) > 1, [found[0]])
    return run


def _shift_vs_base(items_at_least: int = 0, trend: bool = True) -> Callable[[Results], Ours | None]:
    """SHiFT's end-to-end speed-up over Base (the largest); ``trend``: whether SHiFT being faster at all is
    the claim's direction (not for "halving alone gains little")."""
    def run(res: Results) -> Ours | None:
        vals, files, scale = [], [], ""
        for path, doc, by in _search_rows(res, min_items=items_at_least):
            if "shift" in by and "base" in by:
                vals.append(by["base"]["seconds"] / by["shift"]["seconds"])
                files.append(path)
                scale = _search_scale(doc)
        found = res.alsatian("fig10")
        if not vals and found is not None:
            rows = [r for r in found[1]["rows"] if r["approach"] == "shift" and r.get("vs_base")
                    and r["items"] >= items_at_least]
            vals = [r["vs_base"] for r in rows]
            files, scale = [found[0]], _alsatian_scale(found[1])
        if not vals:
            return None
        return Ours(max(vals), f"{_x(max(vals))} (largest of {len(vals)} runs; smallest {_x(min(vals))})", scale,
                    max(vals) >= 1 if trend else None, files)
    return run


def _max_speedup(vs: str, figures: Sequence[str] = ("fig10", "fig13", "fig15", "fig16", "fig17")
                 ) -> Callable[[Results], Ours | None]:
    def run(res: Results) -> Ours | None:
        cands: list[tuple[float, str, str]] = []
        for f in figures:
            found = res.alsatian(f)
            if found:
                for r in found[1]["rows"]:
                    if r["approach"].startswith("alsatian") and r.get(f"vs_{vs}"):
                        cands.append((r[f"vs_{vs}"], f"{f}", found[0]))
        for path, _doc, by in _search_rows(res):
            if "alsatian" in by and vs in by:
                cands.append((by[vs]["seconds"] / by["alsatian"]["seconds"], "search", path))
        if not cands:
            return None
        v, where, path = max(cands)
        return Ours(v, f"{_x(v)} (largest of {len(cands)} runs, in {where})", "every results file", v > 1,
                    sorted({p for _, _, p in cands}))
    return run


def _best_baseline(res: Results) -> Ours | None:
    cands = []
    for f in ("fig10", "fig13", "fig15", "fig17"):
        found = res.alsatian(f)
        if found:
            for r in found[1]["rows"]:
                if r["approach"] == "alsatian" and r.get("vs_base") and r.get("vs_shift"):
                    cands.append((min(r["vs_base"], r["vs_shift"]), f, found[0]))
    for path, _doc, by in _search_rows(res):
        if {"alsatian", "base", "shift"} <= set(by):
            cands.append((min(by[a]["seconds"] for a in ("base", "shift")) / by["alsatian"]["seconds"], "search",
                          path))
    if not cands:
        return None
    v, where, _ = max(cands)
    return Ours(v, f"{_x(v)} over the faster baseline (largest of {len(cands)}, in {where})", "every results file",
                v > 1, sorted({p for _, _, p in cands}))


def _proxy_constant(res: Results) -> Ours | None:
    ratios, files = [], []
    for path, _doc, by in _search_rows(res):
        if "alsatian" in by and "shift" in by and by["shift"].get("t_proxy"):
            ratios.append(by["alsatian"]["t_proxy"] / by["shift"]["t_proxy"])
            files.append(path)
    if not ratios:
        return None
    mid = statistics.median(ratios)  # single rounds on a loaded machine scatter; the typical run decides
    return Ours(None, f"alsatian's proxy time / shift's: median {mid:.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
                f"{len(ratios)} search runs", 0.5 <= mid <= 2, files)


def _baselines_flat(figure: str = "fig10") -> Callable[[Results], Ours | None]:
    def run(res: Results) -> Ours | None:
        found = res.alsatian(figure)
        if found is None:
            return None
        doc = found[1]
        items = doc["config"].get("items") or doc["rows"][0]["items"]
        spreads = []
        keys = ("arch",) if figure == "fig10" else ()
        for group in {tuple(r.get(k) for k in keys) for r in doc["rows"]}:
            for a in ("base", "shift"):
                ts = [r["seconds"] for r in doc["rows"] if r["approach"] == a and r["items"] == items
                      and tuple(r.get(k) for k in keys) == group]
                if len(ts) > 1:
                    spreads.append(max(ts) / min(ts))
        al = []
        for group in {tuple(r.get(k) for k in keys) for r in doc["rows"]}:
            t = {r["distribution"]: r["seconds"] for r in doc["rows"] if r["approach"] == "alsatian"
                 and r["items"] == items and tuple(r.get(k) for k in keys) == group}
            if {"top-50", "top-layers"} <= set(t):
                al.append(t["top-layers"] < t["top-50"])
        if not spreads:
            return None
        return Ours(None, f"base/shift time across distributions varies {max(spreads):.2f}x at most; alsatian "
                    f"faster at top-layers than top-50 in {sum(al)} of {len(al)}", _alsatian_scale(doc),
                    max(spreads) < 1.5 and all(al), [found[0]])
    return run


def _per_block(arch: str, check: Callable[[list[float], list[int]], bool], what: str
               ) -> Callable[[dict[str, Any]], tuple[None, str, bool] | None]:
    def run(doc: dict[str, Any]) -> tuple[None, str, bool] | None:
        row = next((r for r in doc["rows"] if r["architecture"] == arch), None)
        if row is None or "per_block_params" not in row:
            return None
        ms, params = row["per_block_ms"], row["per_block_params"]
        text = what.format(ms_first=ms[0], ms_mid=statistics.median(ms), p_first=params[0],
                           p_mid=statistics.median(params), p_max=max(params))
        return None, text, check(ms, params)
    return run


def _vit_flat(ms: list[float], params: list[int]) -> bool:
    layers = ms[1:-1] or ms
    p = params[1:-1] or params
    return max(layers) / min(layers) < 2 and max(p) == min(p)


def _resnet_shape(ms: list[float], params: list[int]) -> bool:
    """The stem is among the costliest blocks per item, holds few parameters, and the last blocks hold
    several times the median block's."""
    body = params[1:-1]
    return ms[0] >= statistics.median(ms) and params[0] < statistics.median(body) \
        and max(body[-3:]) > 3 * statistics.median(body)


def _fig16_all_budgets(doc: dict[str, Any]) -> tuple[None, str, bool] | None:
    al = [r for r in doc["rows"] if r["approach"].startswith("alsatian")]
    if not al:
        return None
    worst = min(r["vs_shift"] for r in al)
    return None, "alsatian vs shift at " + ", ".join(f"{r['approach'].split()[-1]}: {_x(r['vs_shift'])}"
                                                      for r in al), worst > 1


def _fig_speed(figure: str, vs: str = "base", **match: Any) -> Callable[[dict[str, Any]], tuple[Any, ...] | None]:
    def run(doc: dict[str, Any]) -> tuple[float, str, bool] | None:
        rows = [r for r in doc["rows"] if r["approach"] == "alsatian" and r.get(f"vs_{vs}")
                and all(r.get(k) == v for k, v in match.items())]
        if not rows:
            return None
        v = max(r[f"vs_{vs}"] for r in rows)
        return v, f"{_x(v)} (largest of {len(rows)})", min(r[f"vs_{vs}"] for r in rows) > 1
    return run


def _fig13_like_fig10(res: Results) -> Ours | None:
    found = res.alsatian("fig13")
    if found is None:
        return None
    rows = [r for r in found[1]["rows"] if r["approach"] == "alsatian"]
    ok = all(r["vs_shift"] > 1 and r["vs_base"] > 1 for r in rows)
    return Ours(None, "alsatian vs base / shift: " + ", ".join(f"{r['set']} {_x(r['vs_base'])} / {_x(r['vs_shift'])}"
                                                               for r in rows), _alsatian_scale(found[1]), ok,
                [found[0]])


def _gpu_transfer(res: Results) -> Ours | None:
    found = [(p, d) for p, d in res.docs if d.get("experiment") == "gpu_check" and d.get("transfer")]
    if not found:
        return None
    path, doc = found[-1]
    t = doc["transfer"]
    ratio = t["block_ms"] / t["transfer_ms"]
    return Ours(ratio, f"one block {t['block_ms']:.2f} ms vs moving its input to the GPU {t['transfer_ms']:.3f} ms "
                f"({t['what']})", doc.get("device_name", "GPU"), ratio > 1, [path])


# --------------------------------------------------------------------------------------------
# The claims

_M = "mmm"
_A = "alsatian"
PER_MODEL = ("ours is measured per model and scaled to the paper's 5,000 models; ")
WARM = "our times are warm-cache on a local disk of a loaded 2-core CPU; "
NO_HF = ("needs the Hugging Face hub (downloads are not allowed here): our zoo's families are built from configs "
         "with random weights and derived as the paper's generator derives them, so their overlap is ours, not the "
         "hub's")
RUN_MMM = "python -m mm_jupyter.bench modelsets"
RUN_FIG = "python -m mm_jupyter.bench alsatian --figure {}"
RUN_SEARCH = "python -m mm_jupyter.bench search --models 35 --items 2000"

CLAIMS: list[Claim] = [
    # ---- Efficient Multi-Model Management ----
    Claim("mmm.fig2.workload", _M, "Fig. 2", "each U3 iteration retrains 5% of the models fully and 5% partially",
          ("mmm.fig3.u3_full_models",), "the same rule (a seeded draw; the first half retrained fully)",
          _u3_counts, 0.0),
    Claim("mmm.fig3.parameters", _M, "Fig. 3", "a U1 set's parameters take ~99.9 MB (4,993 float32 x 5,000)",
          ("mmm.fig3.u1_parameter_mb",), PER_MODEL + "the same FFNN-48 (4,993 parameters)",
          _ms(_u1_params), 0.01, run=RUN_MMM),
    Claim("mmm.fig3.baseline_overhead", _M, "Fig. 3", "Baseline adds only a few KB of metadata per set",
          ("mmm.fig3.baseline_overhead_kb",),
          "our set record is JSON: the architecture record, the layout of every tensor and a manifest of hashes; "
          "MMlib's is a different document", _ms(_baseline_overhead), 1.0, run=RUN_MMM),
    Claim("mmm.fig3.mmlib_overhead", _M, "Fig. 3", "MMlib-base stores ~8 KB of records with every model",
          ("mmm.fig3.mmlib_overhead_kb_per_model",),
          "our MMlib-base records follow MMlib's (code, layer names, environment with this machine's installed "
          "packages), so their size depends on the environment", _ms(_mmlib_overhead), 0.25, run=RUN_MMM),
    Claim("mmm.fig3.baseline_saving", _M, "Fig. 3", "Baseline stores 29% less than MMlib-base",
          ("mmm.fig3.baseline_saving_server",), "follows from the two overheads above (our environment record differs)",
          _ms(_saving("baseline", "mmlib-base", "U1")), 5.0, absolute=True, run=RUN_MMM),
    Claim("mmm.fig3.baseline_saving_m1", _M, "Fig. 3", "on the M1 machine the saving is 33%",
          ("mmm.fig3.baseline_saving_m1",), "", not_here="one machine here, no Apple M1; the paper's difference "
          "comes from the M1's environment record"),
    Claim("mmm.fig3.provenance_vs_baseline", _M, "Fig. 3", "a U3 version stored by Provenance is 99.84% smaller than "
          "Baseline's", ("mmm.fig3.provenance_vs_baseline",),
          PER_MODEL + "our record also keeps a dataset hash per updated model, so recovery can check its data",
          _ms(_saving("provenance", "baseline", "U3")), 0.15, absolute=True, run=RUN_MMM),
    Claim("mmm.fig3.provenance_vs_mmlib", _M, "Fig. 3", "... and 99.89% smaller than MMlib-base's",
          ("mmm.fig3.provenance_vs_mmlib",), PER_MODEL.rstrip("; "),
          _ms(_saving("provenance", "mmlib-base", "U3")), 0.15, absolute=True, run=RUN_MMM),
    Claim("mmm.fig3.update_vs_baseline", _M, "Fig. 3", "a U3 version stored by Update is 86% smaller than Baseline's",
          ("mmm.fig3.update_vs_baseline",),
          "our Update keeps digests only of the tensors that changed (the paper's hashes every layer of every model: "
          "its ~14 MB), so ours is smaller", _ms(_saving("update", "baseline", "U3")), 3.0, absolute=True,
          run=RUN_MMM),
    Claim("mmm.fig3.update_vs_mmlib", _M, "Fig. 3", "... and 90% smaller than MMlib-base's",
          ("mmm.fig3.update_vs_mmlib",), "as above", _ms(_saving("update", "mmlib-base", "U3")), 3.0, absolute=True,
          run=RUN_MMM),
    Claim("mmm.fig3.update_u3_mb", _M, "Fig. 3", "Update's U3 versions take ~14 MB (changed parameters and hashes)",
          ("mmm.fig3.update_u3_mb",), "the paper does not say whether per version; ours: digests of changed "
          "tensors only", _ms(_update_u3_mb), 0.25, run=RUN_MMM),
    Claim("mmm.sec42.update_rates", _M, "Sec. 4.2", "at 20% and 30% update rates only Update's storage grows; "
          "Provenance adds 500 / 1,000 references", ("mmm.sec42.references_20", "mmm.sec42.references_30"),
          "a trend: our bytes per model at each rate", _rates,
          run="python -m mm_jupyter.bench modelsets --update-rate 0.2 (and 0.3)"),
    Claim("mmm.sec42.ffnn69_mmlib", _M, "Sec. 4.2", "FFNN-69 needs 1.7x MMlib-base's storage of FFNN-48",
          ("mmm.sec42.ffnn69_mmlib_growth",), "MMlib-base's per-model records do not grow with the parameters",
          _growth("mmlib-base"), 0.06, run="python -m mm_jupyter.bench modelsets --arch ffnn69"),
    Claim("mmm.sec42.ffnn69_baseline", _M, "Sec. 4.2", "... and about 2.0x Baseline's",
          ("mmm.sec42.ffnn69_baseline_growth",), "the parameter ratio is 10,075 / 4,993 = 2.02",
          _growth("baseline"), 0.03, run="python -m mm_jupyter.bench modelsets --arch ffnn69"),
    Claim("mmm.sec42.cifar", _M, "Sec. 4.2", "the CIFAR model's storage follows its parameter count",
          ("mmm.setup.cifar_params",), "our CNN has 6,918 parameters (the paper's 6,882) plus BatchNorm buffers; "
          "compared as a trend", _cnn_scaling, run="python -m mm_jupyter.bench modelsets --arch cnn"),
    Claim("mmm.fig4.order", _M, "Fig. 4", "MMlib-base saves slowest, Baseline fastest (Update pays for hashing)",
          (), WARM + "ordering only", _ms(_tts_order), run=RUN_MMM),
    Claim("mmm.fig4.baseline_tts", _M, "Fig. 4", "Baseline saves over 10x faster than MMlib-base",
          ("mmm.abstract.baseline_speedup",), WARM + "fixed costs per set weigh more at fewer models",
          _ms(_speedup_vs_mmlib("mmlib_tts_speedup")), 0.0, run=RUN_MMM),
    Claim("mmm.fig5.baseline_ttr", _M, "Fig. 5", "Baseline recovers over 10x faster than MMlib-base",
          ("mmm.abstract.baseline_speedup",), WARM.rstrip("; "), _ms(_speedup_vs_mmlib("mmlib_ttr_speedup")), 0.0,
          run=RUN_MMM),
    Claim("mmm.fig5.baseline_flat", _M, "Fig. 5", "Baseline's TTR is the same for every version", (),
          "a trend", _ms(_baseline_flat), run=RUN_MMM),
    Claim("mmm.fig5.staircase", _M, "Fig. 5", "Provenance's TTR climbs a step per U3 version (6 h, 12 h, 18 h "
          "with real training): the third is 3x the first", ("mmm.fig5.real_ttr_u3_3", "mmm.fig5.real_ttr_u3_1"),
          "ours retrains every updated model (10%) on small synthetic cell data, seconds not hours; the ratio of "
          "the steps is compared", _ms(_staircase), 0.25, run=RUN_MMM,
          convert=lambda h: h / papers.number("mmm.fig5.real_ttr_u3_1").centre),
    Claim("mmm.fig5.real_hours", _M, "Fig. 5", "recovering by real training takes ~6 h per U3 step",
          ("mmm.fig5.real_ttr_u3_1",), "", not_here="needs the paper's 342 M-sample battery simulation and its "
          "training pipeline (90,000 samples, 10 epochs per model); ours retrains on synthetic cell data"),
    Claim("mmm.sec45.four_bytes", _M, "Sec. 4.5", "Update stores every parameter in 4 bytes, uncompressed",
          ("mmm.sec45.update_bytes_per_parameter",), "float32 as in the paper", _ms(_bytes_per_param), 0.0,
          run=RUN_MMM),
    Claim("mmm.setup.m1", _M, "Sec. 4.1", "the trends hold on a second, smaller machine (M1)",
          ("mmm.setup.m1_cpu_cores",), "", not_here="one machine here"),
    # ---- Alsatian ----
    Claim("alsatian.fig4.halving", _A, "Fig. 4", "eight candidates, three doubling training partitions: 4, 2, 1 "
          "remain", ("alsatian.fig4.train_partitions",), "our schedule on the same example", _halving_example),
    Claim("alsatian.fig7.tree", _A, "Figs. 7-8", "a model sharing a 4-block prefix adds only its 2 last blocks; "
          "pruning removes edges no model uses", ("alsatian.fig7.shared_prefix",), "our task tree on the same example",
          _tree_example),
    Claim("alsatian.fig9.example", _A, "Fig. 9", "DFS+ visits the example's nodes 0, 1, 3, 7, 6, 2, 5, 4 with a "
          "cache of at most 15", ("alsatian.fig9.peak",), "",
          not_here="the example tree's node sizes are only in the figure's image, not in the text"),
    Claim("alsatian.sec54.once", _A, "Sec. 5.4", "with enough cache DFS+ runs every block exactly once", (),
          "counted in every unlimited alsatian run of the results", _dfs_once,
          run="python -m mm_jupyter.bench search"),
]
for _arch, _stem in (("ResNet-18", "resnet18"), ("ResNet-152", "resnet152"), ("ViT-L/32", "vit_l_32"),
                     ("BERT-base", "bert")):
    CLAIMS += [
        Claim(f"alsatian.table1.{_stem}.params", _A, "Table 1", f"{_arch}: parameters",
              (f"alsatian.table1.{_stem}_params",), "counted at full width (meta device); BERT without our 2-class "
              "head" if _stem == "bert" else "counted at full width (meta device)",
              _alsa("table1", _table1_value(_arch, "full_paper_params")), 0.0, run=RUN_FIG.format("table1")),
        Claim(f"alsatian.table1.{_stem}.mb", _A, "Table 1", f"{_arch}: size", (f"alsatian.table1.{_stem}_mb",),
              "our size is every tensor of the state dict (buffers too), in decimal MB; the paper's file format "
              "may add a little", _alsa("table1", _table1_value(_arch, "full_bytes", 1e-6)), 0.005,
              run=RUN_FIG.format("table1")),
    ]
CLAIMS += [
    Claim("alsatian.table1.efficientnetv2l", _A, "Table 1", "EfficientNetV2-L: parameters and size",
          ("alsatian.table1.efficientnetv2l_params", "alsatian.table1.efficientnetv2l_mb"), "",
          not_here="no EfficientNetV2 builder is available offline here (torchvision and timm do not install with "
          "this CPU torch; transformers has EfficientNet B0-B7 only): our row is EfficientNet-B0"),
    Claim("alsatian.sec43.features", _A, "Sec. 4.3", "one extracted feature is under 10 KB",
          ("alsatian.sec43.feature_kb",), "the feature extractors' last outputs at full width",
          _alsa("table1", _feature_kb), 0.0, run=RUN_FIG.format("table1")),
    Claim("alsatian.fig12.vit", _A, "Fig. 12", "ViT-L-32: parameters and time are the same for every block", (),
          "at the cpu scale ViT-L/32 runs at a quarter of its width", _alsa("table1", _per_block(
              "ViT-L/32", _vit_flat, "per-block ms median {ms_mid:.3f}; parameters per layer {p_mid:,.0f}")),
          run=RUN_FIG.format("table1")),
    Claim("alsatian.fig12.resnet152", _A, "Fig. 12", "ResNet-152: the first blocks cost most time, the last ones "
          "hold most parameters", (), "a trend", _alsa("table1", _per_block(
              "ResNet-152", _resnet_shape, "first block {ms_first:.3f} ms/item vs median {ms_mid:.3f}; parameters: "
              "first {p_first:,}, median {p_mid:,.0f}, largest {p_max:,}")), run=RUN_FIG.format("table1")),
    Claim("alsatian.fig5.resnet152", _A, "Fig. 5", "with 96 items preparing ResNet-152 takes ~60% of scoring it",
          ("alsatian.fig5.resnet152_prepare_model",),
          "on a CPU inference is ~100x slower than on the paper's GPU and our store is a warm page cache, not a "
          "200 MB/s HDD: the share drops; the trend (more data, smaller share) is compared",
          _alsa("fig5", _fig5_share("ResNet-152", False)), 0.25, run=RUN_FIG.format("fig5")),
    Claim("alsatian.fig5.vit", _A, "Fig. 5", "... and ~80% for ViT-L-32", ("alsatian.fig5.vit_prepare_model",),
          "as above; ViT-L/32 at a quarter of its width at the cpu scale",
          _alsa("fig5", _fig5_share("ViT-L/32", False)), 0.25, run=RUN_FIG.format("fig5")),
    Claim("alsatian.fig5.cached_resnet18", _A, "Fig. 5", "with the last 3 blocks on a cached input, preparing "
          "ResNet-18 takes ~40%", ("alsatian.fig5.cached_resnet18_prepare_model",), "CPU vs GPU, warm store",
          _alsa("fig5", _fig5_share("ResNet-18", True)), 0.25, run=RUN_FIG.format("fig5")),
    Claim("alsatian.fig5.cached_vit", _A, "Fig. 5", "... and ~90% for ViT-L-32",
          ("alsatian.fig5.cached_vit_prepare_model",), "CPU vs GPU, warm store, a quarter-width ViT at the cpu scale",
          _alsa("fig5", _fig5_share("ViT-L/32", True)), 0.25, run=RUN_FIG.format("fig5")),
    Claim("alsatian.fig5.large_data", _A, "Fig. 5", "with much data inference dominates for the large models", (),
          "a trend", _alsa("fig5", _fig5_inference_dominates), run=RUN_FIG.format("fig5")),
    Claim("alsatian.fig5.small_model", _A, "Fig. 5", "for small models (ResNet-18) preparing the data dominates", (),
          "our data preparation reads uint8 arrays and resizes them, no JPEG decoding; on a CPU ResNet-18's "
          "inference outweighs it", _alsa("fig5", _fig5_resnet18_data), run=RUN_FIG.format("fig5")),
    Claim("alsatian.sec41.transfer", _A, "Sec. 4.1", "moving a cached batch to the GPU is ~10x faster than running "
          "a ViT-L-32 block on it (0.3 ms vs 3 ms)", ("alsatian.sec41.vit_block_ms", "alsatian.sec41.transfer_ms"),
          "measured by "
          "scripts/gpu_check.sh on the GPU it was lent", _gpu_transfer, 0.5,
          run="scripts/gpu_check.sh (needs a CUDA GPU)", convert=lambda ms: ms / 0.3),
    Claim("alsatian.fig10.top50_base", _A, "Fig. 10", "Top 50%, 2,000 items: alsatian 3-4x faster than Base",
          ("alsatian.fig10.top50_2000",), "halving alone already saves most of Base's inference on a CPU",
          _speedup_claim("top-50", "base", 2000), 0.15, run=RUN_SEARCH + " --distribution top-50"),
    Claim("alsatian.fig10.top50_shift", _A, "Fig. 10", "... and 3-4x faster than SHiFT",
          ("alsatian.fig10.top50_2000",), "with half of every model its own, little block work is shared: the "
          "measured inference ratio is near 1 (the sharing bound is set by the stem all candidates share); on the "
          "paper's GPU, SHiFT's time is mostly loading whole models every rung, which alsatian skips",
          _speedup_claim("top-50", "shift", 2000), 0.15, run=RUN_SEARCH + " --distribution top-50"),
    Claim("alsatian.fig10.toplayers_shift", _A, "Fig. 10", "Top Layers, 2,000 items: over 10x faster than SHiFT",
          ("alsatian.fig10.toplayers_2000",),
          "on a CPU inference is ~90% of the time, and alsatian saves inference only where blocks are shared: the "
          "retrained last blocks are the costliest per item at low resolution, so the measured inference ratio "
          "stays far below the sharing bound (the largest per-depth ratio of items); on the paper's GPU shift's "
          "time is mostly loading whole models, which alsatian skips", _speedup_claim("top-layers", "shift", 2000),
          0.1, run=RUN_SEARCH),
    Claim("alsatian.fig10.toplayers_base", _A, "Fig. 10", "Top Layers, 2,000 items: up to 11.5x faster than Base",
          ("alsatian.fig10.vs_base_toplayers_2000",), "as above", _speedup_claim("top-layers", "base", 2000), 0.15,
          run=RUN_SEARCH),
    Claim("alsatian.fig10.max_base", _A, "Fig. 10", "the largest speed-up over Base is 13.6x",
          ("alsatian.fig10.max_vs_base",), "our largest configuration is far smaller (candidates, items, pixels) and "
          "runs on a CPU", _max_speedup("base", ("fig10",)), 0.15, run=RUN_FIG.format("fig10")),
    Claim("alsatian.fig10.max_shift", _A, "Fig. 10", "the largest speed-up over SHiFT is 10.7x",
          ("alsatian.fig10.max_vs_shift",), "as above", _max_speedup("shift", ("fig10",)), 0.15,
          run=RUN_FIG.format("fig10")),
    Claim("alsatian.fig10.shift_2000", _A, "Fig. 10", "with 2,000 items halving alone gains at most 0.3x over Base",
          ("alsatian.fig10.shift_vs_base_2000",), "on a CPU inference dominates, so halving's saved inference "
          "shows fully; the paper's GPU makes shift reload whole models each rung", _shift_vs_base(1000, False), 0.1,
          run=RUN_SEARCH, convert=lambda v: 1 + v),
    Claim("alsatian.fig10.shift_8000", _A, "Fig. 10", "with 8,000 items SHiFT is up to 2x faster than Base",
          ("alsatian.fig10.shift_vs_base_8000",), "ours searches fewer candidates (16, not 35) at 32 px on a CPU",
          _shift_vs_base(4000), 0.15,
          run=RUN_SEARCH.replace("2000", "8000")),
    Claim("alsatian.fig10.toplayers_8000", _A, "Fig. 10", "Top Layers, 8,000 items: over 13.6x faster than Base",
          ("alsatian.fig10.vs_base_toplayers_8000",), "ours searches fewer candidates (16, not 35) at 32 px on a "
          "CPU, where the unshared last blocks weigh more (see the sharing bound)",
          _speedup_claim("top-layers", "base", min_items=4000), 0.0, run=RUN_SEARCH.replace("2000", "8000")),
    Claim("alsatian.fig10.similarity", _A, "Fig. 10", "base and shift do not depend on similarity; alsatian gets "
          "faster with more overlap", (), "a trend", _baselines_flat("fig10"), run=RUN_FIG.format("fig10")),
    Claim("alsatian.fig11.proxy", _A, "Fig. 11", "proxy scoring costs alsatian as much as shift", (), "a trend",
          _proxy_constant, run="python -m mm_jupyter.bench search"),
    Claim("alsatian.fig13.real", _A, "Fig. 13", "on really fine-tuned models the results match the synthetic ones",
          ("alsatian.fig13.items",), "our trained zoos are small CNNs on scikit-learn's digits and small BERTs on a "
          "generated topic task, at the cpu scale", _fig13_like_fig10, run=RUN_FIG.format("fig13")),
    Claim("alsatian.fig14.per_architecture", _A, "Fig. 14", "per HF architecture alsatian is 1.7-4.8x faster than "
          "Base at 2,000 items", ("alsatian.fig14.vs_base_2000_low",), "", not_here=NO_HF),
    Claim("alsatian.sec63.overlap", _A, "Sec. 6.3", "87% of 420 DETR-50 fine-tunes share most blocks with their base",
          ("alsatian.sec63.detr_overlap",), "", not_here=NO_HF),
    Claim("alsatian.fig15.zoo", _A, "Fig. 15", "over ~500 HF models of many architectures alsatian is ~2.1x faster "
          "at 2,000 items", ("alsatian.fig15.speedup_2000",), "our zoo: 11 families built from configs (random "
          "weights), top-25 derivations, searched per modality, at the cpu scale",
          _alsa("fig15", _fig_speed("fig15")), 0.25, run=RUN_FIG.format("fig15")),
    Claim("alsatian.fig16.memory", _A, "Fig. 16", "alsatian stays fastest at every memory limit",
          ("alsatian.fig16.memory_5",), "we limit alsatian's cache budget (100/25/5% of its C_min), not the "
          "machine's memory (no cgroup limit here), so the OS page-cache effects of the paper are not measured",
          _alsa("fig16", _fig16_all_budgets), run=RUN_FIG.format("fig16")),
    Claim("alsatian.fig17.bert", _A, "Fig. 17", "35 BERTs, 2,000 items: alsatian over 13.8x faster than Base",
          ("alsatian.fig17.vs_base",), "BERT is reduced below the paper scale, with fewer candidates and texts",
          _alsa("fig17", _fig_speed("fig17")), 0.0, run=RUN_FIG.format("fig17")),
    Claim("alsatian.abstract.max", _A, "Abstract", "Alsatian is up to ~14x faster than the baselines",
          ("alsatian.abstract.speedup",), "our largest configurations are far smaller and on a CPU",
          _max_speedup("base"), 0.15, run=RUN_FIG.format("all")),
    Claim("alsatian.intro.best_baseline", _A, "Sec. 1", "up to 10.7x faster than the better baseline",
          ("alsatian.intro.best_baseline_speedup",), "as above", _best_baseline, 0.15, run=RUN_FIG.format("all")),
]


#: figures that show a scenario or a method, with no number to measure, and what implements them here
DIAGRAMS = {
    "mmm": {"Fig. 1": "the multi-model management scenario: sets of models of one architecture (`ModelSet`)"},
    "alsatian": {"Fig. 1": "an optimised search over four candidates (`mm.search(approach='alsatian')`)",
                 "Fig. 2": "a model as blocks and a head (`modelsearch.splitting.split_model`)",
                 "Fig. 3": "feature-based scoring: prepare data and model, inference, proxy (`SearchResult.timings`)",
                 "Fig. 6": "Alsatian's components: model store, data split, planner, engine, caching "
                           "(`modelsearch`: stored, halving, planner, engine, cache)"},
}


# --------------------------------------------------------------------------------------------
# The report


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def report(results: Results, *, source: str = "bench_results", now: datetime | None = None) -> str:
    """``docs/reproduction.md``: one row per claim of both papers, the results files used and the
    setup the papers describe."""
    rows = evaluate(results)
    when = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%d")
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    out = ["# Reproducing the papers", "",
           f"Generated by `python -m mm_jupyter.bench report` from the results files in `{source}/` on {when}; "
           "do not edit by hand. The papers' numbers are typed in once in `mm_jupyter/bench/paper_numbers.toml`; "
           "each claim's measurement and tolerance is in `mm_jupyter/bench/reproduction.py`.", "",
           "Status: **reproduced** (within the stated tolerance, as the paper qualifies its number: \"up to\" is "
           "the largest value seen, \"more than\" a lower bound), **reproduced in trend** (direction and ordering, "
           "not size), **not reproduced**, **not reproducible here** (and why), **not run** (the command that "
           "measures it).", "",
           " · ".join(f"{s}: {counts[s]}" for s in STATUSES), ""]
    for key, title in papers.PAPERS.items():
        info = papers.paper_info().get(key, {})
        out += [f"## {title}", "", f"Paper setup: {info.get('hardware', '-')}; {info.get('software', '-')}. "
                f"{info.get('figures', '')}.", "",
                "Diagrams without a number to measure: " + "; ".join(
                    f"{fig}: {what}" for fig, what in DIAGRAMS[key].items()) + ".", "",
                "| figure | claim | paper | ours | scale | ours / paper | status | why it differs |",
                "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r.claim.paper == key):
            status = r.status + (f" ({r.claim.tolerance_text()})" if r.status == REPRODUCED else "")
            out.append("| " + " | ".join(_md(c) for c in (
                r.claim.artefact, r.claim.claim, r.claim.paper_text(), "-" if r.ours is None else r.ours.text,
                "-" if r.ours is None else r.ours.scale, "-" if r.ratio is None else f"{r.ratio:.2g}", status,
                r.why)) + " |")
        out.append("")
    used = sorted({f for r in rows if r.ours for f in r.ours.files if f != "(this notebook)"})
    out += ["## Results files", ""]
    for path, doc in results.docs:
        if path in used:
            out.append(f"- `{path}`: {_describe(doc)}")
    if results.skipped:
        out += ["", "Skipped (not a results document): " + ", ".join(f"`{p}`" for p in results.skipped)]
    out.append("")
    return "\n".join(out)


def _describe(doc: dict[str, Any]) -> str:
    kind = doc.get("experiment")
    if kind == "alsatian":
        return f"Alsatian {doc['figure']} at the {doc['config'].get('scale')} scale ({doc.get('seconds', 0):.0f} s)"
    if kind == "modelsets":
        return f"modelsets, {_modelsets_scale(doc)}, update rate {doc['config']['update_rate']:g}"
    if kind == "search":
        return f"search, {_search_scale(doc)}"
    return str(kind)
