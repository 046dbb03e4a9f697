"""The notebook widgets: state checked without a browser (display bundles, plotly figure data, widget
state, the static pictures a saved notebook keeps). tests/test_browser.py checks them drawn in JupyterLab."""
from __future__ import annotations

import base64
import io
import json
import math
import re
import subprocess
import sys

import pytest

import mm_jupyter as mm
from mm_jupyter.jupyter.display import human_bytes
from mm_jupyter.jupyter.widgets import APPROACH_COLOURS, ComparisonChart, LineageGraph, SearchProgress
from mm_jupyter.jupyter.widgets._static import PLOTLY_MIME, WIDGET_MIME
from mm_jupyter.jupyter.widgets.comparison import tick_bytes, tick_time
from mm_jupyter.jupyter.widgets.lineage import LIMIT_COLOUR, lanes
from mm_jupyter.jupyter.widgets.progress import natural_key
from mm_jupyter.store.lineage import Lineage, Version

pytestmark = pytest.mark.xdist_group("widgets")  # its module-scoped fixture is built once

_TD = r"<td[^>]*>"
LEADERBOARD_ROW = re.compile(rf"<tr( style=\"color:#999\")?>{_TD}\d+</td>{_TD}([^<]*)</td>{_TD}[^<]*</td>"
                             rf"{_TD}(\d+)</td>{_TD}([^<]*)</td></tr>")


def leaderboard(widget: SearchProgress) -> list[tuple[str, bool, int, str]]:
    """(model, greyed, rung, note) per rendered leaderboard row, top to bottom."""
    return [(m, bool(grey), int(r), note) for grey, m, r, note in LEADERBOARD_ROW.findall(widget.leaderboard.value)]


def test_widgets_do_not_import_torch():
    code = "import sys, mm_jupyter.jupyter.widgets; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _png(bundle: dict) -> tuple[int, int]:
    """Size of the PNG inside the bundle's HTML fallback (it must decode)."""
    from PIL import Image

    found = re.fullmatch(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="[^"]*" style="max-width:100%">',
                         bundle["text/html"])
    assert found, bundle["text/html"][:200]
    return Image.open(io.BytesIO(base64.b64decode(found.group(1)))).size


def _figure_bundle(output) -> dict:
    """The display bundle of a figure output: plotly JSON, an HTML picture, text; no kernel state."""
    bundle = output._repr_mimebundle_()
    assert set(bundle) == {PLOTLY_MIME, "text/html", "text/plain"}
    assert bundle["text/plain"] == repr(output)
    json.dumps(bundle[PLOTLY_MIME], allow_nan=False)  # plain JSON, as a saved notebook holds it
    assert _png(bundle) == output.png_size
    return bundle


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
    assert "3 version(s), 2 edge(s)" in graph.summary
    assert [list(t.text) for t in graph.figure.data] == [[human_bytes(lineage.versions[0].bytes)],
                                                        [human_bytes(v.bytes) for v in lineage.versions[1:]]]
    assert repr(graph) == repr(lineage)
    bundle = _figure_bundle(graph)
    figure = bundle[PLOTLY_MIME]
    assert [t["name"] for t in figure["data"]] == ["baseline", "update"]
    assert figure["layout"]["title"]["text"].startswith("Lineage of lin: 3 version(s)")
    assert figure["layout"]["xaxis"]["ticktext"] == ["v1", "v2", "v3"]
    compact = LineageGraph(lineage, compact=True).figure
    assert compact.layout.title.text is None and compact.layout.legend.orientation == "h"
    assert compact.layout.xaxis.title.text is None  # the sidebar's narrow panel: no overlap with the legend


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


def _traces(chart: ComparisonChart) -> dict[tuple[str, str, str], dict]:
    """(approach, metric, use case) -> trace; the use case is the row of panels the trace sits in."""
    out = {}
    for t in chart.figure["data"]:
        n = int(t["yaxis"][1:] or 1)  # "y" is panel 1, "y5" panel 5, row-major
        out[(t["name"], t["meta"], chart.use_cases[(n - 1) // len(chart.metrics)])] = t
    return out


def _yaxis(chart: ComparisonChart, row: int, col: int) -> dict:
    n = row * len(chart.metrics) + col + 1
    return chart.figure["layout"]["yaxis" if n == 1 else f"yaxis{n}"]


@pytest.mark.slow
def test_comparison_chart_from_benchmark_json(bench):
    out, result = bench
    chart = ComparisonChart.from_benchmark(out / "results.json")
    traces = _traces(chart)
    assert chart.approaches == ["baseline", "update", "limit"]
    assert set(traces) == {(a, m, "ffnn48") for a in chart.approaches for m in ("bytes", "tts_s", "ttr_s")}
    by = {(r["approach"], r["step"]): r for r in result.rows}
    for approach in chart.approaches:
        for metric in ("bytes", "tts_s", "ttr_s"):
            t = traces[(approach, metric, "ffnn48")]
            assert t["x"] == ["U1", "U3-1"]  # a benchmark's steps keep the paper's names
            assert t["y"] == pytest.approx([by[(approach, s)][metric] for s in (0, 1)])
        colour = LIMIT_COLOUR if approach == "limit" else APPROACH_COLOURS[approach]
        assert traces[(approach, "bytes", "ffnn48")]["marker"]["color"] == colour
        assert traces[(approach, "bytes", "ffnn48")]["customdata"] == [human_bytes(by[(approach, s)]["bytes"])
                                                                      for s in (0, 1)]
    assert [t["showlegend"] for t in chart.figure["data"]].count(True) == 3  # one legend entry per approach
    # the update step stores far less than the full baseline version: storage spans > 10x, a log axis
    assert traces[("update", "bytes", "ffnn48")]["y"][1] < traces[("baseline", "bytes", "ffnn48")]["y"][1] / 10
    storage = _yaxis(chart, 0, 0)
    assert storage["type"] == "log" and storage["title"]["text"] == "bytes stored (log scale)"
    assert all(t.endswith("B") for t in storage["ticktext"])  # every tick carries its unit
    assert list(chart.frame.columns) == ["arch", "step", "approach", "bytes", "tts_s", "ttr_s", "label"]
    assert len(chart.frame) == 6
    assert _figure_bundle(chart)[PLOTLY_MIME]["data"][0]["type"] == "bar"


def test_comparison_chart_from_csv_and_folder_match_json(bench):
    out, _ = bench
    from_json = ComparisonChart.from_benchmark(out / "results.json").frame
    for path in (out / "results.csv", out):
        frame = ComparisonChart.from_benchmark(path).frame
        assert frame[["arch", "step", "approach", "bytes"]].equals(from_json[["arch", "step", "approach", "bytes"]])
        assert list(frame["ttr_s"]) == pytest.approx(list(from_json["ttr_s"]), rel=1e-5)


def test_comparison_chart_facets_one_row_per_use_case(bench, tmp_path):
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
    traces = _traces(chart)
    # one panel per (use case, metric): each bar trace holds only its use case's steps
    assert traces[("baseline", "bytes", "cnn")]["x"] == traces[("baseline", "bytes", "ffnn48")]["x"] == ["U1", "U3-1"]
    assert traces[("baseline", "bytes", "cnn")]["y"] == [2 * r["bytes"] for r in doc["rows"]
                                                         if r["approach"] == "baseline"]
    assert len(chart.figure["data"]) == 2 * 3 * 3
    layout = chart.figure["layout"]
    titles = [a["text"] for a in layout["annotations"]]
    assert titles == ["Storage", "Time to save", "Time to recover", "cnn", "ffnn48"]  # columns, then rows
    assert chart.png_size[1] > ComparisonChart.from_benchmark(out).png_size[1]  # taller, not thinner bars


def test_comparison_chart_log_axes_ticks_labels_and_toggle():
    rows = [{"arch": "u", "step": s, "label": f"v{s + 1}", "approach": a, "bytes": b, "tts_s": t, "ttr_s": r}
            for s, a, b, t, r in ((0, "baseline", 782, 0.004, 2.0), (1, "update", 1154, 0.5, 2.2),
                                  (2, "mmlib-base", 100_000, 3.0, 0.004))]
    chart = ComparisonChart(rows)
    storage, tts, ttr = (_yaxis(chart, 0, c) for c in range(3))
    # 782 B vs 100 kB spans > 10x: log, decades labelled with units; times in the unit of their title
    assert storage["type"] == "log" and storage["ticktext"] == ["100 B", "1 kB", "10 kB", "100 kB"]
    assert tts["type"] == ttr["type"] == "log"
    assert tts["ticktext"] == ["0.001", "0.01", "0.1", "1"] and tts["title"]["text"] == "seconds (log scale)"
    # from the decade below the lowest value to just above the tallest
    assert storage["range"] == pytest.approx([2, 5.15]) and tts["range"] == pytest.approx([-3, math.log10(3) + 0.15])
    (menu,) = chart.figure["layout"]["updatemenus"]
    log, linear = menu["buttons"]
    assert (log["label"], linear["label"]) == ("log axes", "linear axes")
    assert linear["args"][1]["yaxis.type"] == "linear" and linear["args"][1]["yaxis2.title"]["text"] == "seconds"
    assert log["args"][1]["yaxis.type"] == "log" and log["args"][1]["yaxis.ticktext"] == storage["ticktext"]
    assert linear["args"][1]["yaxis.ticktext"][:3] == ["0 B", "25 kB", "50 kB"]
    # small bars get their values as text on the linear axes only (a log axis shows them all)
    texts = dict(zip([(t["name"], t["meta"]) for t in chart.figure["data"]], linear["args"][0]["text"]))
    assert texts[("baseline", "bytes")] == ["782 B"] and texts[("mmlib-base", "bytes")] == [""]
    assert texts[("baseline", "tts_s")] == ["0.004 s"] and texts[("update", "tts_s")] == [""]
    assert all(text == [""] for text in log["args"][0]["text"])
    # a store's versions keep their own labels, not the paper's U1 / U3-1
    assert {t["name"]: t["x"] for t in chart.figure["data"][:3]} == {
        "baseline": ["v1"], "update": ["v2"], "mmlib-base": ["v3"]}


def test_comparison_chart_linear_when_the_range_is_small():
    rows = [{"arch": "u", "step": s, "approach": "baseline", "bytes": b, "tts_s": 0.2 + s, "ttr_s": 0.1}
            for s, b in ((0, 782), (1, 1154))]
    chart = ComparisonChart(rows)
    storage = _yaxis(chart, 0, 0)
    # 782 B vs 1,154 B: a linear axis from zero, so the bars compare by height
    assert storage["type"] == "linear" and storage["range"][0] == 0 and storage["title"]["text"] == "bytes stored"
    assert storage["ticktext"][0] == "0 B" and all(t.endswith("B") for t in storage["ticktext"])
    (menu,) = chart.figure["layout"]["updatemenus"]  # the toggle is there, on linear axes
    assert menu["active"] == 1 and [b["label"] for b in menu["buttons"]] == ["log axes", "linear axes"]
    log = menu["buttons"][0]["args"][1]
    assert {log[f"{a}.type"] for a in ("yaxis", "yaxis2", "yaxis3")} == {"log"}  # it switches every panel
    assert [t["text"] for t in chart.figure["data"]] == [["", ""]] * 3
    # times below a second read in milliseconds: ticks, title and hover in one unit
    ttr = _yaxis(chart, 0, 2)
    assert ttr["title"]["text"] == "milliseconds" and ttr["ticktext"][:3] == ["0", "25", "50"]
    assert chart.figure["data"][2]["customdata"] == ["100.00 ms", "100.00 ms"]
    tts = _yaxis(chart, 0, 1)
    assert tts["title"]["text"] == "seconds" and tts["ticktext"][:3] == ["0", "0.5", "1"]


def test_tick_labels():
    assert [tick_bytes(v) for v in (0, 782, 1000, 1154, 2.5e6, 1e9)] == ["0 B", "782 B", "1 kB", "1.15 kB",
                                                                         "2.5 MB", "1 GB"]
    assert [tick_time(v, "ms") for v in (0, 0.0004, 0.004, 0.05, 0.1, 0.25, 1)] == ["0", "0.4", "4", "50", "100",
                                                                                     "250", "1,000"]
    assert [tick_time(v, "s") for v in (1e-5, 0.004, 0.25, 20, 2e4)] == ["0.00001", "0.004", "0.25", "20", "20,000"]


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
    assert list(frame["label"]) == ["v1", "v2", "v3"]  # the user's versions
    assert list(frame["approach"]) == ["baseline", "update", "update"]
    assert list(frame["bytes"]) == [v.bytes for v in lineage.versions]
    assert list(frame["tts_s"]) == pytest.approx([v.tts_s for v in lineage.versions])
    assert all(t > 0 and math.isfinite(t) for t in frame["ttr_s"])
    assert repr(chart).splitlines()[1].startswith("  lin v1: baseline")
    skipped = ComparisonChart.from_store(lineage_store, names=["lin"], ttr=False)
    assert skipped.frame["ttr_s"].isna().all()
    assert [title for _, title, _ in skipped.metrics] == ["Storage", "Time to save"]  # no empty TTR panel
    assert repr(skipped) == repr(chart)
    _figure_bundle(skipped)


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
    assert {b.style.description_width for b in bars} == {"18ch"}  # one label width: the bars line up
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
        "  rung 1: 2 models, 128 items, 2 scored -> 1 survivor",
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
    for (_, greyed, rung, note), (_, r) in zip(rows, ranking.iterrows()):
        assert greyed == (not r["selected"]) and rung == r["rung"]
        assert note == ("selected" if r["selected"] else f"pruned in rung {r['rung']}")
    bars = widget.bars.children
    assert [b.max for b in bars] == [r.models for r in result.rungs]
    assert [b.value for b in bars] == [r.models for r in result.rungs]
    assert len(result.rungs) >= 2 and widget.state == "done"
    assert set(result.timings) <= set(re.findall(rf"{_TD}([^<]+)</td>{_TD}[\d.]+ s</td>", widget.summary.value))
    assert widget.cache_peak > 0
    assert repr(widget).endswith(f"best: {result.best!r}")


def test_progress_shows_reused_and_computed_features_per_rung(tmp_path):
    """A search with kept features reports per rung how many (candidate, chunk) features it read
    and computed; the bars, the text and the static picture show them."""
    import torch
    from search_models import mlp

    torch.manual_seed(0)
    candidates = {f"mlp{i}": mlp() for i in range(4)}
    x = torch.randn(240, 16)
    y = torch.randint(0, 4, (240,))
    store = mm.Store(tmp_path / "s")
    first = SearchProgress()
    mm.search(candidates, (x[:200], y[:200]), k=1, device="cpu", store=store, reuse=True, batch_size=16,
              progress=first)
    assert all(r.reused == 0 and r.computed > 0 for r in first.rungs.values())
    widget = SearchProgress()
    result = mm.search(candidates, (x, y), k=1, device="cpu", store=store, reuse=True, batch_size=16,
                       progress=widget)
    rungs = sorted(widget.rungs.values(), key=lambda r: r.index)
    assert sum(r.reused for r in rungs) == result.stats["features_reused"] > 0
    assert sum(r.computed for r in rungs) == result.stats["features_computed"] > 0
    shown = re.findall(rf"{_TD}rung (\d+)</td><td[^>]*>(\d+) reused</td><td[^>]*>(\d+) computed</td>",
                       widget.reuse.value)
    assert [tuple(map(int, row)) for row in shown] == [(r.index, r.reused, r.computed) for r in rungs]
    assert f"features {rungs[0].reused} reused / {rungs[0].computed} computed" in repr(widget)
    assert f"features {rungs[0].reused} reused, {rungs[0].computed} computed" in widget.static_bundle()["text/html"]
    plain = SearchProgress()
    mm.search(candidates, (x, y), k=1, device="cpu", progress=plain)
    assert "features" not in repr(plain) and all(r.reused is None for r in plain.rungs.values())
    assert plain.reuse.value == ""


def test_progress_shows_model_preparation_before_the_first_rung():
    widget = SearchProgress(clock=Clock(), throttle=0.0)
    assert widget.preparation.layout.display == "none"  # nothing to prepare yet
    widget({"event": "prepare", "done": 0, "total": 12, "blocks": 0})
    assert widget.status.value.endswith("preparing candidates: 0/12")
    widget({"event": "prepare", "done": 5, "total": 12, "blocks": 40})
    assert widget.status.value.endswith("preparing candidates: 5/12 (40 distinct blocks)")
    assert (widget.preparation.value, widget.preparation.max) == (5, 12)
    assert widget.preparation.layout.display is None  # visible while preparing
    widget({"event": "prepare", "done": 12, "total": 12, "blocks": 81})
    assert widget.preparation.bar_style == "success"
    widget({"event": "rung_start", "rung": 0, "models": ["a"], "items": 10, "rungs": 1})
    assert widget.preparation.layout.display == "none" and "running rung 0" in widget.status.value


def test_search_emits_preparation_events():
    import torch
    from search_models import mlp

    events = []
    torch.manual_seed(0)
    candidates = {f"m{i}": mlp() for i in range(3)}
    mm.search(candidates, (torch.randn(80, 16), torch.randint(0, 4, (80,))), progress=events.append)
    prepared = [(e["done"], e["total"]) for e in events if e["event"] == "prepare"]
    assert prepared == [(0, 3), (1, 3), (2, 3), (3, 3)]
    first_rung = next(i for i, e in enumerate(events) if e["event"] == "rung_start")
    assert all(e["event"] == "prepare" for e in events[:first_rung])
    assert events[first_rung - 1]["blocks"] > 0  # distinct blocks hashed for sharing


def test_leaderboard_sorts_names_by_their_numbers():
    widget = SearchProgress(clock=Clock(), throttle=0.0)
    models = [str(i) for i in (10, 2, 0, 11, 1)]
    widget({"event": "rung_start", "rung": 0, "models": models, "items": 10, "rungs": 1})
    assert [m for m, *_ in leaderboard(widget)] == ["0", "1", "2", "10", "11"]  # not 0, 1, 10, 11, 2
    for m, score in (("10", 0.5), ("2", 0.5), ("11", 0.9)):
        widget({"event": "model_scored", "rung": 0, "model": m, "score": score, "loss": 0.1})
    assert [m for m, *_ in leaderboard(widget)] == ["11", "2", "10", "0", "1"]  # score first, then numbers
    assert sorted(["c-10", "c-9", "b", "c-9a"], key=natural_key) == ["b", "c-9", "c-9a", "c-10"]


class Handle:
    """Stands in for IPython's DisplayHandle: records what the display was updated to."""

    def __init__(self) -> None:
        self.updates: list[dict] = []

    def update(self, obj) -> None:
        self.updates.append(obj._repr_mimebundle_())


def test_progress_bundle_carries_a_static_picture_refreshed_at_the_end(monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, **kw: shown.append(kw) or Handle())
    widget = SearchProgress(clock=Clock(), throttle=0.0)
    widget.display_live()
    assert shown == [{"display_id": True}]
    bundle = widget._repr_mimebundle_()
    assert bundle[WIDGET_MIME]["model_id"] == widget.model_id  # the live view ...
    assert "search</b>: waiting" in bundle["text/html"]  # ... and its static picture
    scores = {"cand-2": 0.4, "cand-10": 0.9, "cand-1": 0.1}
    _rung(widget, 0, list(scores), scores, keep=1, rungs=1)
    assert widget._handle.updates == []  # the saved picture is refreshed when the search ends ...
    widget({"event": "done", "timings": {"inference": 0.5}, "stats": {"block_inferences": 3}})
    (final,) = widget._handle.updates  # ... once
    assert final[WIDGET_MIME]["model_id"] == widget.model_id
    html = final["text/html"]
    assert "search</b>: done" in html and "rung 0: 3 models on 64 items, 3 scored &rarr; 1 survivor" in html
    assert html.index(">cand-10<") < html.index(">cand-2<") < html.index(">cand-1<") and "pruned in rung 0" in html
    assert "block_inferences" in html and "<script" not in html
    text = final["text/plain"].splitlines()
    assert text[0] == "SearchProgress: done, 1 rung(s), 3 models"
    assert [line.split()[1] for line in text[-3:]] == ["cand-10", "cand-2", "cand-1"]  # the leaderboard as text
    assert text[-3].split()[-1] == "selected" and text[-1].endswith("pruned in rung 0")


def test_interrupted_search_refreshes_its_static_picture():
    widget = SearchProgress(clock=Clock())
    widget._handle = Handle()
    widget({"event": "rung_start", "rung": 0, "models": ["a", "b"], "items": 50, "rungs": 2})
    widget.interrupted()
    (final,) = widget._handle.updates
    assert "search</b>: interrupted" in final["text/html"]


def test_every_figure_output_gets_a_log_toggle_that_switches_all_value_axes():
    """A chart with log/linear buttons for every value axis (a title's 'log scale' note follows the
    scale); the lineage graph (versions and lanes) has none, the comparison chart keeps its own."""
    from mm_jupyter.bench.figures import Panel, PaperChart, Series
    from mm_jupyter.jupyter.charts import chart_output
    from mm_jupyter.jupyter.widgets._static import add_log_toggle

    chart = chart_output(PaperChart("t", [Panel("latency", "answers/s", "p99 ms",
                                                [Series("a", [1.0, 10.0], [2.0, 40.0])],
                                                kind="line", log_y=True, log_x=True),
                             Panel("bars", "kind", "seconds", [Series("b", ["x", "y"], [1.0, 2.0])])]))
    figure = chart._repr_mimebundle_()[PLOTLY_MIME]
    (menu,) = figure["layout"]["updatemenus"]
    log, linear = (b["args"][0] for b in menu["buttons"])
    assert menu["active"] == 0  # it starts on log axes
    assert {k: v for k, v in linear.items() if k.endswith(".type")} == {
        "xaxis.type": "linear", "yaxis.type": "linear", "yaxis2.type": "linear"}  # the bar panel's x is categorical
    assert linear["yaxis.title.text"] == "p99 ms" and log["yaxis.title.text"] == "p99 ms, log scale"
    assert "yaxis2.title.text" not in linear  # a title without a scale note stays as it is
    store = Lineage("s", (_version(1, "baseline", None), _version(2, "update", 1)))
    assert "updatemenus" not in LineageGraph(store)._repr_mimebundle_()[PLOTLY_MIME]["layout"]
    own = {"data": [], "layout": {"yaxis": {"type": "log"}, "updatemenus": [{"buttons": []}]}}
    assert add_log_toggle(own) is own
