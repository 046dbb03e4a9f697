"""``python -m mm_jupyter.bench limits`` on a tiny set: every path and its limit measured, judged, printed."""
from __future__ import annotations

import json

from mm_jupyter.bench.limits import GOALS, format_limits, run_limits


def test_limits_measures_every_path_beside_its_limit(tmp_path):
    result = run_limits(models=40, rounds=1, threads=2, requests=120, plain_requests=40, proxy_models=4,
                        proxy_items=200, ray_serve=False, out=tmp_path)
    paths = [row["path"] for row in result.rows]
    assert paths == [g.path for g in GOALS if not g.path.startswith("HTTP")]
    for row in result.rows:
        assert row["status"] in ("PASS", "FAIL")
        assert row["path_stats"]["median"] > 0 and row["limit_stats"]["median"] > 0 and row["ratio"] > 0
        assert row["path_stats"]["min"] <= row["path_stats"]["median"] <= row["path_stats"]["max"]
    table = format_limits(result)
    assert table.count("|\n") == len(result.rows) + 2 and "Baseline save" in table
    assert "µs per request beyond the batched compute" in table and "one submit_many of the same requests" in table
    assert "judged on one submit() per request" in table and "CPU per request: submit" in table
    assert "CPU per answer" in table and "requests per batch" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result.rows)) and len(saved["load"]["before"]) == 3


def test_limits_can_measure_only_some_parts(tmp_path):
    import pytest

    result = run_limits(models=30, rounds=1, threads=2, requests=60, plain_requests=20, only=["serving", "list"],
                        out=None)
    assert [row["path"] for row in result.rows] == ["list(ms)", "serving: client threads predict",
                                                     "serving: burst submitted at once"]
    assert result.config["sections"] == ["list", "serving"]
    with pytest.raises(ValueError, match="choose from"):
        run_limits(models=30, only=["servng"], out=None)


def test_the_ray_serve_comparison_client_and_our_side(store):
    """The comparison's client against our endpoint in its own process: every answer checked, a
    curve point per concurrency. (Ray Serve's side needs the ``rayserve`` extra, see docs/benchmarks.md.)"""
    import numpy as np

    from mm_jupyter.bench.rayserve import _ours, load_curve
    from mm_jupyter.usecases.models import ffnn, seeded_models

    store.save_set(seeded_models(ffnn, 6, hidden=8), "cells")
    rng = np.random.default_rng(0)
    ids, xs = rng.integers(0, 6, 50).tolist(), rng.standard_normal((50, 5)).astype(np.float32)
    proc, host, port, token = _ours(store.root, "cells")
    try:
        point = load_curve(host, port, "/predict", {"Authorization": f"Bearer {token}"}, ids, xs, 2, 0.5)
        refused = load_curve(host, port, "/predict", {}, ids, xs, 1, 0.2)  # no token: every answer an error
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(60) == 0
    assert point["answered"] > 0 and point["errors"] == 0 and point["rps"] > 0 and point["p99_ms"] >= point["p50_ms"]
    assert refused["errors"] == refused["answered"] > 0
