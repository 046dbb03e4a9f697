"""The modelsets and catalog benchmark harnesses: complete, sane rows and bit-exact recovery.

No timing assertions: timings on a shared machine are noise; only their presence is checked.
"""
from __future__ import annotations

import csv
import json
import math

import pytest

from mm_jupyter.bench import catalog as cat, modelsets as M, results
from mm_jupyter.bench.__main__ import main

pytestmark = [pytest.mark.bench, pytest.mark.xdist_group("bench-modelsets")]  # one quick run

QUICK_STEPS = 3


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``--quick`` run (500 models, repeat 1) with bit-exact checks, shared by the tests below and, in
    ``make test``, with notebook 03 (its FFNN-48 run has the same arguments; MM_JUPYTER_BENCH_RESULTS)."""
    shared = results.shared_folder()
    out = shared / "modelsets" / "ffnn48-500-u10" if shared else tmp_path_factory.mktemp("modelsets")
    result = M.run_modelsets(out=out, steps=QUICK_STEPS, check=True, reuse=True, **M.QUICK)
    return out, result


@pytest.mark.slow
def test_quick_run_has_every_approach_and_step(quick):
    _, result = quick
    got = {(r["step"], r["approach"]) for r in result.rows}
    want = {(s, a) for s in range(QUICK_STEPS + 1) for a in (*M.APPROACHES, M.LIMIT)}
    assert got == want
    assert len(result.rows) == len(want)
    for r in result.rows:
        assert r["models"] == M.QUICK["models"]
        assert r["bytes"] > 0 and r["parameter_bytes"] == M.QUICK["models"] * M.ARCHS["ffnn48"].params * 4
        for key in ("tts_s", "ttr_s"):
            assert isinstance(r[key], float) and r[key] > 0 and math.isfinite(r[key])
        assert len(r["ttr_runs_s"]) == 1 and r["ttr_min_s"] <= r["ttr_s"] <= r["ttr_max_s"]
        assert r["updated"] == (0 if r["step"] == 0 else 50)


@pytest.mark.slow
def test_quick_run_recovers_every_set_bit_exact(quick):
    _, result = quick
    for r in result.rows:
        if r["approach"] == M.LIMIT:
            assert r["tts_state_dicts_s"] > 0 and r["state_walk_s"] > 0  # the reference rows ran
            continue
        assert r["verified"] is True, (r["approach"], r["step"], r["problem"])


@pytest.mark.slow
def test_quick_run_stores_what_each_approach_promises(quick):
    _, result = quick
    by = {(r["step"], r["approach"]): r for r in result.rows}
    for s in range(QUICK_STEPS + 1):
        assert by[(s, "mmlib-base")]["stored_as"] == "mmlib-base"
        assert by[(s, "baseline")]["stored_as"] == "baseline"
        assert by[(s, "update")]["stored_as"] == "update"
        assert by[(s, "provenance")]["stored_as"] == ("baseline" if s == 0 else "provenance")
        assert by[(s, "baseline")]["ref"] == f"ffnn48@{s + 1}"
        base = by[(s, "baseline")]["bytes"]
        assert base >= by[(s, "baseline")]["parameter_bytes"]
        assert by[(s, "mmlib-base")]["storage_vs_baseline"] == pytest.approx(by[(s, "mmlib-base")]["bytes"] / base)
        # mmlib-base saves every model again in full each version, with ~8 KB of records per model
        mm_row = by[(s, "mmlib-base")]
        assert mm_row["bytes"] == pytest.approx(by[(0, "mmlib-base")]["bytes"], rel=0.01)
        assert 1.25 * base < mm_row["bytes"] < 1.6 * base
        if s > 0:
            assert by[(s, "update")]["bytes"] < base
            assert by[(s, "provenance")]["bytes"] < by[(s, "update")]["bytes"]
            assert by[(s, "update")]["chain"] == s and by[(s, "provenance")]["chain"] == s
            assert "retraining" in by[(s, "provenance")]["note"]
        for r in (by[(s, a)] for a in (*M.APPROACHES, M.LIMIT)):
            for key in ("tts_vs_limit", "mmlib_tts_speedup", "mmlib_ttr_speedup", "storage_vs_baseline"):
                assert r[key] is not None and r[key] > 0


@pytest.mark.slow
def test_quick_run_evaluates_every_target_and_writes_results(quick):
    out, result = quick
    assert len(result.targets) == 9
    for t in result.targets:
        assert t.measured is not None and t.status in ("PASS", "FAIL")
    assert result.targets[-1].name.startswith(f"Update TTR after {QUICK_STEPS} U3 steps")
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == len(result.rows)
    data = json.loads((out / "results.json").read_text())
    assert data["experiment"] == "modelsets" and len(data["rows"]) == len(result.rows)
    assert "warm" in data["environment"]["cache"]
    assert {t["status"] for t in data["targets"]} <= {"PASS", "FAIL"}
    # the stores and the limit files are gone unless --keep
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json"]


def test_choose_updates_is_seeded_and_split_in_halves():
    full, partial = M.choose_updates(1000, 0.1, step=1)
    assert (full, partial) == M.choose_updates(1000, 0.1, step=1)
    assert (full, partial) != M.choose_updates(1000, 0.1, step=2)
    assert len(full) == len(partial) == 50 and not set(full) & set(partial)
    f3, p3 = M.choose_updates(10, 0.3, step=1)
    assert len(f3) == 2 and len(p3) == 1


def test_save_kwargs_per_approach():
    u1, u3 = M.Step(0, []), M.Step(1, [], provenance="P")  # type: ignore[arg-type]
    assert M.save_kwargs("provenance", u1) == {"approach": "baseline"}
    assert M.save_kwargs("provenance", u3) == {"approach": "provenance", "provenance": "P"}
    assert M.save_kwargs("update", u1) == M.save_kwargs("update", u3) == {"approach": "update"}
    with pytest.raises(ValueError):
        M.save_kwargs("zip", u1)


def test_targets_are_skipped_when_an_approach_was_not_run():
    rows = [
        {"step": s, "approach": a, "bytes": b, "parameter_bytes": 1000, "tts_s": 1.0, "ttr_s": 1.0}
        for s in (0, 1) for a, b in (("baseline", 1100), ("limit", 1000))
    ]
    targets = M.evaluate_targets(rows)
    assert [t.status for t in targets] == ["PASS", "SKIP", "SKIP", "PASS", "SKIP", "SKIP", "SKIP", "SKIP", "SKIP"]
    assert targets[3].measured == 100.0


def test_targets_compare_mmlib_base_with_the_paper():
    """5,000 FFNN-48 at the paper's 140.3 MB and 29% saving pass; a deduplicating MMlib-base fails."""
    def rows(mmlib_bytes):
        return [{"step": s, "approach": a, "arch": "ffnn48", "models": 5000, "bytes": b, "parameter_bytes": 99_860_000,
                 "tts_s": 1.0, "ttr_s": 1.0} for s in (0, 1)
                for a, b in (("baseline", 99_862_000), ("mmlib-base", mmlib_bytes[s]), ("limit", 99_860_000))]

    by_name = {t.name: t for t in M.evaluate_targets(rows([140_300_000, 140_300_000]))}
    size = next(t for n, t in by_name.items() if n.startswith("MMlib-base storage"))
    saving = next(t for n, t in by_name.items() if n.startswith("Baseline saving"))
    assert size.status == saving.status == "PASS" and size.measured == pytest.approx(0.0, abs=1e-9)
    assert saving.measured == pytest.approx(abs(100 * (1 - 99_862_000 / 140_300_000) - 30))
    by_name = {t.name: t for t in M.evaluate_targets(rows([103_900_000, 13_800_000]))}  # the old numbers
    assert by_name[size.name].status == by_name[saving.name].status == "FAIL"


def test_cnn_workload_recovers_bit_exact_including_retraining(tmp_path):
    """The CNN use case: synthetic images, cross-entropy training, deterministic provenance replay."""
    result = M.run_modelsets(arch="cnn", models=6, steps=2, update_rate=0.5, approaches=("update", "provenance"),
                             out=tmp_path, repeat=1, check=True, write=False)
    assert {(r["step"], r["approach"]) for r in result.rows} == {
        (s, a) for s in range(3) for a in ("update", "provenance", "limit")}
    for r in result.rows:
        if r["approach"] != "limit":
            assert r["verified"] is True, (r["approach"], r["step"], r["problem"])
        # 6,918 float32 parameters + BatchNorm running mean/var (2 x 8 float32) + num_batches_tracked (int64)
        assert r["parameter_bytes"] == 6 * ((M.ARCHS["cnn"].params + 16) * 4 + 8)


def test_cli_modelsets_prints_table_and_targets(tmp_path, capsys):
    code = main(["modelsets", "--models", "12", "--steps", "1", "--approaches", "baseline,update",
                 "--repeat", "1", "--check", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert code == 0
    assert "storage/baseline" in text and "targets (this run):" in text
    assert "[SKIP] Baseline TTS >= 15x faster than mmlib-base" in text
    assert "[PASS] Update storage per U3 step" in text or "[FAIL] Update storage per U3 step" in text
    assert (tmp_path / "results.json").exists()


def test_cli_rejects_unknown_approach(tmp_path, capsys):
    assert main(["modelsets", "--approaches", "baseline,zip", "--out", str(tmp_path)]) == 2
    assert "unknown approach" in capsys.readouterr().err


def test_catalog_small_scale(tmp_path, capsys):
    mmlib, sizes = cat.plan_sets(100_000)
    assert mmlib == 5000 and sizes == [1000] * 95
    code = main(["catalog", "--models", "2000", "--repeat", "1", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert code == 0
    assert "store.sets():" in text and "2,000 models" in text
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["models"] == 2000 and data["sets"] == 3  # 1000 + 900 baseline, 100 mmlib-base
    assert set(data["recover"]) == {"baseline", "mmlib-base"}
    assert len(data["targets"]) == 2 and all(t["status"] in ("PASS", "FAIL") for t in data["targets"])
    assert not (tmp_path / "store").exists()


def test_default_size_is_the_cpu_scale_unless_mm_jupyter_full(monkeypatch):
    monkeypatch.delenv("MM_JUPYTER_FULL", raising=False)
    assert M.default_models() == 1000
    monkeypatch.setenv("MM_JUPYTER_FULL", "1")
    assert M.default_models() == 5000
    # --scale paper: the paper's 5,000 models and median of five runs; each configuration its own folder
    assert M.SCALES["paper"] == (5000, 5) and M.SCALES["cpu"] == (1000, 3)
    assert M.default_out("ffnn69", 1000, 0.2) == M.DEFAULT_OUT / "ffnn69-1000-u20"
