"""A store written by an earlier release opens unchanged: tests/data/store_v0 was written before the packages
``mm_jupyter.search``/``mm_jupyter.serve`` became ``modelsearch``/``serving``, so its records name the old modules
(a factory, a block class, stored candidates). Recovery must be bit-exact and a new version must build on it."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import zygote

import mm_jupyter as mm

DATA = Path(__file__).resolve().parent / "data"


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, t in model.state_dict().items():
        h.update(k.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def copied(tmp_path: Path, name: str) -> Path:
    """A writable copy of the store ``tests/data/<name>`` (the committed one stays as it was written)."""
    path = tmp_path / name
    shutil.copytree(DATA / name, path)
    return path


def raw_objects(name: str) -> bytes:
    """Every object of the store ``tests/data/<name>``, concatenated (to check what its records name)."""
    return b"".join(p.read_bytes() for p in (DATA / name / "objects").rglob("*") if p.is_file())


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    return copied(tmp_path, "store_v0")


def test_the_fixture_names_the_old_packages() -> None:
    raw = raw_objects("store_v0")
    assert b"mm_jupyter.search.synthetic:digits_cnn" in raw and b"mm_jupyter.search.hf:GlobalMean" in raw


def recovers_in_a_fresh_process(store: Path, expected: Path, check: str = "") -> None:
    """In a new interpreter (nothing imported but what recovery imports): the store verifies and every
    set in ``expected`` recovers bit-exactly; then ``check`` (Python code) holds."""
    code = f"""
import json, sys, mm_jupyter as mm
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from test_store_legacy import digest
store = mm.Store({str(store)!r})
assert store.verify() == [], store.verify()
expected = json.loads(open({str(expected)!r}).read())
for ref, digests in expected.items():
    ms = store.recover_set(ref)
    assert [digest(ms[i]) for i in range(len(ms))] == digests, ref
{check}
print("ok")
"""
    out = zygote.run(code, cwd=os.getcwd(), env=dict(os.environ), timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.slow
def test_an_old_store_verifies_and_recovers_bit_exactly_in_a_fresh_process(legacy: Path) -> None:
    recovers_in_a_fresh_process(legacy, DATA / "store_v0.expected.json")


def test_a_new_version_builds_on_an_old_one(legacy: Path) -> None:
    store = mm.Store(legacy)
    models = list(store.recover_set("cnn"))
    with torch.no_grad():
        models[1][-1].bias.add_(1.0)
    ref = store.save_set(models, "cnn", approach="update")
    assert store.sets().set_index(["name", "version"]).loc[("cnn", 2), "approach"] == "update"
    again = store.recover_set(ref)
    assert [digest(m) for m in again] == [digest(m) for m in models]
    assert store.verify() == []


def test_old_stored_candidates_are_searched(legacy: Path) -> None:
    store = mm.Store(legacy)
    cands = mm.load_candidates(store, "cands")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 5, generator=gen), torch.randint(0, 2, (96,), generator=gen)
    result = mm.search(cands, (x, y), k=1, approach="alsatian")
    shift = mm.search(mm.load_candidates(store, "cands"), (x, y), k=1, approach="shift")
    assert list(result.ranking["model"]) == list(shift.ranking["model"])
    assert sorted(result.ranking["model"]) == ["a", "b"]


# -- store_v1: written before the candidate-set generator moved out of the core ---------------------
# tests/data/store_v1 was written by tests/data/store_v1.make.py with mm_jupyter at ced9df8, when the
# paper's model factories lived in mm_jupyter.modelsearch.synthetic; they are now in usecases.candidates
# (the generator in bench.synthetic), and store.trust.MOVED_OBJECTS maps exactly those objects.


@pytest.fixture
def legacy_v1(tmp_path: Path) -> Path:
    return copied(tmp_path, "store_v1")


def test_store_v1_names_the_old_module_which_is_gone() -> None:
    import importlib.util

    raw = raw_objects("store_v1")
    assert b"mm_jupyter.modelsearch.synthetic:base_model" in raw
    assert b"mm_jupyter.modelsearch.synthetic:digits_cnn" in raw
    assert importlib.util.find_spec("mm_jupyter.modelsearch.synthetic") is None


def test_moved_objects_map_exactly_those_objects() -> None:
    from mm_jupyter.store import trust

    assert trust.split_ref("mm_jupyter.modelsearch.synthetic:digits_cnn") == ("mm_jupyter.usecases.candidates",
                                                                              "digits_cnn")
    assert trust.split_ref("mm_jupyter.search.synthetic:base_model") == ("mm_jupyter.usecases.candidates",
                                                                         "base_model")
    # any other name of the old module stays where the record says: no pattern, nothing guessed
    assert trust.split_ref("mm_jupyter.modelsearch.synthetic:sample_data") == ("mm_jupyter.modelsearch.synthetic",
                                                                               "sample_data")
    with pytest.raises(mm.ArchitectureError):
        trust.lookup("mm_jupyter.modelsearch.synthetic:sample_data", "factory")
    for old, new in trust.MOVED_OBJECTS.items():  # every target is that very object in its new module
        mod, name = new.split(":")
        obj = trust.lookup(old, "object")
        assert (obj.__module__, obj.__qualname__) == (mod, name)


@pytest.mark.slow
def test_store_v1_verifies_and_recovers_bit_exactly_in_a_fresh_process(legacy_v1: Path) -> None:
    expected = DATA / "store_v1.expected.json"
    assert sorted(json.loads(expected.read_text())) == ["digits@1", "digits@2", "mlp@1"]
    recovers_in_a_fresh_process(legacy_v1, expected, "assert 'mm_jupyter.modelsearch.synthetic' not in sys.modules")


def test_store_v1_builds_on_and_searches_its_old_records(legacy_v1: Path) -> None:
    from mm_jupyter.usecases.candidates import MLP_FEATURES

    store = mm.Store(legacy_v1)
    models = list(store.recover_set("digits"))
    with torch.no_grad():
        models[0][0].bias.add_(1.0)
    ref = store.save_set(models, "digits", approach="update")
    assert [digest(m) for m in store.recover_set(ref)] == [digest(m) for m in models]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, MLP_FEATURES, generator=gen), torch.randint(0, 3, (96,), generator=gen)
    result = mm.search(mm.load_candidates(store, "cands"), (x, y), k=1, approach="alsatian")
    shift = mm.search(mm.load_candidates(store, "cands"), (x, y), k=1, approach="shift")
    assert list(result.ranking["model"]) == list(shift.ranking["model"]) and len(result.ranking) == 3
    assert store.verify() == []
    store.close()
