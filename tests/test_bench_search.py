"""The search benchmark harness runs end to end at small scale (no timing assertions except the
sharing bound, which a measured speedup may not exceed beyond noise)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from mm_jupyter.bench.search import sharing_bound

#: a measured ratio may exceed the bound by this much before the test calls it a broken bound
NOISE = 1.15


@pytest.mark.bench
def test_quick_search_bench(tmp_path):
    from mm_jupyter.bench.search import QUICK, run_search_bench

    # the quick configuration, trimmed: top-50 is where a calibrated "bound" was once exceeded
    res = run_search_bench(arch="resnet18", models=6, distribution="top-50", items=QUICK["items"] // 2,
                           reduced=True, budget_fraction=0.25, repeat=2, out=tmp_path)
    by = {r["approach"]: r for r in res.rows}
    assert set(by) == {"base", "shift", "alsatian", "alsatian-budget"}
    limited = by["alsatian-budget"]
    assert limited["budget"] < by["alsatian"]["cache_peak_bytes"]
    assert limited["cache_peak_bytes"] <= limited["budget"] and limited["chunks"] > by["alsatian"]["chunks"]
    assert limited["ranking_matches_shift"] is True
    assert by["alsatian"]["ranking_matches_shift"] is True
    assert by["alsatian"]["block_inferences"] == by["alsatian"]["unique_edges"]
    assert by["alsatian"]["bytes_loaded"] < by["shift"]["bytes_loaded"]
    # interleaved repeats: a median with its min and max per approach; costs calibrated every round
    for r in res.rows:
        assert len(r["seconds_runs"]) == 2 and r["min_s"] <= r["seconds"] <= r["max_s"]
    assert res.config["repeat"] == 2
    assert len(res.block_costs) == len(by["base"]["items_per_depth"]) and min(res.block_costs) >= 0
    assert all(lo <= m <= hi for (lo, hi), m in zip(res.cost_range, res.block_costs))
    assert all(r["modelled_inference_s"] > 0 for r in res.rows)
    al = by["alsatian"]
    # the bound: counts only, and the measured speedup stays under it (up to noise)
    assert al["sharing_bound_vs_shift"] == sharing_bound(by["shift"]["items_per_depth"], al["items_per_depth"]) > 1
    assert al["inference_vs_shift"] <= NOISE * al["sharing_bound_vs_shift"], al
    assert al["sharing_estimate_vs_shift"] <= al["sharing_bound_vs_shift"]
    assert al["sharing_estimate_error"] == pytest.approx(al["inference_vs_shift"] / al["sharing_estimate_vs_shift"] - 1)
    saved = json.loads(open(res.files[0]).read())
    assert saved["cost_samples"] == 3  # one per round and one after the last
    assert {t["name"] for t in saved["targets"]} >= {"planning 500 candidates", "alsatian ranking == shift ranking",
                                                     "budget < C_min: ranking == shift ranking",
                                                     "alsatian inference vs shift <= sharing bound"}


def test_sharing_bound_is_never_exceeded_by_the_priced_work():
    """Whatever the per-depth costs, shift's priced work over alsatian's stays within the bound,
    and reaches it when one depth's cost dominates."""
    rng = np.random.default_rng(0)
    shift = [1920] * 10
    alsatian = [400] * 7 + [640, 1920, 1920]
    bound = sharing_bound(shift, alsatian)
    assert bound == pytest.approx(4.8)
    for _ in range(2000):
        c = rng.exponential(size=10) * rng.choice([1e-3, 1.0, 1e3], size=10)
        assert np.dot(shift, c) / np.dot(alsatian, c) <= bound * (1 + 1e-12)
    c = np.full(10, 1e-9)
    c[0] = 1.0
    assert np.dot(shift, c) / np.dot(alsatian, c) == pytest.approx(bound, rel=1e-6)
    assert sharing_bound([5, 5], [5, 0]) == float("inf") and sharing_bound([5, 0], [5, 0]) == 1.0


def test_cli_quick(tmp_path, capsys):
    from mm_jupyter.bench.__main__ import main

    assert main(["search", "--quick", "--arch", "mlp", "--repeat", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ranking matches shift: True" in out and "targets (this run):" in out
    assert "bound from the work (counts only)" in out and "error" in out and "min s" in out
