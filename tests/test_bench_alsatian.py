"""The Alsatian evaluation's artefacts (mm_jupyter.bench.alsatian) at their quick scale: each runs,
its correctness claims hold (rankings equal the baselines'), Table 1 counts what the architectures
really have, and every artefact draws as a figure with the paper's values beside ours.

The quick artefacts are shared with notebook 06 in ``make test`` (MM_JUPYTER_BENCH_RESULTS): whichever runs
first runs them, the other reads the results of the same code (``bench/results.py``)."""
from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

pytest.importorskip("transformers")

from mm_jupyter.bench import alsatian as al, results
from mm_jupyter.bench.__main__ import main
from mm_jupyter.bench.bottleneck import PHASES

pytestmark = [pytest.mark.bench, pytest.mark.xdist_group("bench-alsatian")]  # one quick run of every artefact


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, al.Artefact]:
    """Every artefact once at the quick scale (shared by the tests of this module, and with notebook 06
    through the shared results folder when one is named)."""
    out = results.shared_folder() or tmp_path_factory.mktemp("alsatian")
    return {f: al.run_artefact(f, "quick", out=out, reuse=True) for f in al.FIGURES}


@pytest.mark.parametrize("name", ["ResNet-18", "ResNet-152", "EfficientNet-B0", "BERT-base"])
def test_table1_full_width_models_have_the_reference_parameter_counts(name: str) -> None:
    model, _ = al.table1_model(name, "cpu")
    assert sum(p.numel() for p in model.parameters()) == al.REFERENCE_PARAMS[name]
    if name == "ResNet-18":
        assert al.REFERENCE_PARAMS[name] == 11_689_512  # 11.69 M


def test_table1_rows_describe_the_blocks(quick: dict[str, al.Artefact]) -> None:
    art = quick["table1"]
    rows = {r["architecture"]: r for r in art.rows}
    assert list(rows) == list(al.TABLE1)
    assert art.ok and len(art.checks) == len(al.TABLE1)  # the full-width counts, at every scale
    for name, row in rows.items():
        assert row["full_params"] == al.REFERENCE_PARAMS[name] and row["full_bytes"] >= 4 * row["full_params"]
        assert len(row["per_block_params"]) == row["blocks"] and sum(row["per_block_params"]) <= row["params"]
    assert rows["BERT-base"]["full_paper_params"] == 109_482_240  # Table 1 counts BERT without a classifier
    r18 = rows["ResNet-18"]
    model, x = al.table1_model("ResNet-18", "quick")
    assert r18["params"] == sum(p.numel() for p in model.parameters())
    # stem, eight basic blocks, the pooling step
    assert r18["blocks"] == 10 == len(r18["per_block_ms"]) == len(r18["per_block_bytes"])
    # the stem halves 32 px twice (stride-2 conv, max pool): 16 channels at 8x8, float32
    assert r18["per_block_bytes"][0] == 16 * 8 * 8 * 4
    assert r18["inter_bytes_max"] == max(r18["per_block_bytes"])
    assert r18["model_ms"] == pytest.approx(sum(r18["per_block_ms"]))
    assert rows["ResNet-152"]["blocks"] == 52  # 3 + 8 + 36 + 3 bottlenecks, stem, pooling
    assert all(r["model_ms"] > 0 and r["model_bytes"] >= 4 * r["params"] for r in art.rows)


SEARCH_FIGURES = ("fig10", "fig13", "fig15", "fig17")


@pytest.mark.parametrize("figure", SEARCH_FIGURES)
def test_search_artefacts_rank_as_the_baselines(quick: dict[str, al.Artefact], figure: str) -> None:
    art = quick[figure]
    assert art.checks and art.ok, art.checks
    assert any("no halving" in k for k in art.checks)  # the exact comparison with base ran
    frame = pd.DataFrame(art.rows)
    assert set(frame["approach"]) == set(al.APPROACHES)
    keys = [c for c in frame.columns if c in ("arch", "distribution", "items", "set", "modality")]
    for _, group in frame.groupby(keys):
        by = group.set_index("approach")
        # sharing runs fewer blocks than running every surviving candidate whole (the quick zoo has one
        # model per family: nothing to share)
        ours, theirs = by.loc["alsatian", "block_inferences"], by.loc["shift", "block_inferences"]
        assert ours <= theirs if figure == "fig15" else ours < theirs
        assert by.loc["alsatian", "vs_shift"] == pytest.approx(by.loc["shift", "seconds"]
                                                               / by.loc["alsatian", "seconds"])


def test_fig15_zoo_spans_the_families(quick: dict[str, al.Artefact]) -> None:
    config = quick["fig15"].config
    assert len(config["families"]) >= 8 and config["candidates"] == len(config["families"])
    assert {r["modality"] for r in quick["fig15"].rows} == {"image", "text"}


def test_fig15_default_scale_has_100_candidates() -> None:
    per_family = al.ZOO["cpu"][0]
    assert per_family * len(al.zoo_bases("quick")) >= 100


def test_fig16_budgets_chunk_and_keep_the_ranking(quick: dict[str, al.Artefact]) -> None:
    art = quick["fig16"]
    assert art.ok and len(art.checks) == len(al.BUDGETS)
    rows = {r["approach"]: r for r in art.rows}
    c_min = art.config["c_min"]
    # a budget of C_min needs one chunk per rung, as the unlimited run
    assert rows["alsatian 100%"]["budget"] == c_min and rows["alsatian 100%"]["chunks"] == rows["shift"]["rungs"]
    assert rows["alsatian 5%"]["chunks"] > rows["alsatian 25%"]["chunks"] > 1
    assert rows["alsatian 5%"]["cache_peak_bytes"] <= rows["alsatian 25%"]["cache_peak_bytes"] <= c_min


def test_fig5_breaks_the_scoring_of_one_model_down(quick: dict[str, al.Artefact]) -> None:
    art = quick["fig5"]
    assert art.ok and art.checks  # the cached input gives the features of the whole model
    for r in art.rows:
        for suffix in ("", " (200 MB/s)"):
            assert sum(r[f"share_{p}{suffix}"] for p in PHASES) == pytest.approx(1.0)
        assert r["seconds"] == pytest.approx(sum(r[f"t_{p}"] for p in PHASES))
        # the paper's 200 MB/s store never makes preparing the model faster than we measured
        assert r["t_prepare model (200 MB/s)"] >= r["t_prepare model"]
        assert r["model_bytes_read"] > 0 and r["data_bytes_read"] > 0
    cached = [r for r in art.rows if r["cached_blocks"]]
    plain = [r for r in art.rows if not r["cached_blocks"]]
    assert [r["items"] for r in plain] == list(art.config["sizes"]) and len(cached) == 1
    # only the last three blocks are read and run
    assert cached[0]["blocks_run"] == 3 and cached[0]["model_bytes_read"] < plain[0]["model_bytes_read"]


def test_same_ranking_sees_order_and_score_changes() -> None:
    def res(models: list[str], scores: list[float]) -> SimpleNamespace:
        return SimpleNamespace(ranking=pd.DataFrame({"model": models, "score": scores}))

    a = res(["1", "0"], [0.9, 0.5])
    assert al.same_ranking(a, res(["1", "0"], [0.9, 0.5]))
    assert not al.same_ranking(a, res(["0", "1"], [0.9, 0.5]))
    assert not al.same_ranking(a, res(["1", "0"], [0.9, 0.51]))
    assert al.same_ranking(a, res(["1", "0"], [0.9, 0.500001]), tol=1e-5)


#: the artefacts whose figures carry values the paper states
WITH_PAPER = ("table1", "fig5", "fig10", "fig15", "fig17")


@pytest.mark.parametrize("figure", al.FIGURES)
def test_every_artefact_draws_a_figure(quick: dict[str, al.Artefact], figure: str) -> None:
    from mm_jupyter.bench.figures import alsatian_chart
    from mm_jupyter.jupyter.charts import chart_output

    chart = alsatian_chart(quick[figure])
    fig = chart.figure
    assert len(fig.data) >= len(chart.panels) >= 1
    assert chart_output(chart).png()[:8] == b"\x89PNG\r\n\x1a\n"
    assert repr(chart).splitlines()[0] == quick[figure].title
    assert "all correctness checks hold" in repr(chart)
    marked = [t for t in fig.data if t.name and t.name.startswith("paper")]
    if figure in WITH_PAPER:  # the paper's values are drawn, as markers named and labelled as the paper's
        assert marked and all(t.type == "scatter" and t.marker.symbol == "diamond" for t in marked)
        assert all(t.text for t in marked)
    else:
        assert not marked


def test_the_papers_values_in_a_figure_are_the_typed_ones(quick: dict[str, al.Artefact]) -> None:
    from mm_jupyter.bench import papers
    from mm_jupyter.bench.figures import alsatian_chart

    fig = alsatian_chart(quick["table1"]).figure
    params = next(t for t in fig.data if t.name == "paper")
    assert list(params.x)[0] == "ResNet-18" and params.y[0] == papers.number("alsatian.table1.resnet18_params").value
    assert "EfficientNetV2-L (paper only)" in list(params.x)  # not passed off as our EfficientNet-B0


def test_unknown_artefact_and_scale_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown artefact"):
        al.run_artefact("fig99", "quick")
    with pytest.raises(ValueError, match="unknown scale"):
        al.run_artefact("fig16", "huge")


def test_default_scale_follows_mm_jupyter_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MM_JUPYTER_FULL", raising=False)
    assert al.default_scale() == "cpu"
    monkeypatch.setenv("MM_JUPYTER_FULL", "1")
    assert al.default_scale() == "paper"
    assert al.normalise_scale("full") == "paper"  # the older name still works


def test_cli_prints_the_table_checks_and_writes_json(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["alsatian", "--figure", "fig16", "--scale", "quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Fig. 16" in out and "alsatian 5%" in out and "[ok] alsatian 25% ranking == shift" in out
    assert "median s" in out and "vs shift" in out and "the paper beside ours" in out
    assert "[reproduced in trend] Fig. 16" in out or "[not reproduced] Fig. 16" in out
    assert (tmp_path / "fig16-quick.json").exists()  # type: ignore[operator]


def test_cli_needs_an_artefact_named(capsys: pytest.CaptureFixture[str]) -> None:
    """`--figure all` at the cpu scale takes longer than a default may (10 minutes), so none is implied."""
    with pytest.raises(SystemExit) as exc:
        main(["alsatian"])
    assert exc.value.code == 2 and "--figure" in capsys.readouterr().err
