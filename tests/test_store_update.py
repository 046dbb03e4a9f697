"""Update chains: deltas against a base matched by model name, lineage, max_chain, and ``auto``."""
from __future__ import annotations

import pytest
import store_models as sm
import torch

import mm_jupyter as mm
from mm_jupyter.store.store import AUTO_UPDATE_MAX_CHANGED

ARCH = mm.Architecture.factory("store_models:mlp", width=64, depth=3, inputs=16)


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return sm.fill_(sm.mlp(width=64, depth=3, inputs=16), seed)


def change(m: torch.nn.Module, key: str, seed: int) -> None:
    sm.fill_(m, seed, only=[key])


def chain_versions() -> list[dict[str, torch.nn.Module]]:
    """Five versions: tensors change in each, models are added (f, g) and dropped (b, a)."""
    v1 = {n: model(i) for i, n in enumerate("abcde")}
    v2 = dict(v1)
    v2["a"], v2["b"] = model(0), model(1)
    change(v2["a"], "6.bias", 100)
    change(v2["b"], "6.bias", 101)
    v3 = {n: m for n, m in v2.items() if n != "b"}
    v3["c"] = model(2)
    change(v3["c"], "0.weight", 102)
    v3["f"] = model(5)  # new: stored in full
    v4 = dict(v3)
    v4["d"] = model(3)
    change(v4["d"], "2.bias", 103)
    v5 = {n: m for n, m in v4.items() if n != "a"}
    v5["e"] = model(4)
    change(v5["e"], "4.weight", 104)
    v5["g"] = model(6)
    return [v1, v2, v3, v4, v5]


def save_chain(store: mm.Store, name: str = "chain") -> tuple[list, list]:
    refs, want = [], []
    for v in chain_versions():
        want.append({n: sm.sd_digests(m.state_dict()) for n, m in v.items()})
        refs.append(store.save_set(v, name, approach="update", architecture=ARCH))
    return refs, want


def check_versions(store: mm.Store, refs: list, want: list[dict]) -> None:
    for ref, w in zip(refs, want):
        ms = store.recover_set(ref)
        assert ms.names == list(w), ref
        assert [sm.sd_digests(sd) for sd in ms.state_dicts()] == list(w.values()), ref
        for n in w:
            assert sm.sd_digests(ms[n].state_dict()) == w[n], (ref, n)
        ms.close()


@pytest.mark.slow
def test_chain_of_five_versions(store, store_path):
    refs, want = save_chain(store)
    assert [r.version for r in refs] == [1, 2, 3, 4, 5]
    check_versions(store, refs, want)
    report = sm.fresh_report(store_path, [str(r) for r in refs])
    for ref, w in zip(refs, want):
        got = report[str(ref)]
        assert "error" not in got, got
        assert got["names"] == list(w)
        assert got["state_dicts"] == list(w.values())
        assert got["module"] == list(w.values())

    lin = store.lineage("chain")
    assert [v.version for v in lin.versions] == [1, 2, 3, 4, 5]
    assert lin.edges == [(1, 2), (2, 3), (3, 4), (4, 5)]
    v = {x.version: x for x in lin.versions}
    assert v[1].added == () and v[1].dropped == () and v[1].base is None and v[1].chain == 0
    assert (v[2].added, v[2].dropped, v[2].changed) == ((), (), 2)  # a and b
    assert (v[3].added, v[3].dropped, v[3].changed) == (("f",), ("b",), 2)  # c changed, f new
    assert (v[4].added, v[4].dropped, v[4].changed) == ((), (), 1)  # d
    assert (v[5].added, v[5].dropped, v[5].changed) == (("g",), ("a",), 2)  # e changed, g new
    frame = lin.frame
    assert list(frame["version"]) == [1, 2, 3, 4, 5]
    assert list(frame["chain"]) == [0, 1, 2, 3, 4]
    assert list(frame["added"]) == [0, 0, 1, 0, 1]
    assert list(frame["dropped"]) == [0, 0, 1, 0, 1]
    assert set(frame["approach"]) == {"update"}
    assert "v3" in repr(lin) and "+1 models" in repr(lin)

    full = store.stats(refs[0])
    per_model = full["parameter_bytes"] // 5
    assert full["bytes"] >= full["parameter_bytes"]
    for r in (refs[1], refs[3]):  # few tensors (biases) changed: a tiny fraction of a full version
        s = store.stats(r)
        assert s["chain"] > 0
        assert s["bytes"] < full["bytes"] * 0.05, (r, s["bytes"], full["bytes"])
    s3 = store.stats(refs[2])  # model f is new: stored in full, but nothing else is
    assert per_model <= s3["bytes"] < 2 * per_model


@pytest.mark.slow
def test_max_chain_stores_a_self_contained_version(store_path):
    store = mm.Store(store_path, max_chain=2)
    refs, want = save_chain(store)
    chains = [store.stats(r)["chain"] for r in refs]
    assert chains == [0, 1, 2, 0, 1]  # the 3rd derived version is stored in full
    assert list(store.lineage("chain").frame["chain"]) == chains
    s4 = store.stats(refs[3])
    assert s4["approach"] == "update" and s4["bytes"] >= s4["parameter_bytes"]
    check_versions(store, refs, want)
    store.close()

    # version 4 really is self-contained: remove every object only versions 1-3 use
    s = mm.Store(store_path)
    keep = {oid for r in refs[3:] for _, oid, _ in s.catalog.artifacts(r.id)}
    for r in refs[:3]:
        for _, oid, _ in s.catalog.artifacts(r.id):
            if oid not in keep:
                s.objects.path(oid).unlink(missing_ok=True)
    s.close()
    report = sm.fresh_report(store_path, [str(refs[3]), str(refs[4]), str(refs[1])])
    assert report[str(refs[3])].get("state_dicts") == list(want[3].values()), report[str(refs[3])]
    assert report[str(refs[4])].get("state_dicts") == list(want[4].values()), report[str(refs[4])]
    assert report[str(refs[1])]["error"].startswith("IntegrityError")  # its base objects are gone


def test_explicit_base_and_unchanged_version(store):
    v = chain_versions()
    r1 = store.save_set(v[0], "x", approach="update", architecture=ARCH)
    r2 = store.save_set(v[1], "x", approach="update", architecture=ARCH)
    r3 = store.save_set(v[2], "x", approach="update", base="x@1", architecture=ARCH)  # branch off v1
    r4 = store.save_set(v[2], "x", approach="update", base=r3, architecture=ARCH)  # nothing changed
    assert store.lineage("x").edges == [(1, 2), (1, 3), (3, 4)]
    s4 = store.stats(r4)
    assert s4["chain"] == 2 and s4["bytes"] < 4096
    assert store.lineage("x").versions[3].changed == 0
    for ref, models in [(r1, v[0]), (r2, v[1]), (r3, v[2]), (r4, v[2])]:
        ms = store.recover_set(ref)
        assert [sm.sd_digests(sd) for sd in ms.state_dicts()] == sm.model_digests(models)


# -- auto ----------------------------------------------------------------------------------------
# The rule checked here (Store._auto, ARCHITECTURE.md): with no base version, ``auto`` stores a
# baseline; with a base (default: the latest version of the name) it compares per-tensor digests
# and stores an ``update`` when the changed tensors hold at most AUTO_UPDATE_MAX_CHANGED (half) of
# the set's parameter BYTES (models absent from the base count as fully changed), else a
# baseline. The rule weighs bytes, not tensor counts: changing one big tensor can exceed it while
# changing many small ones does not.

SPEC = [["big", "float32", [64, 64], "param"]] + [[f"s{i}", "float32", [16], "param"] for i in range(10)]
BAG = mm.Architecture.factory("store_models:param_bag", spec=SPEC)


def bag(seed: int, fresh: tuple[str, ...] = (), fresh_seed: int = 999) -> torch.nn.Module:
    m = sm.fill_(sm.param_bag(SPEC), seed)
    if fresh:
        sm.fill_(m, fresh_seed + seed, only=fresh)
    return m


def auto(store, models, name="auto", **kw) -> dict:
    ref = store.save_set(models, name, approach="auto", architecture=kw.pop("architecture", BAG), **kw)
    ms = store.recover_set(ref)
    assert [sm.sd_digests(sd) for sd in ms.state_dicts()] == sm.model_digests(models)
    return store.stats(ref)


def test_auto_rule(store):
    assert AUTO_UPDATE_MAX_CHANGED == 0.5
    base = [bag(i) for i in range(4)]
    s = auto(store, base)
    assert (s["approach"], s["requested"], s["chain"]) == ("baseline", "auto", 0)  # no base
    # 10 of 11 tensors of every model changed, but only 640 of 17024 bytes: update
    s = auto(store, [bag(i, tuple(f"s{j}" for j in range(10))) for i in range(4)])
    assert (s["approach"], s["requested"], s["chain"]) == ("update", "auto", 1)
    # 1 of 11 tensors changed, but it holds 96% of the bytes: baseline
    s = auto(store, [bag(i, ("big",)) for i in range(4)])
    assert (s["approach"], s["chain"]) == ("baseline", 0)
    # everything changed: baseline
    s = auto(store, [bag(100 + i) for i in range(4)])
    assert s["approach"] == "baseline"
    # nothing changed against the latest version: update
    s = auto(store, [bag(100 + i) for i in range(4)])
    assert s["approach"] == "update" and s["bytes"] < 4096


def test_auto_threshold_is_inclusive(store):
    spec = [["p", "float32", [32], "param"], ["q", "float32", [32], "param"]]
    arch = mm.Architecture.factory("store_models:param_bag", spec=spec)

    def m(p: float, q: float) -> torch.nn.Module:
        x = sm.param_bag(spec)
        with torch.no_grad():
            x.p.fill_(p)
            x.q.fill_(q)
        return x

    def save(models):
        return auto(store, models, name="half", architecture=arch)["approach"]

    assert save([m(0, 0), m(1, 1)]) == "baseline"
    assert save([m(10, 0), m(11, 1)]) == "update"  # exactly half of the bytes changed: update
    assert save([m(10, 20), m(12, 21)]) == "baseline"  # three quarters changed
    # models absent from the base count as changed: 2 new of 3 is too much, 1 new of 4 is not
    assert save({"0": m(10, 20), "new1": m(3, 3), "new2": m(4, 4)}) == "baseline"
    assert save({"0": m(10, 20), "new1": m(3, 3), "new2": m(4, 4), "x": m(5, 5)}) == "update"


def test_auto_respects_max_chain(store_path):
    store = mm.Store(store_path, max_chain=1)
    auto(store, [bag(i) for i in range(2)])
    s = auto(store, [bag(i, ("s0",)) for i in range(2)])
    assert (s["approach"], s["chain"]) == ("update", 1)
    s = auto(store, [bag(i, ("s1",)) for i in range(2)])
    assert s["chain"] == 0 and s["bytes"] >= s["parameter_bytes"]  # promoted to a full version
    assert list(store.lineage("auto").frame["chain"]) == [0, 1, 0]
    store.close()


def test_auto_when_the_architecture_changed(store):
    """A new architecture under an existing name: nothing to diff against, so auto stores a
    baseline (update would refuse: see test_store_input)."""
    store.save_set([sm.make("mlp", i) for i in range(2)], "arch")
    for kind in ("bn", "zerodim", "half"):  # other keys, other shapes, other dtypes
        models = [sm.make(kind, i) for i in range(2)]
        s = auto(store, models, name="arch", architecture=None)
        assert s["approach"] == "baseline", kind
    assert [v.approach for v in store.lineage("arch").versions] == ["baseline"] * 4


def test_update_matches_models_by_name_not_position(store):
    v1 = {n: model(i) for i, n in enumerate("abc")}
    store.save_set(v1, "order", approach="update", architecture=ARCH)
    v2 = {"c": v1["c"], "a": v1["a"], "b": model(1)}  # reordered, nothing changed
    r2 = store.save_set(v2, "order", approach="update", architecture=ARCH)
    assert store.stats(r2)["bytes"] < 4096 and store.lineage("order").versions[1].changed == 0
    v3 = {"b": v2["b"], "c": model(2), "a": model(0)}
    change(v3["a"], "0.weight", 7)
    r3 = store.save_set(v3, "order", approach="update", architecture=ARCH)
    assert store.lineage("order").versions[2].changed == 1
    for ref, v in ((r2, v2), (r3, v3)):
        ms = store.recover_set(ref)
        assert ms.names == list(v)
        assert [sm.sd_digests(sd) for sd in ms.state_dicts()] == sm.model_digests(v)
        assert [sm.sd_digests(ms.state_dict(n)) for n in v] == sm.model_digests(v)
        for key in ms.layout.keys:
            assert [sm.tensor_digest(x) for x in ms.stacked(key)] == [d[key] for d in sm.model_digests(v)]


@pytest.mark.slow
def test_updates_on_top_of_every_approach(store, store_path):
    """update/auto derive from baseline and mmlib-base versions too (their digests are computed
    from the stored parameters), and every version recovers bit-exactly."""
    versions = chain_versions()
    approaches = ["baseline", "update", "mmlib-base", "update", "auto"]
    refs = [store.save_set(v, "mixed", approach=a, architecture=ARCH) for v, a in zip(versions, approaches)]
    stats = [store.stats(r) for r in refs]
    assert [s["approach"] for s in stats] == ["baseline", "update", "mmlib-base", "update", "update"]
    assert [s["chain"] for s in stats] == [0, 1, 0, 1, 2]
    # every version follows the previous one, whatever stored it (the mmlib-base copy too)
    assert store.lineage("mixed").edges == [(1, 2), (2, 3), (3, 4), (4, 5)]
    report = sm.fresh_report(store_path, [str(r) for r in refs])
    for r, v in zip(refs, versions):
        assert report[str(r)].get("state_dicts") == sm.model_digests(v), report[str(r)]
        assert report[str(r)]["names"] == list(v)


# -- the save path's shortcuts, each against the plain computation ---------------------------------
def test_fast_digests_equal_the_plain_tensor_digest():
    """``digest_rows`` hashes straight from each tensor's memory; it must give exactly the digests
    of the plain path for every dtype, empty tensors, offset views and storables made from
    non-contiguous or negated tensors."""
    from mm_jupyter.store.tensors import Layout, _as_storable, digest_rows, spec_of, tensor_digest

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    cplx = torch.randn(3, 2, dtype=torch.complex64, generator=g)
    tensors = {
        "f32": torch.randn(5, 7, generator=g), "f64": torch.randn(3, dtype=torch.float64, generator=g),
        "bf16": torch.randn(4, 4, generator=g).to(torch.bfloat16), "i64": torch.arange(9),
        "bool": torch.rand(11, generator=g) > 0.5, "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5),
        "offset": base[2:4],  # a contiguous view into the middle of a storage
        "transposed": base.t(), "negated": cplx.conj().imag, "conj": cplx.conj(),
    }
    rows_in = [tensors, {k: (t + 1 if t.dtype is not torch.bool else ~t) for k, t in tensors.items()}]
    rows = [[_as_storable(t, k) for k, t in r.items()] for r in rows_in]
    layout = Layout.of([spec_of(k, t) for k, t in zip(tensors, rows[0])])
    got = digest_rows(rows, layout)
    assert got.shape == (2, len(tensors), 16)
    for i, r in enumerate(rows_in):
        for k, t in enumerate(r.values()):
            plain = tensor_digest(t.resolve_conj().resolve_neg().contiguous())
            assert bytes(got[i, k]) == plain, list(tensors)[k]


def test_update_sees_in_place_edits_that_keep_identity_and_version_counter(store):
    """An Update compares every tensor's bytes (by digest): edits through ``.data`` or numpy keep the
    tensor object and its ``_version`` counter, so neither may be taken as proof of "unchanged"."""
    models = {n: model(i) for i, n in enumerate("abc")}
    store.save_set(models, "edits", approach="update", architecture=ARCH)
    w = models["a"].get_parameter("0.weight")
    b = models["c"].get_parameter("6.bias")
    versions = (w._version, b._version)
    with torch.no_grad():
        w.data.add_(1.0)  # .data has its own version counter
        b.detach().numpy()[0] += 1.0  # numpy writes bump no counter at all
    assert (w._version, b._version) == versions
    ref = store.save_set(models, "edits", approach="update", architecture=ARCH)
    assert store.lineage("edits").versions[1].changed == 2
    ms = store.recover_set(ref)
    assert [sm.sd_digests(sd) for sd in ms.state_dicts()] == sm.model_digests(models)
    ms.close()


def test_auto_hashes_the_set_once(store, monkeypatch):
    """``auto`` decides by the digests and ``update`` stores them: one hashing pass per save."""
    from mm_jupyter.store.approaches import common

    models = {n: model(i) for i, n in enumerate("abc")}
    store.save_set(models, "once", approach="update", architecture=ARCH)
    change(models["b"], "6.bias", 7)
    calls = []
    real = common.digest_rows
    monkeypatch.setattr(common, "digest_rows", lambda rows, layout: calls.append(1) or real(rows, layout))
    ref = store.save_set(models, "once", approach="auto", architecture=ARCH)
    assert store.stats(ref)["approach"] == "update" and len(calls) == 1
    ms = store.recover_set(ref)
    assert [sm.sd_digests(sd) for sd in ms.state_dicts()] == sm.model_digests(models)
    ms.close()
