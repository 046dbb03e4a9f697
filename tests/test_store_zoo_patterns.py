"""The structural record holds every kind of state zoo models carry (issue 20, deliverable 1): enum
members, tensors and dicts of tensors in plain attributes (stored per model, compared by structure),
and Hugging Face models whose constructor edits their config (recorded structurally when the config
record is not idempotent). Sets of 3 and an update version, recovered in a fresh process: state
bit-exact (attribute tensors included) and outputs equal."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import store_models as sm
import torch
import zoo_patterns as zp

import mm_jupyter as mm

MODELS = 3

FRESH = r"""
import json, sys
import mm_jupyter as mm
import zoo_patterns as zp
store = mm.Store(sys.argv[1])
out = {}
for ref in sys.argv[2:]:
    try:
        ms = store.recover_set(ref)
        models = [ms[i] for i in range(len(ms))]
        out[ref] = {"state": [zp.full_state(m, ms.layout.keys) for m in models],
                    "stored": [{k: zp.digest(t) for k, t in ms.state_dict(i).items()} for i in range(len(ms))],
                    "outputs": [zp.outputs(m, ref.split("@")[0]) for m in models],
                    "types": [type(m).__qualname__ for m in models], "kind": ms.architecture.kind}
    except mm.MMError as e:
        out[ref] = {"error": f"{type(e).__name__}: {e}"}
print(json.dumps(out))
"""


def _changed(models: list[torch.nn.Module], name: str) -> list[torch.nn.Module]:
    """The update version: model 1 retrained (its parameters shifted), then run in eval mode again,
    so caches it fills in eval hold the new values."""
    with torch.no_grad():
        for p in list(models[1].parameters())[:2]:
            p.add_(0.5)
    for m in models:
        cache_holders = [mod for mod in m.modules() if getattr(mod, "attention_bias_cache", None)]
        for mod in cache_holders:  # what train() would do: the cache is derived from the parameters
            mod.attention_bias_cache = {}
        zp.outputs(m, name)
    return models


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    root = tmp_path_factory.mktemp("patterns") / "store"
    store = mm.Store(root)
    want: dict[str, dict] = {}
    for name in zp.PATTERNS:
        models = [zp.build(name, seed) for seed in range(MODELS)]
        for approach in ("baseline", "update"):
            if approach == "update":
                models = _changed(models, name)
            ref = store.save_set(models, name, approach=approach)
            assert store.row(ref).approach == approach
            keys = [k for k, _, _ in store.row(ref).manifest["layout"]["keys"]]
            want[str(ref)] = {"state": [zp.full_state(m, keys) for m in models],
                              "outputs": [zp.outputs(m, name) for m in models],
                              "types": [type(m).__qualname__ for m in models],
                              "kind": store.row(ref).manifest["architecture"]["kind"], "keys": keys}
    store.close()
    return root, want


@pytest.mark.slow
def test_every_pattern_recovers_bit_exactly_in_a_fresh_process(saved: tuple[Path, dict[str, dict]]) -> None:
    root, want = saved
    got = json.loads(sm.run_python(FRESH, str(root), *want, timeout=600).stdout)
    for ref, w in want.items():
        g = got[ref]
        assert "error" not in g, (ref, g.get("error"))
        assert g["state"] == w["state"], f"{ref}: state differs"
        assert g["stored"] == w["state"], f"{ref}: the stored tensors are not the models' state"
        assert g["outputs"] == w["outputs"], f"{ref}: outputs differ"
        assert g["types"] == w["types"] and g["kind"] == w["kind"] == "structure", ref


def test_what_each_record_holds(saved: tuple[Path, dict[str, dict]]) -> None:
    root, want = saved
    store = mm.Store(root)
    record = json.dumps(store.row("enum-vit@1").manifest["architecture"])
    assert '{"$enum": ["zoo_patterns:Format", "NLC"]}' in record  # by class and member name
    assert '{"$tuple": [{"$enum": ["zoo_patterns:Format", "NCHW"]}' in record
    cache = [k for k in want["cache-levit@1"]["keys"] if "#" in k]
    assert cache == ["blocks.0.attention_bias_cache#0", "blocks.1.attention_bias_cache#0"]
    assert [k for k in want["tensor-attributes@1"]["keys"] if "#" in k] == [
        "temperature#0", "anchors#0", "anchors#1", "table#0", "table#1"]
    # the per-model caches differ (their models were trained differently) and each is stored
    stored = [want["cache-levit@1"]["state"][i]["blocks.0.attention_bias_cache#0"] for i in range(MODELS)]
    assert len(set(stored)) == MODELS
    # an update stores only what changed: model 1's parameters and its recomputed caches
    stats = store.stats("cache-levit@2")
    assert stats["approach"] == "update" and stats["bytes"] < store.stats("cache-levit@1")["bytes"]
    # LevitModel appends to config.down_ops while it is built: recorded by its tree, config exactly as saved
    ms = store.recover_set("hf-levit-config-edit@1")
    assert ms.architecture.kind == "structure"
    assert ms[0].config.down_ops == [["Subsample", 8, 2, 4, 2, 2], ["Subsample", 8, 4, 4, 2, 2], [""]]
    store.close()


def test_a_one_model_set_keeps_its_config(tmp_path: Path) -> None:
    """The issue's reproduction: even one LevitModel came back with a changed config."""
    import transformers

    store = mm.Store(tmp_path / "s")
    models = [transformers.LevitModel(zp.levit_config()), transformers.LevitModel(zp.levit_config())]
    ref = store.save_set(models, "l")
    one = store.save_set([transformers.LevitModel(zp.levit_config())], "one")
    for r, m in ((ref, models[0]), (one, None)):
        got = store.recover_set(r)[0]
        assert got.config.to_dict() == (m or models[0]).config.to_dict()
        assert sm.sd_digests(got.state_dict()) == sm.sd_digests((m or got).state_dict())
    # the record of an idempotent model stays a config record (nothing changes for it)
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=8, vocab_size=20))
    assert store.row(store.save_set([bert], "bert")).manifest["architecture"]["kind"] == "hf"
    store.close()


def test_attribute_state_is_compared_by_structure_not_value(tmp_path: Path) -> None:
    store = mm.Store(tmp_path / "s")
    a, b = zp.build("cache-levit", 0), zp.build("cache-levit", 1)
    store.save_set([a, b], "ok")  # different caches: fine, both stored
    c = zp.build("cache-levit", 2)
    c.blocks[0].attention_bias_cache = {}  # never ran in eval: no cache
    with pytest.raises(mm.ArchitectureError, match=r"attribute blocks\.0\.attention_bias_cache differs"):
        store.save_set([a, c], "mixed")
    d = zp.build("enum-vit", 0)
    e = zp.build("enum-vit", 1)
    e.patch_embed.output_fmt = zp.Format.NHWC
    with pytest.raises(mm.ArchitectureError, match=r"attribute patch_embed\.output_fmt differs"):
        store.save_set([d, e], "formats")
    f = zp.build("tensor-attributes", 0)
    g = zp.build("tensor-attributes", 1)
    g.anchors[1] = g.anchors[1].float()  # another dtype: another layout
    with pytest.raises(mm.ArchitectureError, match=r"attribute anchors differs"):
        store.save_set([f, g], "dtypes")
    store.close()


@pytest.mark.slow
def test_an_enum_of_a_module_nobody_imported_is_refused_before_import(tmp_path: Path) -> None:
    """Enum classes pass the same gate as every class: imported or in an allowed package."""
    import hostile_models as hm

    store = mm.Store(tmp_path / "s")
    record = hm.identity_record([["fmt", {"$enum": ["zoo_patterns:Format", "NLC"]}]])
    hm.forged(store, "fmt", mm.Architecture("structure", "x", {}, None, None, record))
    store.close()
    code = ("import sys, mm_jupyter as mm\n"
            "if len(sys.argv) > 2: import zoo_patterns\n"
            "try:\n    print(mm.Store(sys.argv[1]).recover_set('fmt')[0].fmt)\n"
            "except mm.MMError as e:\n    print(type(e).__name__, e)\n"
            "print('zoo_patterns' in sys.modules)")
    out = sm.run_python(code, str(tmp_path / "s")).stdout
    assert "attribute 'fmt'" in out and "refused before importing it" in out and out.strip().endswith("False"), out
    assert sm.run_python(code, str(tmp_path / "s"), "import").stdout.split() == ["Format.NLC", "True"]
