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
    assert "µs per request beyond the batched compute" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result.rows)) and len(saved["load"]["before"]) == 3
