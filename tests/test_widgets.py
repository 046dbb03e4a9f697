"""The notebook widgets: state checked without a browser (widget state, plotly trace data)."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

import mm_jupyter as mm
from mm_jupyter.jupyter.display import human_bytes
from mm_jupyter.jupyter.widgets import APPROACH_COLOURS, ComparisonChart, LineageGraph, SearchProgress
from mm_jupyter.jupyter.widgets.lineage import LIMIT_COLOUR, lanes
from mm_jupyter.store.lineage import Lineage, Version

LEADERBOARD_ROW = re.compile(r"<tr( style=\"color:#999\")?><td>\d+</td><td>([^<]*)</td><td>[^<]*</td>"
                             r"<td>(\d+)</td><td>([^<]*)</td></tr>")


def leaderboard(widget: SearchProgress) -> list[tuple[str, bool, int, str]]:
    """(model, greyed, rung, note) per rendered leaderboard row, top to bottom."""
    return [(m, bool(grey), int(r), note) for grey, m, r, note in LEADERBOARD_ROW.findall(widget.leaderboard.value)]


def test_widgets_do_not_import_torch():
    code = "import sys, mm_jupyter.jupyter.widgets; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- lineage --------------------------------------------------------------------------------------
def _models(seed: int, names: list[str]) -> dict:
    import torch

    from mm_jupyter.usecases.models import ffnn

    torch.manual_seed(seed)
    return {n: ffnn(hidden=8) for n in names}


def _retrained(models: dict, names: list[str]) -> dict:
    import copy

    import torch

    out = {n: copy.deepcopy(m) for n, m in models.items()}
    with torch.no_grad():
        for n in names:
            out[n][-1].weight.add_(1.0)
    return out


@pytest.fixture(scope="module")
def lineage_store(tmp_path_factory):
    """'lin': v1 baseline (5 models); v2 update: m1, m2 retrained, m5 added; v3 update from v1: m0 retrained."""
    store = mm.Store(tmp_path_factory.mktemp("lineage") / "store")
    v1 = _models(0, [f"m{i}" for i in range(5)])
    store.save_set(v1, "lin", approach="baseline")
    v2 = _retrained(v1, ["m1", "m2"]) | _models(1, ["m5"])
    store.save_set(v2, "lin", approach="update")
    store.save_set(_retrained(v1, ["m0"]), "lin", approach="update", base="lin@1")
    yield store
    store.close()


def _nodes(graph: LineageGraph) -> dict[int, tuple[str, str, float, float, str]]:
    """version -> (approach, colour, x, y, hover) from the figure's node traces."""
    out = {}
    for trace in graph.figure.data:
        for v, x, y, hover in zip(trace.customdata, trace.x, trace.y, trace.hovertext):
            out[int(v)] = (trace.name, trace.marker.color, x, y, hover)
    return out


def _arrows(graph: LineageGraph) -> set[tuple[float, float, float, float]]:
    return {(a.ax, a.ay, a.x, a.y) for a in graph.figure.layout.annotations if a.showarrow}


def test_lineage_graph_of_a_store(lineage_store):
    lineage = lineage_store.lineage("lin")
    graph = LineageGraph(lineage)
    nodes = _nodes(graph)
    assert sorted(nodes) == [1, 2, 3]
    assert [t.name for t in graph.figure.data] == ["baseline", "update"]  # one legend entry per approach
    assert nodes[1][:2] == ("baseline", APPROACH_COLOURS["baseline"])
    assert nodes[2][:2] == nodes[3][:2] == ("update", APPROACH_COLOURS["update"])
    # v3 branches from v1 while v2 already continues v1: it gets its own lane
    assert [nodes[v][2:4] for v in (1, 2, 3)] == [(1, 0), (2, 0), (3, 1)]
    assert _arrows(graph) == {(1, 0, 2, 0), (1, 0, 3, 1)}
    v2 = lineage.versions[1]
    hover = nodes[2][4]
    assert "models: 6" in hover and f"changed: {v2.changed}" in hover and v2.changed >= 2
    assert human_bytes(v2.bytes) in hover and "added 1: m5" in hover and "← v1" in hover
    assert "models: 5" in nodes[3][4] and "added" not in nodes[3][4]
    assert "3 version(s), 2 edge(s)" in graph.summary.value
    assert repr(graph) == repr(lineage)
    state = graph.get_state()
    assert state["children"] == [f"IPY_MODEL_{graph.summary.model_id}", f"IPY_MODEL_{graph.figure.model_id}"]


def _version(n: int, approach: str, base: int | None, **kw) -> Version:
    fields = dict(version=n, approach=approach, requested=approach, base=base, chain=0, models=4, added=(),
                  dropped=(), changed=None, datasets=(), bytes=1000 * n, tts_s=0.5, created="2024-01-01")
    return Version(**(fields | kw))


def test_lineage_graph_of_one_version():
    graph = LineageGraph(Lineage("solo", (_version(1, "mmlib-base", None),)))
    nodes = _nodes(graph)
    assert list(nodes) == [1] and nodes[1][1] == APPROACH_COLOURS["mmlib-base"]
    assert not _arrows(graph)
    assert repr(graph).startswith("Lineage of 'solo': 1 version(s)")


def test_lineage_graph_hover_datasets_requested_and_lanes():
    datasets = tuple((f"m{i}", f"load(part={i})", f"{i:02d}" * 32) for i in range(4))
    versions = (
        _version(1, "baseline", None),
        _version(2, "baseline", None),  # a second root between v1 and its child
        _version(3, "provenance", 1, requested="auto", datasets=datasets, changed=4,
                 added=(), dropped=("x0", "x1", "x2", "x3")),
        _version(4, "update", 3),
        _version(5, "update", 3),
    )
    graph = LineageGraph(Lineage("b", versions))
    assert lanes(versions) == {1: 0, 2: 0, 3: 1, 4: 1, 5: 2}
    nodes = _nodes(graph)
    assert nodes[3][1] == APPROACH_COLOURS["provenance"]
    hover = nodes[3][4]
    assert "provenance (asked: auto)" in hover
    assert "datasets 4:" in hover and "m0: load(part=0) (000000000000)" in hover and "m3:" not in hover
    assert "dropped 4: x0, x1, x2, …" in hover
    assert _arrows(graph) == {(1, 0, 3, 1), (3, 1, 4, 1), (3, 1, 5, 2)}


# -- comparison -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from mm_jupyter.bench.modelsets import run_modelsets

    out = tmp_path_factory.mktemp("bench")
    result = run_modelsets(models=40, steps=1, repeat=1, out=out, approaches=("baseline", "update"))
    return out, result


def _traces(chart: ComparisonChart) -> dict[tuple[str, str], object]:
    return {(t.name, t.meta): t for t in chart.figure.data}


def test_comparison_chart_from_benchmark_json(bench):
    out, result = bench
    chart = ComparisonChart.from_benchmark(out / "results.json")
    traces = _traces(chart)
    assert chart.approaches == ["baseline", "update", "limit"]
    assert set(traces) == {(a, m) for a in chart.approaches for m in ("bytes", "tts_s", "ttr_s")}
    by = {(r["approach"], r["step"]): r for r in result.rows}
    for approach in chart.approaches:
        for metric in ("bytes", "tts_s", "ttr_s"):
            t = traces[(approach, metric)]
            assert list(t.x) == ["ffnn48 U1", "ffnn48 U3-1"]
            assert list(t.y) == pytest.approx([by[(approach, s)][metric] for s in (0, 1)])
        colour = LIMIT_COLOUR if approach == "limit" else APPROACH_COLOURS[approach]
        assert traces[(approach, "bytes")].marker.color == colour
        assert list(traces[(approach, "bytes")].customdata) == [human_bytes(by[(approach, s)]["bytes"]) for s in (0, 1)]
    assert [t.showlegend for t in chart.figure.data].count(True) == 3  # one legend entry per approach
    assert chart.figure.layout.yaxis.type == "log" and chart.figure.layout.yaxis3.type == "linear"
    # the update step stores far less than the full baseline version
    assert traces[("update", "bytes")].y[1] < traces[("baseline", "bytes")].y[1] / 5
    assert list(chart.frame.columns) == ["arch", "step", "approach", "bytes", "tts_s", "ttr_s", "label"]
    assert len(chart.frame) == 6


def test_comparison_chart_from_csv_and_folder_match_json(bench):
    out, _ = bench
    from_json = ComparisonChart.from_benchmark(out / "results.json").frame
    for path in (out / "results.csv", out):
        frame = ComparisonChart.from_benchmark(path).frame
        assert frame[["arch", "step", "approach", "bytes"]].equals(from_json[["arch", "step", "approach", "bytes"]])
        assert list(frame["ttr_s"]) == pytest.approx(list(from_json["ttr_s"]), rel=1e-5)


def test_comparison_chart_combines_use_cases_of_a_folder(bench, tmp_path):
    out, _ = bench
    doc = json.loads((out / "results.json").read_text())
    for arch in ("ffnn48", "cnn"):
        (tmp_path / arch).mkdir()
        rows = [r | {"arch": arch, "bytes": r["bytes"] * (2 if arch == "cnn" else 1)} for r in doc["rows"]]
        (tmp_path / arch / "results.json").write_text(json.dumps(doc | {"rows": rows}))
    (tmp_path / "search").mkdir()  # another experiment's results are skipped
    (tmp_path / "search" / "results.json").write_text(json.dumps({"experiment": "search", "rows": [{"a": 1}]}))
    chart = ComparisonChart.from_benchmark(tmp_path)
    assert chart.use_cases == ["cnn", "ffnn48"]
    bytes_trace = _traces(chart)[("baseline", "bytes")]
    assert list(bytes_trace.x) == ["cnn U1", "cnn U3-1", "ffnn48 U1", "ffnn48 U3-1"]
    chart.picker.value = "cnn"
    assert list(bytes_trace.x) == ["cnn U1", "cnn U3-1"]
    assert list(bytes_trace.y) == [2 * r["bytes"] for r in doc["rows"] if r["approach"] == "baseline"]
    assert chart.children[0] is chart.picker


def test_comparison_chart_repr_is_deterministic(bench):
    _, result = bench
    rows = [r | {"tts_s": r["tts_s"] * 3, "ttr_s": r["ttr_s"] + 1} for r in result.rows]
    text = repr(ComparisonChart(result.rows))
    assert text == repr(ComparisonChart(rows))
    by = {(r["approach"], r["step"]): r["bytes"] for r in result.rows}
    assert text.splitlines() == [
        "ComparisonChart: 1 use case(s) (ffnn48), approaches baseline, update, limit, 2 step(s)",
        *(f"  ffnn48 {label}: " + ", ".join(f"{a} {human_bytes(by[(a, s)])}" for a in ("baseline", "update", "limit"))
          for s, label in ((0, "U1"), (1, "U3-1"))),
    ]


def test_comparison_chart_from_store(lineage_store):
    chart = ComparisonChart.from_store(lineage_store)
    lineage = lineage_store.lineage("lin")
    frame = chart.frame
    assert list(frame["label"]) == ["lin U1", "lin U3-1", "lin U3-2"]
    assert list(frame["approach"]) == ["baseline", "update", "update"]
    assert list(frame["bytes"]) == [v.bytes for v in lineage.versions]
    assert list(frame["tts_s"]) == pytest.approx([v.tts_s for v in lineage.versions])
    assert all(t > 0 and math.isfinite(t) for t in frame["ttr_s"])
    skipped = ComparisonChart.from_store(lineage_store, names=["lin"], ttr=False)
    assert skipped.frame["ttr_s"].isna().all()
    assert repr(skipped) == repr(chart)


def test_comparison_chart_errors(bench, tmp_path):
    out, _ = bench
    with pytest.raises(mm.StoreError, match="no such benchmark results"):
        ComparisonChart.from_benchmark(tmp_path / "nope.json")
    with pytest.raises(mm.StoreError, match="no modelsets results.json"):
        ComparisonChart.from_benchmark(tmp_path)
    bad = tmp_path / "results.json"
    bad.write_text('{"experiment": "modelsets"}')
    with pytest.raises(mm.StoreError, match=r"results\.json: no 'rows'"):
        ComparisonChart.from_benchmark(bad)
    bad.write_text("{not json")
    with pytest.raises(mm.StoreError, match="not valid JSON"):
        ComparisonChart.from_benchmark(bad)
    bad.write_text('{"rows": []}')
    with pytest.raises(mm.StoreError, match="no rows"):
        ComparisonChart.from_benchmark(bad)
    csv = tmp_path / "results.csv"
    csv.write_text((out / "results.csv").read_text().replace("ttr_s", "ttr"))
    with pytest.raises(mm.StoreError, match=r"results\.csv: missing column\(s\) ttr_s"):
        ComparisonChart.from_benchmark(csv)
    txt = tmp_path / "results.txt"
    txt.write_text("x")
    with pytest.raises(mm.StoreError, match="expected a results.json"):
        ComparisonChart.from_benchmark(txt)
    with pytest.raises(mm.StoreError, match="no sets"):
        ComparisonChart.from_store(mm.Store(tmp_path / "empty"))


# -- search progress ------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _rung(widget: SearchProgress, rung: int, models: list[str], scores: dict[str, float], keep: int,
          rungs: int = 2) -> list[str]:
    widget({"event": "rung_start", "rung": rung, "models": models, "items": 64 * (rung + 1), "rungs": rungs})
    for m in models:
        widget({"event": "model_scored", "rung": rung, "model": m, "score": scores[m], "loss": 1 - scores[m]})
    ranked = sorted(models, key=lambda m: -scores[m])
    for m in ranked[keep:]:
        widget({"event": "model_pruned", "rung": rung, "model": m, "score": scores[m]})
    widget({"event": "rung_end", "rung": rung, "survivors": ranked[:keep]})
    return ranked[:keep]


def test_progress_throttles_a_burst_at_one_instant():
    clock = Clock()
    widget = SearchProgress(clock=clock)
    models = [f"c{i}" for i in range(999)]
    widget({"event": "rung_start", "rung": 0, "models": models, "items": 100, "rungs": 1})
    for m in models:
        widget({"event": "model_scored", "rung": 0, "model": m, "score": 0.5, "loss": 0.5})
    assert widget.renders <= 2
    assert len(widget.rungs[0].scored) == 999  # the state is current ...
    bar = widget.bars.children[0]
    assert bar.value == 0  # ... the drawing is not, until the next render
    clock.t = 0.05
    widget({"event": "cache", "bytes": 10})
    assert bar.value == 0
    widget({"event": "done", "timings": {}, "stats": {}})  # done always flushes
    assert bar.value == bar.max == 999 and widget.renders <= 3


def test_progress_renders_every_event_a_throttle_apart():
    clock = Clock()
    widget = SearchProgress(clock=clock)
    start = widget.renders
    events = 0
    models = [f"c{i}" for i in range(20)]
    widget({"event": "rung_start", "rung": 0, "models": models, "items": 100, "rungs": 1})
    for i, m in enumerate(models, start=1):
        clock.t = i * 0.1
        widget({"event": "model_scored", "rung": 0, "model": m, "score": i / 100, "loss": 0.0})
        events += 1
        assert widget.bars.children[0].value == i
    assert widget.renders - start == events + 1


def test_progress_bars_leaderboard_and_breakdown():
    clock = Clock()
    widget = SearchProgress(clock=clock, throttle=0.0)
    scores = {"a": 0.2, "b": 0.9, "c": 0.5, "d": 0.7}
    survivors = _rung(widget, 0, list(scores), scores, keep=2)
    assert "running rung 0 (1/2)" in widget.status.value
    widget({"event": "cache", "bytes": 3_000_000, "chunk": 2})
    later = {"b": 0.6, "d": 0.8}
    _rung(widget, 1, survivors, later, keep=1)
    widget({"event": "done", "timings": {"prepare data": 0.01, "inference": 0.5, "proxy": 0.25},
            "stats": {"block_inferences": 12, "unique_edges": 12, "cache_peak_bytes": 3_000_000}})
    bars = widget.bars.children
    assert [(b.value, b.max) for b in bars] == [(4, 4), (2, 2)]
    assert [b.description for b in bars] == ["rung 0: 64 items", "rung 1: 128 items"]
    assert leaderboard(widget) == [
        ("d", False, 1, "selected"),
        ("b", True, 1, "pruned in rung 1"),
        ("c", True, 0, "pruned in rung 0"),
        ("a", True, 0, "pruned in rung 0"),
    ]
    assert "3.0 MB" in widget.cache.value and "2 chunk(s)" in widget.cache.value
    assert widget.status.value.endswith("done")
    summary = widget.summary.value
    for key in ("prepare data", "inference", "proxy", "block_inferences", "cache_peak_bytes"):
        assert key in summary
    assert "0.500 s" in summary and "3.0 MB" in summary and "(0.760 s)" in summary
    assert repr(widget) == "\n".join([
        "SearchProgress: done, 2 rung(s), 4 models",
        "  rung 0: 4 models, 64 items, 4 scored -> 2 survivors",
        "  rung 1: 2 models, 128 items, 2 scored -> 1 survivors",
        "  best: 'd'",
    ])


def test_progress_ignores_unknown_and_malformed_events():
    widget = SearchProgress(clock=Clock(), throttle=0.0)
    _rung(widget, 0, ["a", "b"], {"a": 0.1, "b": 0.2}, keep=1, rungs=1)
    before = (repr(widget), widget.leaderboard.value, widget.renders)
    for event in (
        {"event": "future_event", "x": 1}, "not a dict", None, {"no": "event"}, {"event": ["rung_start"]},
        {"event": "model_scored"}, {"event": "model_scored", "rung": 0, "model": "a", "score": "high"},
        {"event": "model_scored", "rung": 7, "model": "a", "score": 0.3},
        {"event": "model_pruned", "rung": 0, "model": "ghost", "score": 0.1},
        {"event": "rung_start", "rung": 1, "models": None, "items": 5, "rungs": 2},
        {"event": "rung_end", "rung": 3, "survivors": []}, {"event": "cache", "bytes": None},
        {"event": "done", "timings": [1, 2], "stats": {}},
    ):
        widget(event)
    assert (repr(widget), widget.leaderboard.value, widget.renders) == before


def test_progress_interrupted_flushes_and_says_so():
    clock = Clock()
    widget = SearchProgress(clock=clock)
    widget({"event": "rung_start", "rung": 0, "models": ["a", "b", "c"], "items": 50, "rungs": 2})
    widget({"event": "model_scored", "rung": 0, "model": "a", "score": 0.3, "loss": 0.1})
    renders = widget.renders
    widget.interrupted()
    assert widget.renders == renders + 1
    assert widget.status.value.endswith("interrupted")
    bar = widget.bars.children[0]
    assert (bar.value, bar.max, bar.bar_style) == (1, 3, "danger")
    assert repr(widget).startswith("SearchProgress: interrupted, 1 rung(s), 3 models")


def test_progress_of_a_real_alsatian_search():
    import torch
    from search_models import mlp

    torch.manual_seed(0)
    first = mlp()[0]
    candidates = {}
    for i in range(6):
        torch.manual_seed(100 + i)
        model = mlp()
        model[0].load_state_dict(first.state_dict())  # every candidate shares its first block
        candidates[f"mlp{i}"] = model
    x = torch.randn(200, 16)
    y = torch.randint(0, 4, (200,))
    widget = SearchProgress()
    result = mm.search(candidates, (x, y), k=1, approach="alsatian", progress=widget)
    ranking = result.ranking
    assert [e.model for e in widget.ranking] == list(ranking["model"])
    rows = leaderboard(widget)
    assert [m for m, *_ in rows] == list(ranking["model"])
    for (model, greyed, rung, note), (_, r) in zip(rows, ranking.iterrows()):
        assert greyed == (not r["selected"]) and rung == r["rung"]
        assert note == ("selected" if r["selected"] else f"pruned in rung {r['rung']}")
    bars = widget.bars.children
    assert [b.max for b in bars] == [r.models for r in result.rungs]
    assert [b.value for b in bars] == [r.models for r in result.rungs]
    assert len(result.rungs) >= 2 and widget.state == "done"
    assert set(result.timings) <= set(re.findall(r"<td>([^<]+)</td><td>[\d.]+ s</td>", widget.summary.value))
    assert widget.cache_peak > 0
    assert repr(widget).endswith(f"best: {result.best!r}")
