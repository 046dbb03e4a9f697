"""``python -m mm_jupyter.bench zoo`` (issue 20 item 5): its parsing, and a tiny run whose numbers
are real measurements (one architecture, one round) and whose saved sets are real sets."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mm_jupyter.bench.__main__ import build_parser, main, zoo_names
from mm_jupyter.bench.zoo import ZOO
from mm_jupyter.bench.zoosave import GOAL, QUICK, ZooResult, ZooRow, format_zoo
from mm_jupyter.errors import BenchError

pytest.importorskip("transformers")


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["zoo", *argv])


def test_parsing_defaults_full_names_and_bad_input() -> None:
    args = _args()
    assert args.rounds == 3 and not args.full and zoo_names(args) == list(QUICK)
    assert set(QUICK) <= set(ZOO) and {ZOO[n].domain for n in QUICK} == {"text", "vision", "audio"}
    assert zoo_names(_args("--full")) == list(ZOO)
    assert zoo_names(_args("bert", "llama", "--rounds", "5")) == ["bert", "llama"]
    assert _args("--rounds", "5").rounds == 5
    with pytest.raises(BenchError, match="unknown zoo architecture.*nosuchnet"):
        zoo_names(_args("bert", "nosuchnet"))
    with pytest.raises(BenchError, match="not both"):
        zoo_names(_args("bert", "--full"))
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit):
            _args("--rounds", bad)


def test_the_verdict_is_the_median_ratio_against_the_goal() -> None:
    rows = [ZooRow("a", "text", 10, [0.3, 0.2, 0.9], [0.1, 0.1, 0.2]),  # 0.3 / 0.1 = 3x
            ZooRow("b", "text", 10, [0.1], [0.1]),  # 1x
            ZooRow("c", "vision", 10, [0.12], [0.1])]  # 1.2x
    result = ZooResult(rows, 3, (1.0, 1.0, 1.0), (2.0, 2.0, 2.0))
    assert result.median_ratio == pytest.approx(1.2)
    assert result.passed
    text = format_zoo(result)
    assert "300.0 (200.0-900.0)" in text and "3.00x" in text
    assert f"median ratio over 3 architectures: 1.20x (goal <= {GOAL:g}x): PASS" in text
    assert "load average before: 1.00, 1.00, 1.00; after: 2.00, 2.00, 2.00" in text
    slow = ZooResult(rows[:1], 3, (0, 0, 0), (0, 0, 0))
    assert not slow.passed and "FAIL" in format_zoo(slow)
    broken = ZooResult([*rows, ZooRow("d", "audio", error="ArchitectureError: refused")], 3, (0, 0, 0), (0, 0, 0))
    assert broken.median_ratio == pytest.approx(1.2) and not broken.passed  # an architecture not saved never passes
    assert "not saved: d" in format_zoo(broken) and "error: ArchitectureError: refused" in format_zoo(broken)


@pytest.mark.bench
def test_a_tiny_run_measures_one_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """One architecture, one round: both sides measured, the stores really hold the set (a store
    that saved nothing would be fast), and everything is removed afterwards."""
    import mm_jupyter as mm
    from mm_jupyter.bench import zoosave

    saved: list[tuple[int, int]] = []
    real = mm.Store.save_set

    def counting(self: mm.Store, models: list, name: str, **kw: object) -> object:
        ref = real(self, models, name, **kw)
        ms = self.recover_set(ref)
        saved.append((len(ms), sum(int(v.sum() != 0) for v in ms.state_dict(2).values())))
        return ref

    monkeypatch.setattr(mm.Store, "save_set", counting)
    assert main(["zoo", "timm-enum-attribute", "--rounds", "1", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "zoo save speed: 1 architectures, 1 rounds" in out
    assert "median ratio over 1 architectures:" in out and "load average before:" in out
    assert ("PASS" in out) != ("FAIL" in out)
    assert len(saved) == 2 and all(n == 3 and nonzero > 0 for n, nonzero in saved)  # warm-up + 1 round
    assert list(tmp_path.iterdir()) == []
    row = zoosave.measure("timm-enum-attribute", 2, tmp_path)
    assert len(row.store_s) == len(row.torch_s) == 2 and all(t > 0 for t in row.store_s + row.torch_s)
    assert row.ratio is not None and row.state_bytes > 0 and not row.error


def test_the_hand_built_patterns_stay_behind_the_trust_gate(tmp_path: Path) -> None:
    """The timm patterns moved into the package keep a private module: a fresh process recovers
    their sets only after importing it, as the class's user has it (mm_jupyter is an allowed
    package, its private modules are not)."""
    from store_models import run_python

    import mm_jupyter as mm
    from mm_jupyter.bench import zoo

    store = mm.Store(tmp_path / "s")
    store.save_set([zoo.build("timm-enum-attribute", i) for i in range(2)], "t")
    store.close()
    code = ("import sys, mm_jupyter as mm\n"
            "if len(sys.argv) > 2: import mm_jupyter.bench._timm_patterns\n"
            "try:\n    mm.Store(sys.argv[1]).recover_set('t')[0]; print('recovered')\n"
            "except mm.MMError as e: print(type(e).__name__, e)")
    refused = run_python(code, str(tmp_path / "s")).stdout
    assert "RecoveryError" in refused and "not imported" in refused and "_timm_patterns" in refused
    assert run_python(code, str(tmp_path / "s"), "import").stdout.strip() == "recovered"
