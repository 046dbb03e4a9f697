"""The lake benchmark runs end to end at a tiny size (ratios are printed, never asserted); its zoo
choice reaches the search; it counts the candidates a rung keeps across the two appended searches."""
from __future__ import annotations

from typing import Any

import pandas as pd
import pytest
from torch import nn

from mm_jupyter.errors import SearchError


@pytest.mark.bench
def test_quick_lake_bench(capsys: pytest.CaptureFixture[str]) -> None:
    from mm_jupyter.bench.__main__ import main

    assert main(["lake", "--quick"]) == 0  # non-zero: an incremental ranking differed from a fresh one
    out = capsys.readouterr().out
    for step in ("again", "appended", "derived", "layers"):
        assert f"{step} / " in out
    assert "rankings equal: True" in out and "rankings equal: False" not in out
    assert "lake: mlp, trained zoo," in out  # the default zoo, named in the summary
    assert "that were there in the first search too: " in out and "appended: prepare data" in out


class _Stop(Exception):
    """Raised by the spy in place of the first search."""


@pytest.mark.parametrize("zoo", ["trained", "random", None])
def test_zoo_choice_reaches_the_search(zoo: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench lake --zoo`` decides what the searches get: candidate 0 is the trained base (the default)
    or the random base of the same seed, byte for byte."""
    import mm_jupyter.modelsearch.api as api
    from mm_jupyter.bench.__main__ import main
    from mm_jupyter.bench.synthetic import base_model, trained_base

    seen: list[Any] = []

    def spy(candidates: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(candidates)
        raise _Stop

    monkeypatch.setattr(api, "search", spy)
    with pytest.raises(_Stop):
        main(["lake", "--quick"] + ([] if zoo is None else ["--zoo", zoo]))
    expected = base_model("mlp", seed=0) if zoo == "random" else trained_base("mlp", seed=0)

    def state(m: nn.Module) -> list[bytes]:
        return [t.numpy().tobytes() for t in m.state_dict().values()]

    assert state(seen[0][0]) == state(expected)


def test_unknown_zoo() -> None:
    from mm_jupyter.bench.lake import run_lake_bench

    with pytest.raises(SearchError, match="unknown zoo 'pretrained'"):
        run_lake_bench(arch="mlp", zoo="pretrained")


def test_survivors_kept() -> None:
    """From the rankings' ``rung`` column: per rung from the second, the candidates scored there in
    both searches, of those scored there in the later one."""
    from mm_jupyter.bench.lake import survivors_kept

    first = pd.DataFrame({"model": ["a", "b", "c", "d"], "rung": [2, 1, 1, 0]})
    then = pd.DataFrame({"model": ["d", "a", "b", "c"], "rung": [2, 1, 1, 0]})
    assert survivors_kept(first, then) == [(2, 3), (0, 1)]  # rung 1: a, b of a, b, d; rung 2: d is new
    assert survivors_kept(then, then) == [(3, 3), (1, 1)]
