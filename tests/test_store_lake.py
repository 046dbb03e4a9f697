"""The model lake you can query: ``store.models()`` (one row per stored model, from the catalog and
manifests only), kept searches (``result.save(store, dataset=...)``, ``store.searches()``) and
``best_on``; hand-written rows are refused with an IntegrityError naming them; an old store without
the searches table reads as none."""
from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import pandas as pd
import pytest
import search_models
import torch
from torch import nn

import mm_jupyter as mm
from mm_jupyter.errors import IntegrityError, RefError, StoreError
from mm_jupyter.store import inventory, searchlog

LEGACY = Path(__file__).parent / "data" / "store_v1"


def mlps(n: int, seed: int = 0, inputs: int = 16) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {f"m{i}": search_models.mlp(inputs=inputs).eval() for i in range(n)}


def blobs(n: int = 256, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    centers = torch.randn(4, 16, generator=g) * 2
    return centers[y] + torch.randn(n, 16, generator=g), y


def mlp_params(inputs: int = 16) -> int:
    return sum(t.numel() for t in search_models.mlp(inputs=inputs).state_dict().values())


def test_an_empty_store_gives_the_columns_and_no_rows(tmp_path):
    store = mm.Store(tmp_path / "s")
    frame = store.models()
    assert list(frame.columns) == inventory.COLUMNS and len(frame) == 0
    assert {c: str(t) for c, t in frame.dtypes.items()} == inventory._DTYPES
    searches = store.searches()
    assert len(searches) == 0 and list(searches.columns) == searchlog._COLUMNS
    assert store.catalog.raw_searches() == []


def test_models_lists_every_stored_model_from_its_records(tmp_path, monkeypatch):
    store = mm.Store(tmp_path / "s")
    first = store.save_set(mlps(3), "cells")
    changed = mlps(3)
    changed["m1"] = mlps(1, seed=9)["m0"]
    store.save_set(changed, "cells", approach="update")
    wide = {"a": nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))}
    store.save_set(wide, "tiny")
    mm.add_candidates(store, mlps(2, seed=3), "zoo")

    # no model is built and no parameter object is read: only manifests (and small index objects)
    from mm_jupyter.store.architectures import Architecture

    def refuse(*_a, **_k):
        raise AssertionError("store.models() built a model")

    monkeypatch.setattr(Architecture, "build", refuse)
    monkeypatch.setattr(Architecture, "build_meta", refuse)
    fresh = mm.Store(tmp_path / "s")
    opened: list[str] = []
    real_open = type(fresh.objects).open

    def counting(self, oid):
        opened.append(oid)
        return real_open(self, oid)

    monkeypatch.setattr(type(fresh.objects), "open", counting)
    frame = fresh.models()
    params = {r.manifest["params"] for r in (fresh.row("cells@1"), fresh.row("tiny")) if "params" in r.manifest}
    assert params and not params & set(opened)

    assert len(frame) == 3 + 3 + 1 + 2
    cells = frame[frame["set"] == "cells"]
    assert list(zip(cells["version"], cells["name"])) == [(1, "m0"), (1, "m1"), (1, "m2"), (2, "m0"), (2, "m1"),
                                                         (2, "m2")]
    assert set(cells["params"]) == {mlp_params()}
    assert list(cells["parent"].fillna("-")) == ["-"] * 3 + [f"cells@{first.version}"] * 3
    assert set(cells["family"]) == {"mlp"} and cells["arch_hash"].nunique() == 1
    assert list(cells["tags"].iloc[[0, 3]]) == [("baseline", "factory"), ("update", "factory")]
    tiny = frame[frame["set"] == "tiny"].iloc[0]
    assert (tiny["name"], tiny["family"], tiny["params"]) == ("a", "Sequential", 8 * 4 + 4 + 4 * 2 + 2)
    assert tiny["arch_hash"] != cells["arch_hash"].iloc[0]
    zoo = frame[frame["kind"] == "candidates"]
    assert list(zoo["name"]) == ["m0", "m1"] and set(zoo["params"]) == {mlp_params()}
    assert set(zoo["arch_hash"]) == set(cells["arch_hash"])  # the same factory call: the same record
    assert frame["best_on"].isna().all()
    assert frame.query("params < 1000")["name"].tolist() == ["a"]


def test_provenance_datasets_are_listed_per_model(tmp_path):
    from mm_jupyter.usecases.battery import cell_ref
    from mm_jupyter.usecases.training import initial_models

    store = mm.Store(tmp_path / "s")
    v1 = {str(i): m for i, m in enumerate(initial_models(3, seed=1))}
    store.save_set(v1, "cells")
    prov = mm.Provenance(train="mm_jupyter.usecases.training:train", config={"epochs": 1, "lr": 1e-3},
                         datasets={"2": cell_ref(2, 1)}, seed=3)
    store.save_set(v1 | prov.run(v1), "cells", approach="provenance", provenance=prov)
    frame = store.models()
    v2 = frame[frame["version"] == 2].set_index("name")
    assert v2.loc["0", "datasets"] == () and v2.loc["1", "datasets"] == ()
    (loader,) = v2.loc["2", "datasets"]
    assert "load_cell" in loader
    assert v2.loc["2", "parent"] == "cells@1" and v2.loc["2", "tags"][0] == "provenance"
    assert frame[frame["version"] == 1]["datasets"].map(len).sum() == 0


def test_models_is_fast_for_5000_models(tmp_path):
    """5,000 models in one set and 200 one-model sets: read from records alone (timing printed, not asserted)."""
    store = mm.Store(tmp_path / "s")
    torch.manual_seed(0)
    store.save_set([nn.Linear(4, 2) for _ in range(5000)], "many")
    for i in range(200):
        store.save_set([nn.Linear(4, 2)], f"one-{i}")
    fresh = mm.Store(tmp_path / "s")
    t0 = time.perf_counter()
    frame = fresh.models()
    took = time.perf_counter() - t0
    print(f"store.models(): {len(frame)} rows in {took:.2f} s")
    assert len(frame) == 5200 and set(frame["params"]) == {10}
    assert frame["name"].iloc[4999] == "4999"


def kept_search(tmp_path, dataset="cifar-subset"):
    store = mm.Store(tmp_path / "s")
    mm.add_candidates(store, mlps(6, seed=5), "zoo")
    result = mm.search(mm.load_candidates(store, "zoo"), blobs(), k=1, batch_size=64)
    return store, result, result.save(store, dataset=dataset)


def test_a_saved_search_is_listed_and_marks_its_winner(tmp_path):
    store, result, ident = kept_search(tmp_path)
    assert result.source == ("zoo", 1)
    frame = store.searches()
    assert len(frame) == 1 and ident == frame["id"].iloc[0] == 1
    row = frame.iloc[0]
    assert (row["dataset"], row["approach"], row["k"], row["candidates"]) == ("cifar-subset", "alsatian", 1, 6)
    assert row["winner"] == result.best and row["top5"] == tuple(result.ranking["model"][:5])
    assert row["source"] == "zoo@1" and abs(row["score"] - result.ranking["score"].iloc[0]) < 1e-12
    assert row["total_s"] == pytest.approx(sum(result.timings.values()))
    kept = store.kept_search(ident)
    assert list(kept.frame["model"]) == list(result.ranking["model"])
    assert kept.frame["score"].tolist() == pytest.approx(result.ranking["score"].tolist())
    with pytest.raises(RefError, match="#7"):
        store.kept_search(7)

    models = store.models()
    best = models.query("params < 20e6 and best_on == 'cifar-subset'")
    assert list(best["name"]) == [result.best] and list(best["set"]) == ["zoo"]
    assert best["score"].iloc[0] == pytest.approx(result.ranking["score"].iloc[0])
    assert models.query("params < 10 and best_on == 'cifar-subset'").empty
    # reopened (another process would see the same)
    assert list(mm.Store(tmp_path / "s").models().query("best_on == 'cifar-subset'")["name"]) == [result.best]


def test_best_on_several_datasets_and_the_latest_search_decides(tmp_path):
    store, result, _ = kept_search(tmp_path, "a")
    result.save(store, dataset="b")
    models = store.models()
    winner = models[models["name"] == result.best]
    assert sorted(winner["best_on"]) == ["a", "b"]  # one row per dataset it is best on
    assert len(models) == 6 + 1 and models[models["name"] != result.best]["best_on"].isna().all()
    assert list(models.query("best_on == 'b'")["name"]) == [result.best]
    # a later search on "b" with another winner takes "b" over
    other = mm.search(mm.load_candidates(store, "zoo"), blobs(seed=4), k=1, batch_size=64)
    forged = other.ranking.copy()
    runner_up = str(forged["model"].iloc[1])
    forged = pd.concat([forged.iloc[[1]], forged.drop(index=forged.index[1])]).reset_index(drop=True)
    other.ranking = forged
    other.save(store, dataset="b")
    models = store.models()
    assert list(models.query("best_on == 'b'")["name"]) == [runner_up]
    assert list(models.query("best_on == 'a'")["name"]) == [result.best]


def test_in_memory_candidates_keep_names_only(tmp_path):
    store = mm.Store(tmp_path / "s")
    mm.add_candidates(store, mlps(3, seed=5), "zoo")  # same names as below: never matched by name
    result = mm.search(mlps(3, seed=5), blobs(), k=1, batch_size=64)
    assert result.source is None
    result.save(store, dataset="mem")
    assert store.searches()["source"].isna().all()
    assert store.models()["best_on"].isna().all()


def test_bad_saves_keep_nothing(tmp_path):
    store, result, _ = kept_search(tmp_path)
    for bad in ("", " x", "a\nb", "x" * 201, None, 3):
        with pytest.raises(StoreError, match="dataset"):
            result.save(store, dataset=bad)
    with pytest.raises(mm.SearchError, match="mm.Store"):
        result.save(str(tmp_path / "s"), dataset="x")
    result.source = ("zoo", 9)
    with pytest.raises(StoreError, match="zoo@9"):
        result.save(store, dataset="x")
    assert len(store.searches()) == 1


def _forge(store, **change):
    """Write a searches row by hand (as anyone with write access to the catalog could)."""
    row = store.catalog.raw_searches()[0]._asdict()
    old_id = row["id"]
    rec = json.loads(row["record"])
    for key, value in change.items():
        if key in row and key != "record":
            row[key] = value
        else:
            rec[key] = value
    row["record"] = change.get("record", json.dumps(rec))
    db = sqlite3.connect(store.root / "catalog.sqlite")
    with db:
        db.execute("UPDATE searches SET id=?, dataset=?, created=?, approach=?, winner=?, record=? WHERE id=?",
                   (row["id"], row["dataset"], row["created"], row["approach"], row["winner"], row["record"], old_id))
    db.close()


@pytest.mark.parametrize("change, what", [
    ({"record": "not json"}, "not valid JSON"),
    ({"record": "[" * 50 + "]" * 50}, "nested deeper"),
    ({"format": 99}, "format-1"),
    ({"ranking": []}, "ranking"),
    ({"ranking": [["a", "high", 0.1, 0]]}, "ranking entry 0"),
    ({"ranking": [["a", 0.5, 0.1, 0], ["a", 0.4, 0.2, 0]]}, "twice"),
    ({"winner": "someone-else"}, "winner"),
    ({"k": 0}, "k"),
    ({"k": True}, "k"),
    ({"timings": {"x": "slow"}}, "timings"),
    ({"source": {"kind": "candidates", "name": "zoo", "version": -1}}, "source"),
    ({"approach": "magic"}, "approach"),
    ({"dataset": ""}, "dataset"),
    ({"id": 0}, "id"),
])
def test_a_hand_written_row_is_an_integrity_error_naming_it(tmp_path, change, what):
    store, _, _ = kept_search(tmp_path)
    assert store.verify() == []
    _forge(store, **change)
    (problem,) = store.verify()
    assert problem.startswith("kept search #") and what in problem
    for read in (store.searches, store.models):
        with pytest.raises(IntegrityError, match="kept search #") as info:
            read()
        assert what in str(info.value)


def test_a_store_without_the_searches_table_reads_as_none_and_gets_it_on_first_save(tmp_path):
    path = tmp_path / "legacy"
    shutil.copytree(LEGACY, path)
    db = sqlite3.connect(path / "catalog.sqlite")
    assert db.execute("SELECT count(*) FROM sqlite_master WHERE name='searches'").fetchone()[0] == 0
    db.close()
    store = mm.Store(path)
    assert len(store.searches()) == 0
    before = store.models()
    assert len(before) > 0 and before["best_on"].isna().all()
    db = sqlite3.connect(path / "catalog.sqlite")  # read without writing the table
    assert db.execute("SELECT count(*) FROM sqlite_master WHERE name='searches'").fetchone()[0] == 0
    db.close()
    mm.add_candidates(store, mlps(4, seed=5), "zoo")
    mm.search(mm.load_candidates(store, "zoo"), blobs(), k=1, batch_size=64).save(store, dataset="d")
    assert list(mm.Store(path).searches()["dataset"]) == ["d"]
    assert len(store.models()) == len(before) + 4


def test_a_rebuilt_catalog_keeps_the_searches(tmp_path):
    store, result, _ = kept_search(tmp_path)
    store.close()
    mm.Store.rebuild_catalog(tmp_path / "s")
    again = mm.Store(tmp_path / "s")
    assert list(again.searches()["winner"]) == [result.best]
    assert list(again.models().query("best_on == 'cifar-subset'")["name"]) == [result.best]


def test_what_is_kept_reads_back_and_what_could_not_is_refused(tmp_path, monkeypatch):
    store = mm.Store(tmp_path / "s")
    ranking = [("a", float("nan"), 0.1, 0), ("b", 0.5, float("inf"), 0)]
    ident = store.keep_search("d", "shift", 2, ranking, {"x" * 500: 1.0, "nan": float("nan")})
    kept = store.kept_search(ident)
    assert [(r.model, r.score, r.loss) for r in kept.ranking] == [("a", None, 0.1), ("b", 0.5, None)]
    assert kept.timings == {"x" * 100: 1.0} and kept.k == 2 and kept.top == ["a", "b"]
    for bad, what in [([("a", 0.5, 0.1, -1)], "rung"), ([("a", 0.5, 0.1, True)], "rung"),
                      ([("", 0.5, 0.1, 0)], "candidate name"), ([("a", 1, 1, 0), ("a", 1, 1, 0)], "twice"),
                      ([], "1 to")]:
        with pytest.raises(StoreError, match=what):
            store.keep_search("d", "shift", 1, bad, {})
    with pytest.raises(StoreError, match="k must be"):
        store.keep_search("d", "shift", 3, ranking, {})
    with pytest.raises(StoreError, match="approach"):
        store.keep_search("d", "magic", 1, ranking, {})
    monkeypatch.setattr(searchlog, "MAX_RECORD_CHARS", 100)
    with pytest.raises(StoreError, match="more than 100"):
        store.keep_search("d", "shift", 1, [(f"model-{i}", 0.5, 0.1, 0) for i in range(20)], {})
    monkeypatch.undo()
    assert len(store.searches()) == 1
