"""Kept forks (issue 25): a kept search also keeps the block outputs where two of its candidates
diverge, and a candidate that misses a chunk's features resumes from the deepest kept point of its
path. Every shortcut is proved against a fresh search on an empty store (bit-identical features,
equal rankings) and against the same search with forks switched off (less block work)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from store_models import run_python
from test_modelsearch_lake import data, kept, run, same
from torch import nn

import mm_jupyter as mm
from mm_jupyter.modelsearch.api import _prepare
from mm_jupyter.modelsearch.engine import Meter
from mm_jupyter.modelsearch.lake import Kept, fork_paths, layout, precision
from mm_jupyter.store.features import load_index

TRUNK = 2  # blocks every candidate of a ``forked`` family shares (a block is a Linear and its ReLU)


def forked(n: int, seed: int, width: int = 8) -> dict[str, nn.Module]:
    """``n`` models of 4 blocks sharing their first ``TRUNK`` (the fork) and each with its own last two;
    the trunk's output is ``width`` floats per item (8: as large as an input item, so the fork is kept),
    the others 8."""
    g = torch.Generator().manual_seed(seed)

    def lin(a: int, b: int) -> nn.Linear:
        layer = nn.Linear(a, b)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        return layer

    trunk = [lin(8, width), nn.ReLU(), lin(width, width), nn.ReLU()]
    return {f"k{seed}-{i}": nn.Sequential(*copy.deepcopy(trunk), lin(width, 8), nn.ReLU(), lin(8, 8), nn.ReLU(),
                                          lin(8, 6)) for i in range(n)}


def regrown(parents: dict[str, nn.Module], seed: int) -> dict[str, nn.Module]:
    """Copies of ``parents`` with both blocks after the trunk drawn afresh: their last-block input is
    kept nowhere, only the trunk's output (the fork) can be."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in parents.items():
        d = copy.deepcopy(m)
        with torch.no_grad():
            for p in list(d[2 * TRUNK:].parameters())[:2]:  # the first Linear after the trunk
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        out[f"{name}-re"] = d
    return out


@pytest.fixture
def no_forks(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Switches forks off (a candidate resumes only from its last-block input, as before forks)."""
    def off() -> None:
        monkeypatch.setattr(Kept, "note_forks", lambda self, group, data: None)
    return off


def trunk_work(r: Any) -> int:
    return sum(r.stats["items_per_depth"][:TRUNK])


def fork_keys(store: mm.Store, cands: dict[str, nn.Module], xy: tuple[torch.Tensor, torch.Tensor]) -> set[str]:
    """Keys of the trunk outputs (the forks) of ``cands`` that ``store`` keeps, on any chunk of ``xy``."""
    prepared = _prepare(cands, xy[0][:2], True, "cpu", Meter(), lambda e: None)
    k = Kept(None, precision("cpu"))  # type: ignore[arg-type]  # only its keys are used
    lay = layout(*xy, test_fraction=0.2, seed=0, batch_size=16)
    chunks = {h for _, _, h in lay.test_chunks} | {h for top in range(31) for _, _, h in lay.grouped(top).train_chunks}
    keys = {k.key(tuple(c.ids[:TRUNK]), h, "raw") for c in prepared if c.ids is not None for h in chunks}
    return keys & set(load_index(store.objects))


def same_features(a: mm.Store, b: mm.Store) -> int:
    """Every feature kept in both stores is byte-equal; returns how many were compared."""
    ka, kb = kept(a), kept(b)
    common = ka.keys() & kb.keys()
    assert all(ka[k] == kb[k] for k in common)
    return len(common)


def test_forks_are_where_candidates_diverge_and_small_enough() -> None:
    x = torch.randn(4, 8)
    cands = _prepare({**forked(3, 1), **forked(2, 2)}, x, True, "cpu", Meter(), lambda e: None)
    ids = {c.name: c.ids for c in cands}
    assert all(c.count == 4 and c.sizes == [32, 32, 32, 32] for c in cands)
    forks = fork_paths(cands, 32)
    assert forks == {tuple(ids["k1-0"][:TRUNK]), tuple(ids["k2-0"][:TRUNK])}  # one per family, none across
    assert fork_paths(cands, 31) == set()  # larger than the limit: not kept
    assert fork_paths(cands[:1], 32) == set()  # one candidate diverges from nothing


def test_derived_candidates_resume_from_the_fork(tmp_path: Path, no_forks: Any) -> None:
    """Candidates derived by changing their last two blocks find no kept last-block input; they
    resume from the trunk's kept output: no trunk block runs, and everything equals a fresh search."""
    base = forked(6, 1)
    more = {**base, **regrown({n: base[n] for n in list(base)[:2]}, 9)}
    xy = data(400)
    store = mm.Store(tmp_path / "s")
    run(base, xy, store)
    assert fork_keys(store, base, xy)
    grown = run(more, xy, store)
    fresh_store = mm.Store(tmp_path / "fresh")
    fresh = run(more, xy, fresh_store)
    same(fresh, grown)
    assert same_features(store, fresh_store) > 0
    assert grown.stats["features_resumed"] == grown.stats["features_computed"] > 0
    assert trunk_work(grown) == 0 < trunk_work(fresh)  # every chunk's fork was kept by the first search

    no_forks()  # the control: the same two searches without forks run the trunk again
    plain = mm.Store(tmp_path / "plain")
    run(base, xy, plain)
    assert not fork_keys(plain, base, xy)
    without = run(more, xy, plain)
    same(fresh, without)
    assert trunk_work(without) > 0
    assert sum(grown.stats["items_per_depth"]) < sum(without.stats["items_per_depth"])


def test_appended_items_resume_candidates_new_on_a_rung(tmp_path: Path, no_forks: Any) -> None:
    """After items are appended, a candidate new on a rung computes that rung's old chunks from the
    kept forks; the ranking and every kept feature equal a fresh search's."""
    cands = {**forked(5, 1), **forked(5, 2)}
    x, y = data(600)
    store = mm.Store(tmp_path / "s")
    run(cands, (x[:400], y[:400]), store)
    grown = run(cands, (x, y), store)
    fresh_store = mm.Store(tmp_path / "fresh")
    fresh = run(cands, (x, y), fresh_store)
    same(fresh, grown)
    assert same_features(store, fresh_store) > 0
    assert 0 < grown.stats["features_resumed"] <= grown.stats["features_computed"]

    no_forks()
    plain = mm.Store(tmp_path / "plain")
    run(cands, (x[:400], y[:400]), plain)
    without = run(cands, (x, y), plain)
    same(fresh, without)
    assert trunk_work(grown) < trunk_work(without)


@pytest.mark.parametrize("damage", ["corrupt", "delete"])
def test_a_damaged_fork_is_detected_and_recomputed(tmp_path: Path, damage: str) -> None:
    """The objects holding the kept forks are damaged (a byte of every fork flipped) or deleted: the
    search detects it, recomputes from the input (no trunk output read) and equals a fresh search."""
    base = forked(6, 1)
    more = {**base, **regrown({n: base[n] for n in list(base)[:2]}, 9)}
    xy = data(400)
    store = mm.Store(tmp_path / "s")
    run(base, xy, store)
    index = load_index(store.objects)
    forks = {key: index[key] for key in fork_keys(store, base, xy)}
    assert forks
    for oid in {e.oid for e in forks.values()}:
        path = store.objects.path(oid)  # type: ignore[attr-defined]
        path.chmod(0o644)
        if damage == "delete":
            path.unlink()
            continue
        raw = bytearray(path.read_bytes())
        head = len(raw) - store.objects.open(oid).size
        for e in forks.values():
            if e.oid == oid:
                raw[head + e.offset + e.nbytes // 2] ^= 0x55
        path.write_bytes(bytes(raw))
    grown = run(more, xy, store)
    assert grown.stats["features_corrupt"] >= 1
    assert trunk_work(grown) > 0  # the regrown candidates started from the input: no damaged fork was used
    fresh_store = mm.Store(tmp_path / "fresh")
    same(run(more, xy, fresh_store), grown)
    assert same_features(store, fresh_store) > 0
    for oid in {e.oid for e in load_index(store.objects).values()}:
        store.objects.open(oid).verify()


def test_a_fork_larger_than_an_item_and_a_last_input_is_not_kept(tmp_path: Path) -> None:
    """A trunk output of 16 floats per item (inputs and last-block inputs: 8) is not kept; the regrown
    candidates then start from the input, and still rank as a fresh search."""
    base = forked(6, 1, width=16)
    more = {**base, **regrown({n: base[n] for n in list(base)[:2]}, 9)}
    xy = data(400)
    store = mm.Store(tmp_path / "s")
    run(base, xy, store)
    assert not fork_keys(store, base, xy)
    assert not any(e.shape[1:] == (16,) for e in load_index(store.objects).values())  # no trunk output at all
    grown = run(more, xy, store)
    assert trunk_work(grown) > 0
    same(run(more, xy, mm.Store(tmp_path / "fresh")), grown)


def test_forks_kept_by_another_process_give_the_same_search(tmp_path: Path) -> None:
    """Another process keeps a search on 400 items; this one searches 600 items with two regrown
    candidates more on that store (appended and derived at once): equal to a fresh search here."""
    base = forked(6, 1)
    more = {**base, **regrown({n: base[n] for n in list(base)[:2]}, 9)}
    x, y = data(600)
    script = ("import sys; import test_modelsearch_forks as t, test_modelsearch_lake as l, mm_jupyter as mm\n"
              "x, y = l.data(600)\n"
              "r = l.run(t.forked(6, 1), (x[:400], y[:400]), mm.Store(sys.argv[1]))\n"
              "print(r.stats['features_computed'])\n")
    done = run_python(script, str(tmp_path / "other"))
    assert int(done.stdout.strip().splitlines()[-1]) > 0
    store = mm.Store(tmp_path / "other")
    grown = run(more, (x, y), store)
    fresh_store = mm.Store(tmp_path / "fresh")
    fresh = run(more, (x, y), fresh_store)
    same(fresh, grown)
    assert grown.stats["features_resumed"] > 0 and grown.stats["features_reused"] > 0
    assert trunk_work(grown) < trunk_work(fresh)
    assert same_features(store, fresh_store) > 0


def test_gc_frees_the_forks_too(tmp_path: Path) -> None:
    base = forked(6, 1)
    more = {**base, **regrown({n: base[n] for n in list(base)[:2]}, 9)}
    xy = data(400)
    store = mm.Store(tmp_path / "s")
    run(base, xy, store)
    oids = {load_index(store.objects)[key].oid for key in fork_keys(store, base, xy)}
    assert oids
    report = store.gc(features=True)
    assert report.objects >= len(oids) and load_index(store.objects) == {}
    assert not any(store.objects.exists(o) for o in oids)
    again = run(more, xy, store)
    assert again.stats["features_resumed"] == 0 and trunk_work(again) > 0
    same(run(more, xy, mm.Store(tmp_path / "fresh")), again)


def test_the_first_rungs_grouping_does_not_move_when_items_are_appended(tmp_path: Path) -> None:
    """250 items put the first rung at level 2 (too few items of level 3), 500 at level 3. The train
    items are still grouped the same way, so the first rung's old full chunks are read, not computed
    (beyond the test chunks); the ranking equals a fresh search's."""
    from mm_jupyter.modelsearch.api import MIN_RUNG_ITEMS
    from mm_jupyter.modelsearch.halving import schedule

    cands = {**forked(5, 1), **forked(5, 2)}
    x, y = data(500)
    bs = 8
    lays = {n: layout(x[:n], y[:n], test_fraction=0.2, seed=0, batch_size=bs) for n in (250, 500)}
    last = len(schedule(len(cands), 1, len(lays[500].train))) - 1
    tops = {n: lay.rung_levels(last, MIN_RUNG_ITEMS)[0] for n, lay in lays.items()}
    assert tops[250] < tops[500]  # the case this test is about: the first rung's level moves
    events: list[dict[str, Any]] = []
    store = mm.Store(tmp_path / "s")
    run(cands, (x[:250], y[:250]), store, batch_size=bs)
    grown = run(cands, (x, y), store, batch_size=bs, progress=events.append)
    same(run(cands, (x, y), mm.Store(tmp_path / "fresh"), batch_size=bs), grown)
    first_rung = next(e for e in events if e["event"] == "reuse" and e["rung"] == 0)
    old_test = {h for _, _, h in lays[250].test_chunks} & {h for _, _, h in lays[500].test_chunks}
    assert first_rung["reused"] > len(cands) * len(old_test)  # some of the first rung's train chunks were kept
