"""The model lake's search side: kept features (bit-identical reuse, corruption, eviction, gc, S3),
incremental search (again, appended items, derived candidates: rankings equal a fresh search), and
layers as arms (``layers=3``; alsatian equals shift over the same arms)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn

import mm_jupyter as mm
from mm_jupyter.errors import SearchError
from mm_jupyter.modelsearch.lake import layout
from mm_jupyter.store import features as kept_features
from mm_jupyter.store.features import FeatureStore, load_index

ROOT = Path(__file__).resolve().parents[1]


def family(n: int, seed: int, width: int = 24) -> dict[str, nn.Module]:
    """``n`` models sharing a trunk (as fine-tuned siblings do), each with its own last two blocks."""
    g = torch.Generator().manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
    with torch.no_grad():
        for p in trunk.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    out: dict[str, nn.Module] = {}
    for i in range(n):
        m = nn.Sequential(copy.deepcopy(trunk), nn.Sequential(nn.Linear(width, 16), nn.ReLU()), nn.Linear(16, 12))
        with torch.no_grad():
            for p in list(m.parameters())[4:]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        out[f"f{seed}-{i}"] = m
    return out


def derived(parents: dict[str, nn.Module], seed: int) -> dict[str, nn.Module]:
    """Copies of ``parents`` with the last block retrained (new weights)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in parents.items():
        d = copy.deepcopy(m)
        with torch.no_grad():
            for p in d[-1].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        out[f"{name}-ft"] = d
    return out


def data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] + 0.3 * x[:, 2] > 0).long()
    return x, y


def run(cands: Any, xy: Any, store: mm.Store, **kw: Any) -> Any:
    kw.setdefault("batch_size", 16)
    return mm.search(cands, xy, k=1, device="cpu", store=store, reuse=True, **kw)


def same(a: Any, b: Any) -> None:
    """Rankings equal: order, scores, losses, rungs (exactly: features are bit-identical)."""
    cols = [c for c in a.ranking.columns]
    assert list(b.ranking.columns) == cols
    assert a.ranking.equals(b.ranking), (a.ranking, b.ranking)


def kept(store: mm.Store) -> dict[str, bytes]:
    """Every kept feature's bytes by key."""
    fs = FeatureStore(store)
    out = {}
    for key in fs.entries:
        t = fs.get(key)
        assert t is not None
        out[key] = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    fs.close()
    return out


@pytest.fixture
def cands() -> dict[str, nn.Module]:
    return {**family(4, 1), **family(4, 2)}


def test_same_search_again_reuses_everything(tmp_path: Path, cands: dict[str, nn.Module]) -> None:
    store = mm.Store(tmp_path / "s")
    xy = data(400)
    first = run(cands, xy, store)
    assert first.stats["features_reused"] == 0 and first.stats["features_computed"] > 0
    again = run(cands, xy, store)
    same(first, again)
    assert again.stats["block_inferences"] == 0
    assert again.stats["features_computed"] == 0
    assert again.stats["features_reused"] == first.stats["features_computed"]
    fresh = run(cands, xy, mm.Store(tmp_path / "fresh"))  # a store that never saw these features
    same(first, fresh)


def test_reused_features_are_bit_identical_across_processes_and_after_gc(tmp_path: Path,
                                                                         cands: dict[str, nn.Module]) -> None:
    """Another process fills a store; this one fills another; every kept feature is byte-equal, and a
    search reading the other process's features ranks as this one's fresh search. A plain gc keeps the
    features; gc(features=True) frees them and the recomputed ones are byte-equal again."""
    xy = data(300)
    other = tmp_path / "other"
    script = (
        "import sys, json; sys.path.insert(0, sys.argv[2]); import test_modelsearch_lake as t, mm_jupyter as mm\n"
        "r = t.run({**t.family(4, 1), **t.family(4, 2)}, t.data(300), mm.Store(sys.argv[1]))\n"
        "print(json.dumps(r.ranking[['model', 'score']].values.tolist()))\n")
    done = subprocess.run([sys.executable, "-c", script, str(other), str(ROOT / "tests")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    here = mm.Store(tmp_path / "here")
    mine = run(cands, xy, here)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == mine.ranking[["model", "score"]].values.tolist()
    theirs_store = mm.Store(other)
    theirs, ours = kept(theirs_store), kept(here)
    assert theirs and theirs.keys() == ours.keys()
    assert all(theirs[k] == ours[k] for k in ours)
    reused = run(cands, xy, theirs_store)  # reads what the other process computed
    assert reused.stats["features_computed"] == 0
    same(mine, reused)

    here.gc()
    assert kept(here) == ours
    report = here.gc(features=True)
    assert report.objects > 0 and load_index(here.objects) == {}
    again = run(cands, xy, here)
    assert again.stats["features_reused"] == 0
    same(mine, again)
    assert kept(here) == ours


def test_corrupt_feature_object_is_detected_and_recomputed(tmp_path: Path, cands: dict[str, nn.Module]) -> None:
    store = mm.Store(tmp_path / "s")
    xy = data(300)
    first = run(cands, xy, store)
    before = kept(store)
    index = load_index(store.objects)
    oids = sorted({e.oid for e in index.values()})
    damaged = {}
    for oid in oids:  # flip one byte of the first feature in every feature object
        key, e = min(((k, e) for k, e in index.items() if e.oid == oid), key=lambda p: p[1].offset)
        path = store.objects.path(oid)  # type: ignore[attr-defined]
        raw = bytearray(path.read_bytes())
        hsize = len(raw) - store.objects.open(oid).size
        raw[hsize + e.offset] ^= 0x55
        path.chmod(0o644)
        path.write_bytes(bytes(raw))
        damaged[key] = oid
    again = run(cands, xy, store)
    assert again.stats["features_corrupt"] >= 1
    assert again.stats["features_computed"] > 0  # what the damage touched was recomputed, not used
    same(first, again)
    assert kept(store) == before  # the recomputed features are kept again, byte-equal
    for oid in {e.oid for e in load_index(store.objects).values()}:  # damaged objects were rewritten or dropped
        store.objects.open(oid).verify()


def test_budget_evicts_least_recently_used(tmp_path: Path, cands: dict[str, nn.Module]) -> None:
    store = mm.Store(tmp_path / "s")
    xy = data(300)
    run(cands, xy, store)
    full = sum(store.objects.size(o) for o in {e.oid for e in load_index(store.objects).values()})
    budget = full // 3
    other = {**family(3, 7)}
    r = run(other, xy, store, feature_budget=budget)  # newer features push the older out
    index = load_index(store.objects)
    sizes: dict[str, int] = {}
    for e in index.values():
        sizes[e.oid] = max(sizes.get(e.oid, 0), e.offset + e.nbytes)
    assert 0 < sum(sizes.values()) <= budget
    assert all(store.objects.exists(o) for o in sizes)
    newest = max(e.used for e in index.values())
    assert any(e.used == newest for e in index.values())
    again = run(other, xy, store, feature_budget=budget)  # what was evicted is recomputed: same ranking
    same(r, again)


def test_over_budget_order() -> None:
    E = kept_features.Entry
    entries = {"a": E("a" * 64, 64, 100, "uint8", (100,), 1.0), "b": E("b" * 64, 64, 100, "uint8", (100,), 3.0),
               "c": E("c" * 64, 64, 100, "uint8", (100,), 2.0), "d": E("c" * 64, 164, 100, "uint8", (100,), 0.5)}
    assert kept_features.over_budget(entries, 1000) == set()
    # objects take 164, 164 and 264 bytes (the end of their last feature); c was last used at 2.0
    assert kept_features.over_budget(entries, 450) == {"a" * 64}  # least recently used object first
    assert kept_features.over_budget(entries, 300) == {"a" * 64, "c" * 64}


def test_damaged_index_is_an_empty_cache(tmp_path: Path, cands: dict[str, nn.Module]) -> None:
    store = mm.Store(tmp_path / "s")
    xy = data(200)
    first = run(cands, xy, store)
    bad = store.objects.put(kept_features.INDEX_MAGIC + b'{"entries": {"' + b"0" * 64 + b'": [1, 2]}}').oid
    store.objects.write_ref(kept_features.KIND, kept_features.INDEX_NAME, 1, bad)
    assert load_index(store.objects) == {}
    again = run(cands, xy, store)
    assert again.stats["features_reused"] == 0
    same(first, again)


def test_layout_is_content_determined_and_appends_keep_old_chunks() -> None:
    x, y = data(400)
    a = layout(x[:320], y[:320], test_fraction=0.2, seed=0, batch_size=16)
    b = layout(x, y, test_fraction=0.2, seed=0, batch_size=16)
    old_test = set(a.test.tolist())
    assert old_test == {i for i in b.test.tolist() if i < 320}
    full_a = {h for s, e, h in a.train_chunks + a.test_chunks if e - s == 16}
    full_b = {h for _, _, h in b.train_chunks + b.test_chunks}
    assert len(full_a - full_b) <= len({lv for lv in a.levels}) + 1  # at most each group's last full chunk moved
    perm = torch.randperm(320, generator=torch.Generator().manual_seed(3))  # the split ignores positions
    c = layout(x[:320][perm], y[:320][perm], test_fraction=0.2, seed=0, batch_size=16)
    assert sorted(perm[c.test].tolist()) == sorted(a.test.tolist())
    counts = a.rung_items(3, 32)
    assert counts == sorted(counts) and counts[-1] == len(a.train) and counts[0] >= 32


def test_appended_items_rank_as_a_fresh_search(tmp_path: Path, cands: dict[str, nn.Module]) -> None:
    store = mm.Store(tmp_path / "s")
    x, y = data(500)
    first = run(cands, (x[:400], y[:400]), store)
    grown = run(cands, (x, y), store)
    fresh = run(cands, (x, y), mm.Store(tmp_path / "fresh"))
    same(fresh, grown)
    assert grown.stats["features_reused"] > 0
    assert grown.stats["features_computed"] < fresh.stats["features_computed"]
    assert first.stats["features_computed"] > 0
    # block work (items through blocks, all depths): the old items' features were read, not computed
    assert sum(grown.stats["items_per_depth"]) < 0.6 * sum(fresh.stats["items_per_depth"])


def test_derived_candidates_run_only_their_new_block(tmp_path: Path) -> None:
    store = mm.Store(tmp_path / "s")
    xy = data(400)
    base = {**family(5, 1), **family(5, 2)}
    run(base, xy, store)
    more = {**base, **derived({n: base[n] for n in list(base)[:3]}, 9)}
    grown = run(more, xy, store)
    fresh = run(more, xy, mm.Store(tmp_path / "fresh"))
    same(fresh, grown)
    assert sum(grown.stats["items_per_depth"]) < sum(fresh.stats["items_per_depth"])
    # the derived candidates resumed from their parents' kept last-block inputs: only depth-2 blocks ran
    # for the chunks the parents had seen
    assert grown.stats["items_per_depth"][0] < fresh.stats["items_per_depth"][0]


def test_shift_reuses_the_same_features(tmp_path: Path, cands: dict[str, nn.Module]) -> None:
    store = mm.Store(tmp_path / "s")
    xy = data(300)
    a = run(cands, xy, store)
    s = run(cands, xy, store, approach="shift")
    assert s.stats["features_computed"] == 0
    assert a.ranking[["model", "score", "rung"]].equals(s.ranking[["model", "score", "rung"]])


def test_layers_are_arms_and_shift_agrees(cands: dict[str, nn.Module]) -> None:
    xy = data(300)
    one = mm.search(cands, xy, k=1, device="cpu", batch_size=16)
    assert "layer" not in one.ranking and one.best_arm == (one.best, -1)
    three = mm.search(cands, xy, k=1, device="cpu", batch_size=16, layers=3)
    assert len(three.ranking) == 3 * len(cands)
    assert set(three.ranking["layer"]) == {-1, -2, -3}
    assert set(three.ranking["model"]) == set(cands)
    assert three.best_arm == (three.ranking.iloc[0]["model"], three.ranking.iloc[0]["layer"])
    assert f"{three.best_arm[0]} layer {three.best_arm[1]}:" in repr(three)
    shift = mm.search(cands, xy, k=1, device="cpu", batch_size=16, layers=3, approach="shift")
    cols = ["model", "layer", "score", "loss", "rung"]
    assert three.ranking[cols].equals(shift.ranking[cols])
    # without halving every arm sees all data: the arms share all prefix inference (the same block work
    # as the single-layer search) and each (model, -1) arm scores exactly as the model does alone
    flat1 = mm.search(cands, xy, k=1, device="cpu", batch_size=16, halving=False)
    flat3 = mm.search(cands, xy, k=1, device="cpu", batch_size=16, halving=False, layers=3)
    assert flat3.stats["items_per_depth"] == flat1.stats["items_per_depth"]
    own = flat3.ranking[flat3.ranking["layer"] == -1]
    assert dict(zip(own["model"], own["score"])) == dict(zip(flat1.ranking["model"], flat1.ranking["score"]))


def test_layers_with_reuse(tmp_path: Path, cands: dict[str, nn.Module]) -> None:
    store = mm.Store(tmp_path / "s")
    xy = data(300)
    a = run(cands, xy, store, layers=2)
    b = run(cands, xy, store, layers=2)
    same(a, b)
    assert b.stats["features_computed"] == 0


@pytest.mark.parametrize("kw, match", [
    ({"reuse": True}, "needs store"),
    ({"layers": 0}, "layers"),
    ({"reuse": "yes"}, "reuse must be"),
    ({"store": object(), "reuse": True}, "mm.Store"),
])
def test_bad_options(kw: dict[str, Any], match: str, cands: dict[str, nn.Module]) -> None:
    with pytest.raises(SearchError, match=match):
        mm.search(cands, data(100), device="cpu", **kw)


# -- team stores: PostgreSQL + S3 (moto) ---------------------------------------------------------
@pytest.fixture(scope="module")
def team_store_args() -> Iterator[tuple[str, str]]:
    from mm_jupyter.store import testing

    with testing.postgres_server(durable=False) as pg, testing.s3_server() as s3:
        yield pg.database(), s3.bucket_url()


@pytest.mark.services
def test_team_store_features_read_in_part(team_store_args: tuple[str, str], tmp_path: Path,
                                          cands: dict[str, nn.Module]) -> None:
    path, objects = team_store_args
    store = mm.Store(path, objects=objects)
    xy = data(300)
    first = run(cands, xy, store)
    folder = run(cands, xy, mm.Store(tmp_path / "folder"))
    same(first, folder)
    again = run(cands, xy, mm.Store(path, objects=objects))
    assert again.stats["features_computed"] == 0
    same(first, again)
    # one object of several large features: reading one of them fetches only the chunks it touches
    fs = FeatureStore(store)
    parts = [(f"{i:064x}", torch.full((300_000,), float(i))) for i in range(3)]
    fs.put(parts)
    fs.flush()
    reader = FeatureStore(mm.Store(path, objects=objects))
    area = reader.objects
    before = area.bytes_fetched
    got = reader.get(parts[1][0])
    assert got is not None and torch.equal(got, parts[1][1])
    fetched = area.bytes_fetched - before
    assert 1_200_000 <= fetched < area.size(reader.entries[parts[1][0]].oid) * 2 // 3


def test_two_writers_merge_their_features(tmp_path: Path) -> None:
    """Two searches keeping features at once: the second index write merges the first's entries."""
    store = mm.Store(tmp_path / "s")
    a, b = FeatureStore(store), FeatureStore(store)
    a.put([("a" * 64, torch.arange(10.0))])
    b.put([("b" * 64, torch.arange(5.0))])
    a.flush()
    b.flush()
    index = load_index(store.objects)
    assert {"a" * 64, "b" * 64} <= index.keys()
    c = FeatureStore(store)
    assert torch.equal(c.get("a" * 64), torch.arange(10.0)) and torch.equal(c.get("b" * 64), torch.arange(5.0))


def test_index_entry_that_lies_about_its_bytes_is_not_used(tmp_path: Path) -> None:
    """An index naming a range past its object, or a shape that does not fit its bytes: a miss."""
    store = mm.Store(tmp_path / "s")
    fs = FeatureStore(store)
    fs.put([("a" * 64, torch.arange(16.0)), ("b" * 64, torch.arange(4.0))])
    fs.flush()
    entries = load_index(store.objects)
    entries["a" * 64].nbytes += 4096  # past the end of the object
    entries["b" * 64].shape = (5,)  # 5 floats do not fit 16 bytes
    for key in ("a" * 64, "b" * 64):  # sealed by this writer: only the size checks stand in the way
        entries[key].seal = kept_features.seal(kept_features.writer_key(), key, entries[key])
    kept_features.write_index(store.objects, entries)
    fresh = FeatureStore(store)
    assert fresh.get("a" * 64) is None and fresh.get("b" * 64) is None and fresh.corrupt >= 1


def test_features_another_writer_sealed_are_never_read(tmp_path: Path, cands: dict[str, nn.Module],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Made-up features (and scores) keyed to real blocks and chunks, sealed by another writer: a
    search does not read them and ranks as a fresh search, then replaces them with its own. Read by
    their writer, or from a store opened with trust_code=True, they do change the ranking."""
    store = mm.Store(tmp_path / "s")
    xy = data(300)
    monkeypatch.setenv(kept_features.KEY_ENV, "alice and bob's team")
    first = run(cands, xy, store)
    monkeypatch.setenv(kept_features.KEY_ENV, "mallory")
    fake = FeatureStore(store)
    assert not any(k in fake for k in fake.entries) and fake.foreign == len(fake.entries) > 0
    g = torch.Generator().manual_seed(7)
    fake.put([(k, torch.randn(e.shape, generator=g).to(getattr(torch, e.dtype))) for k, e in fake.entries.items()])
    fake.flush()
    planted = load_index(store.objects)
    assert {e.seal for e in planted.values()} <= {e.seal for e in fake.entries.values()}
    for e in planted.values():
        e.used = 1e12  # "used" in the year 33658: no later use of the real features could replace them
    kept_features.write_index(store.objects, planted)
    poisoned = run(cands, xy, store)  # mallory reads her own features
    assert poisoned.stats["features_reused"] > 0 and poisoned.stats["features_foreign"] == 0
    assert not poisoned.ranking.equals(first.ranking)
    monkeypatch.setenv(kept_features.KEY_ENV, "alice and bob's team")
    again = run(cands, xy, store)
    same(first, again)
    assert again.stats["features_reused"] == 0 and again.stats["features_foreign"] > 0
    assert run(cands, xy, store).stats["features_computed"] == 0  # the index holds this team's again
    monkeypatch.setenv(kept_features.KEY_ENV, "mallory")
    trusted = run(cands, xy, mm.Store(tmp_path / "s", trust_code=True))  # trusted: every writer's features
    assert trusted.stats["features_foreign"] == 0 and trusted.stats["features_computed"] == 0


def test_the_writer_key_is_made_once_kept_private_and_a_damaged_one_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kept_features.KEY_ENV, raising=False)
    monkeypatch.setenv(kept_features.CONFIG_ENV, str(tmp_path / "config"))
    key = kept_features.writer_key()
    path = kept_features.key_path()
    assert path == tmp_path / "config" / "feature-key" and path.stat().st_mode & 0o777 == 0o600
    assert kept_features.writer_key() == key and len(key) == 32
    assert [p.name for p in path.parent.iterdir()] == ["feature-key"]  # no temp file left
    monkeypatch.setenv(kept_features.KEY_ENV, "team")
    assert kept_features.writer_key() not in (key, b"team")
    monkeypatch.delenv(kept_features.KEY_ENV)
    path.write_text("not a key\n")
    with pytest.raises(mm.StoreError, match="feature-key does not hold a feature key"):
        kept_features.writer_key()
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(kept_features.CONFIG_ENV, str(tmp_path / "file" / "config"))  # cannot be made
    alone = kept_features.writer_key()
    assert alone == kept_features.writer_key() != key


def test_kept_scores_follow_the_labels(tmp_path: Path, cands: dict[str, nn.Module]) -> None:
    """A kept proxy score is found only for the same features, labels, proxy and seed; the same
    inputs with other labels rank as a fresh search does."""
    from mm_jupyter.modelsearch.lake import Kept

    k = Kept(FeatureStore(mm.Store(tmp_path / "keys")), "cpu")
    base = k.score_key(["b1", "b2"], ["c1", "c2"], ["t1"], b"labels", "linear", 0)
    assert base == k.score_key(["b1", "b2"], ["c1", "c2"], ["t1"], b"labels", "linear", 0)
    for other_key in (k.score_key(["b1", "b3"], ["c1", "c2"], ["t1"], b"labels", "linear", 0),
                      k.score_key(["b1", "b2"], ["c1"], ["t1"], b"labels", "linear", 0),
                      k.score_key(["b1", "b2"], ["c1", "c2"], ["t2"], b"labels", "linear", 0),
                      k.score_key(["b1", "b2"], ["c1", "c2"], ["t1"], b"labelz", "linear", 0),
                      k.score_key(["b1", "b2"], ["c1", "c2"], ["t1"], b"labels", "knn", 0),
                      k.score_key(["b1", "b2"], ["c1", "c2"], ["t1"], b"labels", "linear", 1)):
        assert other_key != base
    store = mm.Store(tmp_path / "s")
    x, y = data(300)
    run(cands, (x, y), store)
    other = (y + 1) % 4
    relabelled = run(cands, (x, other), store)
    same(relabelled, run(cands, (x, other), mm.Store(tmp_path / "fresh")))


def test_unusual_dtypes_are_not_kept(tmp_path: Path) -> None:
    """A dtype the index cannot describe is skipped, never written into (and so never poisons) the index."""
    store = mm.Store(tmp_path / "s")
    fs = FeatureStore(store)
    fs.put([("a" * 64, torch.zeros(4, dtype=torch.float8_e4m3fn)), ("b" * 64, torch.ones(3, dtype=torch.bfloat16))])
    fs.flush()
    index = load_index(store.objects)
    assert set(index) == {"b" * 64}
    assert torch.equal(FeatureStore(store).get("b" * 64), torch.ones(3, dtype=torch.bfloat16))


def test_stored_candidates_share_kept_features_with_in_memory_ones(tmp_path: Path) -> None:
    """Candidates loaded from the store have the same block ids as the models they were saved from,
    so their features are the kept ones (and the ranking is the same)."""
    from search_models import mlp

    store = mm.Store(tmp_path / "s")
    torch.manual_seed(0)
    cands = {f"m{i}": mlp() for i in range(4)}
    x = torch.randn(240, 16)
    y = (x[:, 0] > 0).long()
    live = run(cands, (x, y), store)
    mm.add_candidates(store, cands, "mlps")
    stored = run(mm.load_candidates(store, "mlps"), (x, y), store)
    assert stored.stats["features_computed"] == 0
    same(live, stored)


def test_precision_names_what_changes_float_results() -> None:
    from mm_jupyter.modelsearch.lake import precision

    tag = precision("cpu")
    assert f"torch {torch.__version__}" in tag and f"threads {torch.get_num_threads()}" in tag
    assert f"cpu {torch.backends.cpu.get_cpu_capability()}" in tag


def test_features_are_made_durable_together_and_never_named_when_that_fails(
        tmp_path: Path, cands: dict[str, nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    """A search's feature objects are synced together when it ends (one ``make_durable`` holding
    every object it wrote), before the index names them. When that fails, the index names none of
    them, and the next search computes them again and ranks as a fresh one."""
    from mm_jupyter.errors import StoreError

    xy = data(300)
    store = mm.Store(tmp_path / "s")
    durable = store.objects.make_durable
    pending: list[int] = []

    def counting() -> None:
        pending.append(len(store.objects._deferred.paths or []))  # type: ignore[attr-defined]
        durable()

    monkeypatch.setattr(store.objects, "make_durable", counting)
    first = run(cands, xy, store)
    written = {e.oid for e in load_index(store.objects).values()}
    assert pending[:1] == [len(written)] and len(written) > 1  # every feature object, synced at once
    before = kept(store)

    broken = mm.Store(tmp_path / "broken")

    def failing() -> None:
        raise StoreError("the disk said no")

    monkeypatch.setattr(broken.objects, "make_durable", failing)
    lost = run(cands, xy, broken)
    same(first, lost)
    assert load_index(broken.objects) == {}  # nothing that may not be on disk is named
    monkeypatch.undo()
    again = run(cands, xy, broken)
    assert again.stats["features_reused"] == 0 and again.stats["features_computed"] > 0
    same(first, again)
    assert kept(broken) == before


def test_a_feature_object_is_the_documented_payload(tmp_path: Path) -> None:
    """``put`` writes the payload straight into the object: the magic, then every tensor's bytes
    at 64-byte aligned offsets with zero padding; every feature reads back bit-identical."""
    store = mm.Store(tmp_path / "s")
    g = torch.Generator().manual_seed(0)
    tensors = {"a" * 64: torch.randn(3, 5, generator=g), "b" * 64: torch.tensor(2.5, dtype=torch.float64),
               "c" * 64: torch.zeros(0, 4), "d" * 64: torch.rand(7, generator=g) > 0.5,
               "e" * 64: torch.randn(2, 3, generator=g).to(torch.bfloat16)}
    fs = FeatureStore(store)
    fs.put(list(tensors.items()))
    fs.flush()
    fs = FeatureStore(store)
    expected = bytearray(kept_features.PAYLOAD_MAGIC.ljust(64, b"\x00"))
    for key, t in tensors.items():
        got = fs.get(key)
        assert got is not None and got.dtype == t.dtype and got.shape == t.shape
        assert got.reshape(-1).view(torch.uint8).tolist() == t.reshape(-1).view(torch.uint8).tolist()
        e = fs.entries[key]
        assert e.offset == len(expected)
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        expected += raw + b"\x00" * (-len(raw) % 64)
    (oid,) = {e.oid for e in fs.entries.values()}
    reader = store.objects.open(oid)
    assert bytes(reader.read(0, reader.size)) == bytes(expected)
    fs.close()


class _Dense(nn.Module):
    """One step the Sequential rule keeps whole, so blocks are modules of the model itself (their
    ids come from the model's identity scope, ``hashing.block_id``)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.lin = nn.Linear(cin, cout)
        self.act: nn.Module = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x))


def dense_family(n: int, seed: int) -> dict[str, nn.Module]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, nn.Module] = {}
    for i in range(n):
        m = nn.Sequential(_Dense(8, 24), _Dense(24, 24), _Dense(24, 16), nn.Linear(16, 12))
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        out[f"d{seed}-{i}"] = m
    return out


def test_a_changed_candidate_item_or_precision_is_computed_again(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Searches again after changing the same candidate objects in place (weight values, a new
    parameter object, a swapped submodule), one data item, or the precision tag: what changed is
    computed again (never read from the kept features), and the ranking equals a fresh search's
    on an empty store; searching once more then computes nothing."""
    from mm_jupyter.modelsearch import api

    models = dense_family(4, 3)
    x, y = data(300)
    store = mm.Store(tmp_path / "s")
    run(models, (x, y), store)
    assert run(models, (x, y), store).stats["features_computed"] == 0  # verdicts cached: ids from the scopes
    moved = x.clone()
    moved[7] += 0.25
    tag = api.precision("cpu")
    changes = [
        ("weight values", lambda: models["d3-1"][2].lin.weight.data.add_(0.5)),
        ("a new parameter", lambda: setattr(models["d3-2"][1].lin, "weight",
                                            nn.Parameter(models["d3-2"][1].lin.weight.detach() * 1.5))),
        ("a swapped submodule", lambda: setattr(models["d3-3"][2], "act", nn.Tanh())),
        ("an item", lambda: x.copy_(moved)),
        ("the precision", lambda: monkeypatch.setattr(api, "precision", lambda dev: tag + "|elsewhere")),
    ]
    for i, (what, change) in enumerate(changes):
        change()
        again = run(models, (x, y), store)
        assert again.stats["features_computed"] > 0, f"{what}: nothing was computed again"
        same(again, run(models, (x, y), mm.Store(tmp_path / f"fresh{i}")))
        assert run(models, (x, y), store).stats["features_computed"] == 0, what


def test_a_candidate_writing_its_input_never_changes_the_data(tmp_path: Path) -> None:
    """Verifying a candidate's split runs it on the first items; one that writes its input in place
    (an in-place first activation) must change neither the caller's data nor what a kept chunk holds:
    a repeated search reads what a fresh one computes."""
    torch.manual_seed(0)
    writer = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12))
    cands = {"writer": writer, **family(2, 5)}
    x, y = data(200)
    before = x.clone()
    first = run(cands, (x, y), mm.Store(tmp_path / "s"))
    assert torch.equal(x, before)
    same(first, run(cands, (x, y), mm.Store(tmp_path / "s")))
    mm.search(cands, (x, y), k=1, device="cpu")
    assert torch.equal(x, before)


def test_item_hashes_of_data_seen_before_come_back_only_for_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """``item_hashes`` remembers the digests of data it hashed: the same data (the same tensor or a
    copy) gets them back without hashing an item; any changed byte, item count or item shape gives
    the per-item sha256 afresh, and what comes back is a list of its own."""
    import hashlib

    from mm_jupyter.modelsearch import lake

    def plain(x: torch.Tensor) -> list[bytes]:
        head = f"{x.dtype}|{tuple(x.shape[1:])}|".encode()
        return [hashlib.sha256(head + row.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).digest()
                for row in x]

    torch.manual_seed(0)
    x = torch.randn(40, 3, 4)
    first = lake.item_hashes(x)
    assert first == plain(x)
    first.append(b"mine")  # the caller's list: the memo is not touched
    calls = []
    real = hashlib.sha256

    def counting(*args: object) -> object:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    expected = plain(x)
    monkeypatch.setattr(lake.hashlib, "sha256", counting)
    assert lake.item_hashes(x.clone()) == expected and not calls, "the same data was hashed again"
    calls.clear()
    x.detach().numpy()[7, 1, 2] += 1.0  # the same tensor, one item changed in place
    assert lake.item_hashes(x) == plain(x) and calls
    assert lake.item_hashes(x[:39]) == plain(x[:39])
    assert lake.item_hashes(x.reshape(40, 12)) == plain(x.reshape(40, 12)) != plain(x)


def test_an_index_read_before_is_not_parsed_again_and_never_shared(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``load_index`` remembers parsed indexes by their object id (the hash of their bytes): the same
    id is not read again, every caller gets entries of its own, a new index is read, and a failed
    read is not remembered."""
    from mm_jupyter.store.features import Entry, write_index

    store = mm.Store(tmp_path / "s")
    write_index(store.objects, {"a" * 64: Entry("b" * 64, 64, 8, "float32", (2,), 1.0)})
    first = load_index(store.objects)
    first["a" * 64].used = 99.0
    reads = []
    real_get = store.objects.get
    monkeypatch.setattr(store.objects, "get", lambda oid: reads.append(oid) or real_get(oid))
    again = load_index(store.objects)
    assert not reads and again["a" * 64].used == 1.0 and again is not first
    write_index(store.objects, {"c" * 64: Entry("d" * 64, 64, 4, "int32", (1,), 2.0)})
    assert set(load_index(store.objects)) == {"c" * 64} and reads

    def failing(oid: str) -> bytes:
        raise OSError(5, "I/O error")

    write_index(store.objects, {"e" * 64: Entry("f" * 64, 64, 4, "int32", (1,), 3.0)})
    monkeypatch.setattr(store.objects, "get", failing)
    assert load_index(store.objects) == {}
    monkeypatch.setattr(store.objects, "get", real_get)
    assert set(load_index(store.objects)) == {"e" * 64}


def test_a_remembered_layout_is_the_layout_of_the_same_items_labels_and_options() -> None:
    """``layout`` remembers its last results: the same digests, labels and options give an equal
    layout of the caller's own (mutating it changes no later one); a changed label, seed, fraction
    or batch size gives the layout computed afresh."""
    from mm_jupyter.modelsearch import lake

    def fields(lay: Any) -> tuple[Any, ...]:
        return (lay.test.tolist(), lay.train.tolist(), lay.levels, lay.test_chunks, lay.train_chunks, lay.hashes)

    x, y = data(300)
    kw = {"test_fraction": 0.2, "seed": 0, "batch_size": 16}
    first = layout(x, y, **kw)
    plain = fields(lake._layout(lake.item_hashes(x), y.tolist(), 0.2, 0, 16))
    assert fields(first) == plain
    first.test[0] = -1
    first.levels.clear()
    assert fields(layout(x.clone(), y.clone(), **kw)) == plain
    y2 = y.clone()
    y2[5] = (y2[5] + 1) % 3
    for args, options in (((x, y2), kw), ((x, y), {**kw, "seed": 1}), ((x, y), {**kw, "test_fraction": 0.3}),
                          ((x, y), {**kw, "batch_size": 8})):
        got = layout(*args, **options)
        expected = lake._layout(lake.item_hashes(args[0]), args[1].tolist(), options["test_fraction"],
                                options["seed"], options["batch_size"])
        assert fields(got) == fields(expected) != plain


def test_features_written_by_this_process_are_read_from_memory_while_their_object_is_unchanged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A search run again in the process that kept its features reads a copy of what it wrote, not
    the object, while the object's stamp (inode, size, times) is the one it was written under; any
    change of the file, or features beyond the memory budget, are read from the object and verified."""
    import os

    store = mm.Store(tmp_path / "s")
    a, b = torch.randn(3, 5), torch.arange(6, dtype=torch.int64)
    fs = FeatureStore(store)
    fs.put([("a" * 64, a), ("b" * 64, b)])
    fs.flush()
    expected_a = a.clone()
    a.add_(1.0)  # the caller's tensor changes after the put: the kept copy must not
    oid = load_index(store.objects)["a" * 64].oid
    opened: list[str] = []
    real_open = store.objects.open
    monkeypatch.setattr(store.objects, "open", lambda o: (o == oid and opened.append(o)) or real_open(o))

    def read(key: str) -> torch.Tensor:
        got = FeatureStore(store).get(key)
        assert got is not None
        return got

    assert torch.equal(read("a" * 64), expected_a) and torch.equal(read("b" * 64), b) and not opened
    read("a" * 64).zero_()  # a reader's copy is its own
    assert torch.equal(read("a" * 64), expected_a) and not opened
    os.utime(store.objects.path(oid), ns=(1, 1))  # the file changed (here: only its times)
    assert torch.equal(read("a" * 64), expected_a) and opened == [oid]
    monkeypatch.setattr(kept_features, "RECENT_BYTES", 8)
    fs = FeatureStore(store)
    fs.put([("c" * 64, torch.ones(4))])
    fs.flush()
    oid = load_index(store.objects)["c" * 64].oid
    opened.clear()
    assert torch.equal(read("c" * 64), torch.ones(4)) and opened == [oid]
