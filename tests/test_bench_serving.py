"""The serving benchmark harness runs end to end at small scale (no timing assertions)."""
from __future__ import annotations

import json

import pytest


@pytest.mark.bench
def test_serving_bench_small(tmp_path):
    from mm_jupyter.bench.serving import MODES, run_serving_bench

    # a p99 bound no step can miss: a loaded machine must not decide whether a rate "counts" here
    res = run_serving_bench(models=40, spreads=("zipf",), step_s=0.1, probe_s=0.1, fractions=(0.3, 0.6),
                            min_requests=30, p99_ms=60_000.0, out=tmp_path)
    assert [(r["mode"], r["cache"]) for r in res.rows] == [(m, c) for m in MODES for c in (False, True)]
    assert all(r["capacity_rps"] > 0 for r in res.rows)
    assert {s["mode"] for s in res.steps} == set(MODES) and all(s["answered"] >= 30 for s in res.steps)
    cached = [s for s in res.steps if s["cache"]]
    assert all(s["hit_rate"] > 0 for s in cached) and not any(s["cached"] for s in res.steps if not s["cache"])
    (ratio,) = [r for r in res.ratios if r["cache"]]
    assert ratio["spread"] == "zipf" and ratio["multi_rps"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["experiment"] == "serving" and saved["targets"][0]["name"] == "multi-model / one-at-a-time throughput"


@pytest.mark.bench
def test_cli_quick(tmp_path, capsys):
    from mm_jupyter.bench.__main__ import main

    assert main(["serving", "--quick", "--models", "30", "--spreads", "uniform", "--step-s", "0.1",
                 "--modes", "one-at-a-time,multi-model batching", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "latency curves" in out and "throughput at p99 <= 50 ms" in out and "targets (this run):" in out
    assert "multi-model / one-at-a-time (uniform, cache off):" in out
    assert main(["serving", "--modes", "fast", "--out", str(tmp_path)]) == 2
