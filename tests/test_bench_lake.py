"""The lake benchmark runs end to end at a tiny size (ratios are printed, never asserted)."""
from __future__ import annotations

import pytest


@pytest.mark.bench
def test_quick_lake_bench(capsys: pytest.CaptureFixture[str]) -> None:
    from mm_jupyter.bench.__main__ import main

    assert main(["lake", "--quick"]) == 0  # non-zero: an incremental ranking differed from a fresh one
    out = capsys.readouterr().out
    for step in ("again", "appended", "derived", "layers"):
        assert f"{step} / " in out
    assert "rankings equal: True" in out and "rankings equal: False" not in out
