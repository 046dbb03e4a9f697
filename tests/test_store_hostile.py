"""A store from someone else, written by hand and recovered without ``trust_code`` (issue 19): it can
never run code, import a module this session did not import, crash or exhaust the process, or fail
with anything but one clear ``MMError``. Each attack from the issue is reproduced here, recovered in
a fresh process where it matters, with a sentinel file that any code an attack ran would write."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import hostile_models as hm
import pytest
import store_models as sm
import torch
from torch import nn

import mm_jupyter as mm
from mm_jupyter.store import trust


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    return tmp_path / "SENTINEL"


# -- 1. references name exact objects ----------------------------------------------------------------------
@pytest.mark.slow
def test_function_references_never_walk_through_module_attributes(tmp_path: Path, sentinel: Path) -> None:
    store = mm.Store(tmp_path / "s")
    refs = {  # each was resolved attribute by attribute and accepted before
        "os-system": "torch:os.system", "exec": "torch:builtins.exec", "torch-load": "torch.nn.functional:torch.load",
        "np-load": "torch.nn.functional:np.load", "hub-load": "torch.nn.functional:torch.hub.load",
        "seed": "torch.nn.functional:torch.seed", "load": "torch:load", "torch-seed": "torch:seed",
        "posix": "posix:system", "method": "torch:Tensor.numpy", "canary": "fuzz_canary:boom",
    }
    for name, ref in refs.items():
        hm.forged(store, name, mm.Architecture("structure", "x", {}, None, None,
                                                hm.identity_record([["act", {"$fn": ref}]])))
    hm.forged(store, "allowed", mm.Architecture("structure", "x", {}, None, None,
                                                hm.identity_record([["act", {"$fn": "torch.nn.functional:relu"}]])))
    store.close()
    got = hm.recover_fresh(tmp_path / "s", [*refs, "allowed"], sentinel)
    for name, ref in refs.items():
        assert "error" in got[name] and got[name]["error"].startswith("RecoveryError"), (name, got[name])
        assert "'forward'" not in got[name]["error"] and "act" in got[name]["error"], got[name]
        assert f"'{ref}'" in got[name]["error"], got[name]  # names the reference it refused
    assert got["allowed"] == {"ok": "Identity"}
    assert got["_modules"] == [] and not sentinel.exists()
    # the reviewed allow-list holds functions only under their own module and name
    assert trust.function("torch._C._nn:gelu") is torch.nn.functional.gelu
    with pytest.raises(mm.ArchitectureError, match="walks through attributes"):
        trust.function("torch.nn:functional.relu")
    with pytest.raises(mm.ArchitectureError, match="not on the allow-list"):
        trust.function("torch:save")
    with pytest.raises(mm.ArchitectureError, match="one by one"):
        mm.allow_functions("torch")  # would allow torch.load, torch.save, ...


def test_classes_must_be_the_object_they_name(tmp_path: Path) -> None:
    with pytest.raises(mm.ArchitectureError, match="defined as 'torch.nn.modules.linear:Linear'"):
        trust.module_class("torch.nn:Linear")  # a re-export: not that object's own name
    with pytest.raises(mm.ArchitectureError, match="not an nn.Module class"):
        trust.module_class("mm_jupyter.store.store:Store")  # exactly that object, but not a module class
    assert trust.module_class("torch.nn.modules.linear:Linear") is nn.Linear
    # a user's class given by a friendly path at save is recorded by its exact name
    assert mm.Architecture.factory("torch.nn:Linear", in_features=2, out_features=1).ref == \
        "torch.nn.modules.linear:Linear"


# -- 2. restored attributes are data ---------------------------------------------------------------------
@pytest.mark.slow
def test_restored_attributes_never_replace_methods_or_module_internals(tmp_path: Path, sentinel: Path) -> None:
    store = mm.Store(tmp_path / "s")
    relu = {"$fn": "torch.nn.functional:relu"}  # an allowed function: only the name is wrong
    attacks = {"forward": relu, "state_dict": relu, "_compiled_call_impl": relu, "extra_repr": "hidden",
               "__class__": "x", "__dict__": {"$dict": []}, "_forward_hooks": {"$dict": []}, "training": True,
               "_call_impl": relu, "register_buffer": relu, "weight": {"$tensor": ["float32", [2, 2], "A" * 24]}}
    linear = {"classes": ["torch.nn.modules.linear:Linear"], "source": None,
              "root": {"c": 0, "t": False, "p": [["weight", ["float32", [2, 2], True]], ["bias", ["float32", [2],
                                                                                                 True]]],
                       "b": [], "m": [], "a": [["in_features", 2], ["out_features", 2]]}}
    for attr, value in attacks.items():
        record = json.loads(json.dumps(linear))
        record["root"]["a"].append([attr, value])
        hm.forged(store, f"attr-{attr.strip('_')}", mm.Architecture("structure", "x", {}, None, None, record),
                  [nn.Linear(2, 2)])
    store.close()
    names = [f"attr-{a.strip('_')}" for a in attacks]
    got = hm.recover_fresh(tmp_path / "s", names, sentinel)
    for attr, name in zip(attacks, names):
        err = got[name].get("error", "")
        # one RecoveryError naming the set, the model and where in the record
        assert err.startswith(f"RecoveryError: cannot build model '0' of set '{name}@1'"), (name, got[name])
        assert f"attribute {attr!r}" in err and ("data, never code" in err), (name, err)
    assert not sentinel.exists()
    # saving refuses what recovery would refuse: nothing is stored that cannot be read back
    odd = nn.Linear(2, 2)
    odd.__dict__["extra_repr"] = "x"
    with pytest.raises(mm.ArchitectureError, match=r"attribute extra_repr belongs to nn.Module itself"):
        mm.Store(tmp_path / "t").save_set([odd], "odd")


@pytest.mark.slow
def test_issue_chain_on_a_bias_runs_nothing(tmp_path: Path, sentinel: Path) -> None:
    """The issue's exploit: methods of tensors chained through restored attributes until exec."""
    store = mm.Store(tmp_path / "s")
    script = f"open({str(sentinel)!r}, 'w').write('ran')"
    payload = torch.frombuffer(bytearray(script.encode()), dtype=torch.uint8)
    chain = [["forward", {"$fn": "torch:Tensor.byte"}], ["_compiled_call_impl", {"$fn": "builtins:exec"}],
             ["state_dict", {"$fn": "os:abort"}], ["extra_repr", {"$fn": "numpy:ndarray.tobytes"}]]
    record = hm.identity_record(chain)
    record["root"]["b"] = [["bias", ["uint8", [len(script)], __import__("base64").b64encode(
        payload.numpy().tobytes()).decode()]]]
    record["root"]["np"] = ["bias"]
    hm.forged(store, "chain", mm.Architecture("structure", "x", {}, None, None, record))
    store.close()
    got = hm.recover_fresh(tmp_path / "s", ["chain"], sentinel)
    assert got["chain"]["error"].startswith("RecoveryError"), got
    assert not sentinel.exists()
    # and verify() still reports the store as consistent: it checks bytes and catalog, not safety
    assert mm.Store(tmp_path / "s").verify() == []


# -- 1. modules are refused before they are imported ---------------------------------------------------------
@pytest.mark.slow
def test_modules_outside_allowed_packages_are_never_imported(tmp_path: Path, sentinel: Path) -> None:
    store = mm.Store(tmp_path / "s")
    hm.forged(store, "figure", mm.Architecture("structure", "x", {}, None, None, hm.identity_record(
        [["cls", {"$class": "matplotlib.pyplot:Figure"}]])))
    hm.forged(store, "canary", mm.Architecture("structure", "x", {}, None, None, hm.identity_record(
        [], classes=["fuzz_canary:Boom"])))
    hm.forged(store, "this", mm.Architecture("factory", "this:s"))
    store.close()
    got = hm.recover_fresh(tmp_path / "s", ["figure", "canary", "this"], sentinel)
    for name in ("figure", "canary", "this"):
        assert "refused before importing it" in got[name]["error"], got[name]
    assert got["_modules"] == [] and not sentinel.exists()
    # the canary is real: a session that allows its package imports it (and the sentinel appears)
    got = hm.recover_fresh(tmp_path / "s", ["canary"], sentinel, setup="import mm_jupyter as mm\n"
                                                                        "mm.allow_modules('fuzz_canary')")
    assert got["canary"] == {"ok": "Boom"} and sentinel.exists()


# -- 3. Hugging Face builds are literal and offline ----------------------------------------------------------
@pytest.mark.slow
def test_hugging_face_records_cannot_reach_the_hub(tmp_path: Path, sentinel: Path) -> None:
    store = mm.Store(tmp_path / "s")
    bert = "transformers.models.bert.modeling_bert:BertModel"
    small = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 20,
             "vocab_size": 50, "max_position_embeddings": 16}
    hostile = {
        "backbone": {**small, "backbone": "evil/model", "use_timm_backbone": False},
        "auto-map": {**small, "auto_map": {"AutoModel": "evil/repo--modeling.Evil"}},
        "remote-code": {**small, "trust_remote_code": True},
        "kernel": {**small, "attn_implementation": "kernels-community/flash-attn"},
        "nested": {**small, "backbone_config": {"model_type": "bert", "auto_map": {"AutoConfig": "evil/x--c.C"}}},
    }
    for name, config in hostile.items():
        hm.forged(store, name, mm.Architecture("hf", bert, {}, config))
    store.close()
    got = hm.recover_fresh(tmp_path / "s", list(hostile), sentinel)
    for name in hostile:
        assert got[name].get("error", "").startswith("RecoveryError"), (name, got[name])
        assert "hub" in got[name]["error"] or "remote code" in got[name]["error"], got[name]
    # saving refuses them too
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(**small))
    model.config.auto_map = {"AutoModel": "evil/repo--modeling.Evil"}
    with pytest.raises(mm.ArchitectureError, match="auto_map"):
        mm.Store(tmp_path / "t").save_set([model], "remote")


def test_hugging_face_builds_run_with_the_hub_offline(tmp_path: Path) -> None:
    import huggingface_hub.constants as hub
    from transformers import BertConfig

    probe = hm.HFHubProbe(BertConfig(hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=4, vocab_size=10))
    assert probe.offline_when_built is False and not hub.is_offline_mode()
    store = mm.Store(tmp_path / "s")
    ref = store.save_set([probe], "probe", architecture=mm.Architecture.hf(probe))
    got = store.recover_set(ref)[0]
    assert got.offline_when_built is True  # the hub was switched off while the record was built ...
    assert not hub.is_offline_mode()  # ... and back on afterwards
    assert sm.sd_digests(got.state_dict()) == sm.sd_digests(probe.state_dict())


# -- 4. bounded decoding -------------------------------------------------------------------------------------
def _linear_set(tmp_path: Path) -> Path:
    store = mm.Store(tmp_path / "s")
    store.save_set([sm.fill_(nn.Linear(4, 3), i) for i in range(2)], "lin")
    store.close()
    return tmp_path / "s"


@pytest.mark.slow
def test_declared_sizes_are_checked_before_anything_is_allocated(tmp_path: Path, sentinel: Path) -> None:
    root = _linear_set(tmp_path)
    cases = {}

    def shape_in_record(m: dict) -> None:  # a 4 TB weight in the structural record
        m["set"]["architecture"]["structure"]["root"]["p"][0][1][1] = [2**20, 2**20]

    def shape_in_layout(m: dict) -> None:  # the layout (and record) declare more than the object holds
        m["set"]["layout"]["keys"][0][2] = [2**20, 2**20]
        m["set"]["architecture"]["structure"]["root"]["p"][0][1][1] = [2**20, 2**20]

    def models(m: dict) -> None:
        m["set"]["n"] = 5_000_000  # under MAX_MODELS: the object size is what refuses it

    def strides(m: dict) -> None:  # 2 elements spread over 2**40 of memory
        m["set"]["architecture"]["structure"]["root"]["p"][1][1] += [[2**40]]

    def factory(m: dict) -> None:  # a constructor asked for a huge layer
        m["set"]["architecture"] = {"kind": "factory", "ref": "torch.nn.modules.linear:Linear",
                                    "kwargs": {"in_features": 2**20, "out_features": 2**20}}

    def layers(m: dict) -> None:  # a Hugging Face config asking for a million layers
        m["set"]["architecture"] = {"kind": "hf", "ref": "transformers.models.bert.modeling_bert:BertModel",
                                    "kwargs": {}, "config": {"num_hidden_layers": 10**6, "hidden_size": 4,
                                                             "num_attention_heads": 1, "intermediate_size": 4}}

    def attribute(m: dict) -> None:  # a tensor attribute the layout does not hold: never allocated
        m["set"]["architecture"]["structure"]["root"]["a"].append(
            ["cache", {"$dict": [["cpu", {"$state": ["cache#0", "float32", [2**20, 2**20]]}]]}])

    for i, edit in enumerate((shape_in_record, shape_in_layout, models, strides, factory, layers, attribute)):
        shutil.copytree(root, tmp_path / f"c{i}")
        hm.rewrite_manifest(tmp_path / f"c{i}", "lin@1", edit)
        cases[edit.__name__] = tmp_path / f"c{i}"
    limit = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))"
    expected = {"shape_in_record": "builds other tensors than the stored ones",
                "shape_in_layout": "holds 120 bytes", "models": "declares 5000000 models",
                "strides": "not a dense layout", "factory": "builds other tensors than the stored ones",
                "layers": "builds more than", "attribute": "attribute tensors are not the stored ones"}
    every = hm.recover_fresh_many({name: (path, "lin") for name, path in cases.items()}, sentinel, setup=limit)
    for name in cases:
        got = every[name]
        assert "error" in got and expected[name] in got["error"], (name, got)
        assert "allocate" not in got["error"] and "MemoryError" not in got["error"], (name, got)


def test_deep_records_and_manifests_are_refused_and_rebuild_skips_them(tmp_path: Path) -> None:
    root = _linear_set(tmp_path)

    def deep_record(m: dict) -> str:
        text = json.dumps(m, separators=(",", ":"), sort_keys=True)
        return text.replace('"in_features",4]', '"in_features",' + "[" * 950 + "]" * 950 + "]")

    def deep_manifest(m: dict) -> str:
        text = json.dumps(m, separators=(",", ":"), sort_keys=True)
        return text.replace('"names":null', '"names":' + "[" * 100_000 + "]" * 100_000)

    for name, edit, error in (("record", deep_record, "nested deeper than"),
                              ("manifest", deep_manifest, "nested deeper than")):
        path = tmp_path / name
        shutil.copytree(root, path)
        oid = hm.rewrite_manifest(path, "lin@1", edit)
        store = mm.Store(path)
        with pytest.raises(mm.MMError, match=error):
            store.recover_set("lin")[0]
        assert any(error in p for p in store.verify())
        store.close()
        # a store whose catalog is lost is still repaired by the tools: the bad manifest is skipped and reported
        (path / "catalog.sqlite").unlink()
        report = mm.Store.rebuild_catalog(path)
        assert any(oid[:12] in p and "cannot be read" in p and error in p for p in report.problems), report
        assert report.versions == 1  # the original manifest is still there: the version comes back intact
        assert mm.Store(path).recover_set("lin")[1].weight.shape == (3, 4)


def test_provenance_records_are_inflated_with_a_bound() -> None:
    import zlib

    from mm_jupyter.store.limits import inflate

    bomb = zlib.compress(b"\x00" * (64 * 2**20 + 1), 9)
    assert len(bomb) < 100_000
    with pytest.raises(mm.IntegrityError, match="expands to more than"):
        inflate(bomb, 64 * 2**20, "the record")
    assert inflate(zlib.compress(b"{}"), 10, "x") == b"{}"


# -- 7. clear errors ----------------------------------------------------------------------------------------
def test_an_update_across_a_changed_layout_names_the_tensor(tmp_path: Path) -> None:
    store = mm.Store(tmp_path / "s")
    store.save_set([nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)) for _ in range(2)], "net")
    wider = [nn.Sequential(nn.Linear(4, 9), nn.Linear(9, 2)) for _ in range(2)]
    with pytest.raises(mm.StoreError, match=r"tensor '0\.weight' is \[9, 4\] float32, in the base \[8, 4\]"):
        store.save_set(wider, "net", approach="update")
    with pytest.raises(mm.StoreError, match=r"tensor '2\.weight' is new"):
        store.save_set([nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(2, 2))], "net", approach="update")
    assert store.save_set(wider, "net", approach="auto").version == 2  # stored in full
    store.close()


def test_bad_locations_arguments_and_names_are_clear_errors(tmp_path: Path) -> None:
    for bad in ("a\x00b", 123, b"bytes", ""):
        with pytest.raises(mm.StoreError, match="store path"):
            mm.Store(bad)  # type: ignore[arg-type]
    store = mm.Store(tmp_path / "s")
    for wait in ("x", -1, float("nan"), float("inf"), True):
        with pytest.raises(mm.StoreError, match="wait_s"):
            store.gc(wait_s=wait)  # type: ignore[arg-type]
    for name in (".", "..", "...", "CON", "con", "nul.txt", "LPT1", "a.", "a ", "a/b", "a\x00b", "../x"):
        with pytest.raises(mm.StoreError, match="set name"):
            store.save_set([nn.Linear(2, 2)], name)
    assert store.save_set([nn.Linear(2, 2)], "v1.2 conv").version == 1
    assert store.sets()["name"].tolist() == ["v1.2 conv"]
    store.close()


def test_verify_reports_damaged_refs_and_gc_repairs_them(tmp_path: Path) -> None:
    store = mm.Store(tmp_path / "s")
    a = store.save_set([nn.Linear(2, 2)], "a")
    b = store.save_set([nn.Linear(2, 3)], "b")
    refs = tmp_path / "s" / "refs" / "sets"
    (refs / "a@1").write_text("")  # emptied
    oid_b = (refs / "b@1").read_text().strip()
    flipped = oid_b[:10] + ("0" if oid_b[10] != "0" else "1") + oid_b[11:]
    (refs / "b@1").write_text(flipped + "\n")  # one character flipped
    problems = store.verify()
    assert any(p.startswith("a@1: its ref file is empty or damaged") for p in problems), problems
    assert any(p.startswith("b@1: refs/ names manifest") for p in problems), problems
    report = store.gc()
    assert report.refs_written == 2 and store.verify() == []
    assert (refs / "b@1").read_text().strip() == oid_b
    assert [m.out_features for m in (store.recover_set(a)[0], store.recover_set(b)[0])] == [2, 3]
    store.close()


@pytest.mark.slow
def test_rnn_size_attributes_must_match_their_weights(tmp_path: Path, sentinel: Path) -> None:
    """An RNN allocates its initial state from hidden_size and num_layers before it checks its
    weights (found by the long fuzz run): a record whose sizes disagree with its tensors is refused
    when the model is built, before any forward; every legitimate RNN layout still recovers."""
    legit = {"lstm": lambda: nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3),
             "gru": lambda: nn.GRU(4, 5, bias=False, batch_first=True),
             "rnn": lambda: nn.RNN(3, 5, num_layers=3, nonlinearity="relu")}
    store = mm.Store(tmp_path / "s")
    for name, make in legit.items():
        models = [sm.fill_(make(), i) for i in range(2)]
        store.save_set(models, name)
        back = store.recover_set(name)
        for a, b in zip(models, back):
            assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        x = torch.randn(2, 3, 4 if name != "rnn" else 3)
        assert torch.equal(models[1](x)[0], back[1](x)[0])
    store.close()

    def attrs(m: dict) -> list:
        return m["set"]["architecture"]["structure"]["root"]["a"]

    def setting(key: str, value: object) -> Callable[[dict], None]:
        def edit(m: dict) -> None:
            for pair in attrs(m):
                if pair[0] == key:
                    pair[1] = value
        edit.__name__ = f"{key}={value}"
        return edit

    edits = [setting("hidden_size", 2**31), setting("num_layers", 2**40), setting("input_size", 2**31),
             setting("mode", "GRU"), setting("proj_size", 5), setting("bidirectional", False)]
    limit = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))"
    cases = {}
    for i, edit in enumerate(edits):
        path = tmp_path / f"c{i}"
        shutil.copytree(tmp_path / "s", path)
        hm.rewrite_manifest(path, "lstm@1", edit)
        cases[edit.__name__] = (path, "lstm")
    every = hm.recover_fresh_many(cases, sentinel, setup=limit)
    for edit in edits:
        got = every[edit.__name__]
        assert "error" in got and "not the ones its tensors were made with" in got["error"], (edit.__name__, got)
        assert "allocate" not in got["error"] and "MemoryError" not in got["error"], (edit.__name__, got)
