"""The search benchmark harness runs end to end at small scale (no timing assertions)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")


def test_quick_search_bench(tmp_path):
    from mm_jupyter.bench.search import run_search_bench

    res = run_search_bench(arch="resnet18", models=5, distribution="top-layers", items=200, reduced=True,
                           budget_fraction=0.25, out=tmp_path)
    by = {r["approach"]: r for r in res.rows}
    assert set(by) == {"base", "shift", "alsatian", "alsatian-budget"}
    limited = by["alsatian-budget"]
    assert limited["budget"] < by["alsatian"]["cache_peak_bytes"]
    assert limited["cache_peak_bytes"] <= limited["budget"] and limited["chunks"] > by["alsatian"]["chunks"]
    assert limited["ranking_matches_shift"] is True
    assert by["alsatian"]["ranking_matches_shift"] is True
    assert by["alsatian"]["block_inferences"] == by["alsatian"]["unique_edges"]
    assert by["alsatian"]["bytes_loaded"] < by["shift"]["bytes_loaded"]
    # the modelled work: one cost per block depth, and sharing allows a speedup over shift
    assert len(res.block_costs) == len(by["base"]["items_per_depth"]) and min(res.block_costs) >= 0
    assert all(r["modelled_inference_s"] > 0 for r in res.rows)
    assert by["alsatian"]["sharing_bound_vs_shift"] > 1
    saved = json.loads(open(res.files[0]).read())
    assert {t["name"] for t in saved["targets"]} >= {"planning 500 candidates", "alsatian ranking == shift ranking",
                                                     "budget < C_min: ranking == shift ranking"}


def test_cli_quick(tmp_path, capsys):
    from mm_jupyter.bench.__main__ import main

    assert main(["search", "--quick", "--arch", "mlp", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ranking matches shift: True" in out and "targets (this run):" in out
    assert "the work alone allows" in out
