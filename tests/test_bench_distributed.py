"""The distributed-search benchmarks run end to end at small scale: the partition simulation, and the
Ray benchmark's interleaved rounds and self-describing report."""
from __future__ import annotations

import json
import statistics

import pytest


def test_partition_sim_cli(tmp_path, capsys):
    from mm_jupyter.bench.__main__ import main

    assert main(["partition", "--models", "30", "--archs", "resnet18", "--workers", "2,16",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cost model:" in out and "targets (this run):" in out and "[FAIL]" not in out
    saved = json.loads((tmp_path / "partition-30.json").read_text())
    assert saved["tree"]["candidates"] == 30 and [r["workers"] for r in saved["rows"]] == [2, 16]
    for row in saved["rows"]:
        # subtrees recompute nothing and move fewer bytes than a queue that always transfers
        assert row["ours_dup"] == 0 and row["queue_dup"] > 0
        assert row["ours_bytes"] < row["queue_bytes"]
        assert row["ours_balance"] >= 1 and 1 <= row["ours_speedup"] <= row["workers"]


@pytest.mark.services
@pytest.mark.xdist_group("ray")
def test_ray_bench_rotates_rounds_and_describes_itself(tmp_path, capsys, ray_cluster):
    from mm_jupyter.bench.__main__ import main

    assert main(["search", "--executor", "ray", "--quick", "--arch", "mlp", "--models", "4", "--items", "160",
                 "--batch-size", "32", "--repeat", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "ray-mlp-top-layers-4-w2.json").read_text())
    runs = ["1 process, 1 thread", "1 process, 2 threads", "ray, 1 worker", "ray, 2 workers"]
    # interleaved rounds, the order rotating, each measurement with its load average and CPU share
    assert [r["run"] for r in saved["rounds"]] == runs + runs[1:] + runs[:1]
    assert all(r["load"] >= 0 and 0 < r["cpu_share"] for r in saved["rounds"])
    one = {r["round"]: r["seconds"] for r in saved["rounds"] if r["run"] == "ray, 1 worker"}
    two = {r["round"]: r["seconds"] for r in saved["rounds"] if r["run"] == "ray, 2 workers"}
    assert saved["ratios"] == [one[1] / two[1], one[2] / two[2]]
    speedup = saved["targets"][0]
    assert speedup["measured"] == statistics.median(saved["ratios"]) and speedup["threshold"] == 1.6
    assert all(r["same_ranking"] and r["same_scores"] for r in saved["rows"])
    assert f"[{speedup['status']}] ray 2 workers vs ray 1 worker: " in out
    assert "median of 2 interleaved round(s), min" in out and "load average (1 min) per measurement" in out
    assert "benchmark wall time" in out and "timed: the mm.search call" in out
