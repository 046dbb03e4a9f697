"""The partition simulation of the distributed-search benchmark runs end to end at small scale."""
from __future__ import annotations

import json


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
