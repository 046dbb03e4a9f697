"""Results files shared by the command line, the tests, the notebooks and the report (bench/results.py): a run
is reused only when the same code ran it with the same arguments, and a damaged file is an error, never a miss."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mm_jupyter.bench import alsatian as al, modelsets as M, results
from mm_jupyter.errors import BenchError


def test_a_saved_run_is_found_only_with_the_same_code_and_arguments(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.json"
    results.save(path, {"experiment": "t", "rows": [1, 2]}, {"n": 3, "sizes": (1, 2)})
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # written atomically: no temporary file left
    assert path.stat().st_mode & 0o777 == 0o644  # readable by others, as any results file
    doc = results.load(path, {"n": 3, "sizes": (1, 2)})  # a tuple compares as the list JSON gives back
    assert doc is not None and doc["rows"] == [1, 2] and doc["fingerprint"] == results.fingerprint()
    assert results.load(path, {"n": 4, "sizes": (1, 2)}) is None
    assert results.load(tmp_path / "missing.json", {"n": 3}) is None
    monkeypatch.setattr(results, "fingerprint", lambda: "other code")
    assert results.load(path, {"n": 3, "sizes": (1, 2)}) is None


def test_the_fingerprint_follows_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(results, "ROOT", tmp_path)
    results.fingerprint.cache_clear()
    try:
        first = results.fingerprint()
        (tmp_path / "a.py").write_text("x = 2\n")
        results.fingerprint.cache_clear()
        assert results.fingerprint() != first
    finally:
        results.fingerprint.cache_clear()


@pytest.mark.parametrize("body", ["{half", "[1, 2]"])
def test_a_damaged_results_file_is_an_error(tmp_path: Path, body: str) -> None:
    path = tmp_path / "x.json"
    path.write_text(body)
    with pytest.raises(BenchError, match="results file"):
        results.load(path, {})


def test_read_all_names_what_it_skips(tmp_path: Path) -> None:
    results.save(tmp_path / "a" / "r.json", {"experiment": "search"}, {})
    (tmp_path / "b.json").write_text("not json")
    (tmp_path / "c.json").write_text(json.dumps({"rows": []}))
    docs, skipped = results.read_all(tmp_path)
    assert [p.name for p, _ in docs] == ["r.json"]
    assert sorted(Path(p).name for p in skipped) == ["b.json", "c.json"]


def test_shared_folder_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(results.SHARED_ENV, raising=False)
    assert results.shared_folder() is None
    monkeypatch.setenv(results.SHARED_ENV, str(tmp_path / "shared"))
    assert results.shared_folder() == tmp_path / "shared" and (tmp_path / "shared").is_dir()


def test_an_artefact_runs_once_for_the_same_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []

    def fake(scale: str, *, progress: object = None, **kwargs: object) -> al.Artefact:
        calls.append(kwargs)
        return al.Artefact("fig16", "t", [{"approach": "base", "seconds": 1.0}], {"ok": True}, {"scale": scale})

    monkeypatch.setitem(al.RUNNERS, "fig16", fake)
    first = al.run_artefact("fig16", "quick", out=tmp_path, reuse=True, repeats=1)
    again = al.run_artefact("fig16", "quick", out=tmp_path, reuse=True, repeats=1)
    assert len(calls) == 1 and again.rows == first.rows and again.checks == first.checks
    assert again.files == [str(tmp_path / "fig16-quick.json")]
    al.run_artefact("fig16", "quick", out=tmp_path, reuse=True, repeats=2)  # other arguments: run
    al.run_artefact("fig16", "quick", out=tmp_path, repeats=2)  # no reuse asked: run
    assert len(calls) == 3


@pytest.mark.bench
def test_a_modelsets_run_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = {"models": 4, "steps": 1, "approaches": ("baseline", "update"), "repeat": 1, "out": tmp_path,
              "reuse": True}
    first = M.run_modelsets(**kwargs)  # type: ignore[arg-type]

    def no_run(*a: object, **k: object) -> None:
        raise AssertionError("ran again")

    monkeypatch.setattr(M, "build_workload", no_run)
    again = M.run_modelsets(**kwargs)  # type: ignore[arg-type]
    assert again.rows == json.loads(json.dumps(first.rows)) and [t.name for t in again.targets] == [
        t.name for t in first.targets]
    assert [t.status for t in again.targets] == [t.status for t in first.targets]
    with pytest.raises(AssertionError, match="ran again"):
        M.run_modelsets(**{**kwargs, "steps": 2})  # type: ignore[arg-type]
