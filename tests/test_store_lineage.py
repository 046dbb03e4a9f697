"""Lineage follows the user: a new version of a stored name records the previous version as its parent
whatever approach stores it; the edge lives in the manifest, so a rebuilt catalog has it too; ``auto``
records why it chose; a missing version's error lists the versions there are."""
from __future__ import annotations

import pytest
import store_models as sm
import torch

import mm_jupyter as mm

ARCH = mm.Architecture.factory("store_models:mlp", width=16, depth=2, inputs=4)


def models(seed: int, n: int = 3) -> dict[str, torch.nn.Module]:
    return {f"m{i}": sm.fill_(sm.mlp(width=16, depth=2, inputs=4), 100 * seed + i) for i in range(n)}


def retrained(base: dict[str, torch.nn.Module], seed: int, which: tuple[str, ...] = ("m1",)) -> dict:
    out = dict(base)
    for name in which:
        out[name] = sm.fill_(sm.mlp(width=16, depth=2, inputs=4), 1000 + seed)
    return out


@pytest.mark.parametrize("approach", ["baseline", "mmlib-base", "update", "auto"])
def test_a_new_version_records_the_previous_one_whatever_stores_it(store, approach):
    v1, v2 = models(1), retrained(models(1), 2)
    r1 = store.save_set(v1, "cells", approach="baseline", architecture=ARCH)
    r2 = store.save_set(v2, "cells", approach=approach, architecture=ARCH)
    row = store.row(r2)
    assert row.base_id == r1.id
    assert store.lineage("cells").edges == [(1, 2)]
    assert store.lineage("cells").versions[1].base == 1
    assert (row.chain == 0) == (approach in ("baseline", "mmlib-base"))  # a full copy: an edge, not a base
    for ref, want in ((r1, v1), (r2, v2)):
        ms = store.recover_set(ref)
        assert [sm.sd_digests(sd) for sd in ms.state_dicts()] == sm.model_digests(want)
        ms.close()
    assert store.verify() == []


def test_an_explicit_base_is_the_parent_and_other_names_start_fresh(store):
    store.save_set(models(1), "cells", architecture=ARCH)
    store.save_set(models(2), "cells", architecture=ARCH)
    store.save_set(models(3), "cells", base="cells@1", architecture=ARCH)  # a branch off v1
    store.save_set(models(4), "other", architecture=ARCH)
    assert store.lineage("cells").edges == [(1, 2), (1, 3)]
    assert store.lineage("other").edges == []


def test_rebuild_restores_the_edges_of_full_copies(store_path):
    store = mm.Store(store_path)
    for seed, approach in enumerate(["baseline", "baseline", "mmlib-base", "update", "baseline"]):
        store.save_set(retrained(models(1), seed), "cells", approach=approach, architecture=ARCH)
    before = store.lineage("cells").frame
    store.close()
    (store_path / "catalog.sqlite").unlink()
    report = mm.Store.rebuild_catalog(store_path)
    assert report.problems == [] and report.versions == 5
    store = mm.Store(store_path)
    assert store.lineage("cells").edges == [(1, 2), (2, 3), (3, 4), (4, 5)]
    assert store.lineage("cells").frame.equals(before)
    assert store.verify() == []
    store.close()


def test_a_lost_parent_costs_only_the_edge_of_a_full_copy(store_path):
    """The parent's manifest is gone (a damaged disk): rebuilding restores the self-contained child
    without its lineage edge and says so; verify reports the lost edge; the child recovers exactly."""
    store = mm.Store(store_path)
    r1 = store.save_set(models(1), "cells", architecture=ARCH)
    v2 = models(2)
    r2 = store.save_set(v2, "cells", architecture=ARCH)
    lost = store.row(r1).manifest_oid
    store.close()
    store_path.joinpath("objects", lost[:2], lost).unlink()
    (store_path / "catalog.sqlite").unlink()
    report = mm.Store.rebuild_catalog(store_path)
    assert report.versions == 1
    assert any("cells@2" in p and "restored without that lineage edge" in p for p in report.problems), report
    store = mm.Store(store_path)
    assert store.lineage("cells").edges == []
    assert any("lineage edge to it is lost" in p for p in store.verify())
    ms = store.recover_set(r2)
    assert [sm.sd_digests(sd) for sd in ms.state_dicts()] == sm.model_digests(v2)
    ms.close()
    store.close()


def test_auto_records_why_it_chose(store):
    v1 = models(1, n=4)
    store.save_set(v1, "cells", approach="auto", architecture=ARCH)
    assert store.stats("cells@1")["why"] == "the first version of 'cells'"
    store.save_set(retrained(v1, 2), "cells", approach="auto", architecture=ARCH)
    s = store.stats("cells@2")
    assert s["approach"] == "update"
    assert s["why"] == ("1 of 4 models changed against cells@1, 25% of the parameter bytes (at most 50%): "
                        "a delta saves space")
    store.save_set(models(3, n=4), "cells", approach="auto", architecture=ARCH)
    s = store.stats("cells@3")
    assert s["approach"] == "baseline" and s["why"].startswith("4 of 4 models changed against cells@2, 100% ")
    assert s["why"].endswith("(more than 50%): a delta would save little")
    store.save_set(models(4), "cells", approach="baseline", architecture=ARCH)
    assert store.stats("cells@4")["why"] is None  # as asked: nothing to explain


def test_a_promoted_version_says_why(store_path):
    store = mm.Store(store_path, max_chain=1)
    store.save_set(models(1), "c", architecture=ARCH)
    store.save_set(retrained(models(1), 2), "c", approach="update", architecture=ARCH)
    store.save_set(retrained(models(1), 3), "c", approach="update", architecture=ARCH)
    s = store.stats("c@3")
    assert s["chain"] == 0 and s["why"] == "c@2 ends a chain of 1 derived version(s), max_chain=1: stored in full"
    assert store.lineage("c").edges == [(1, 2), (2, 3)]
    store.close()


def test_a_missing_version_lists_the_versions_there_are(store):
    for seed in range(3):
        store.save_set(models(seed), "cells", architecture=ARCH)
    store.save_set(models(9), "cells", approach="update", architecture=ARCH)
    with pytest.raises(mm.RefError, match=r"no version 7 of set 'cells' in store .*; its versions: 1-4$"):
        store.recover_set("cells@7")
    with pytest.raises(mm.RefError, match=r"no set 'nope@1' .*; stored sets: cells$"):
        store.row("nope@1")
