"""A store written by an earlier release opens unchanged: tests/data/store_v0 was written before the packages
``mm_jupyter.search``/``mm_jupyter.serve`` became ``modelsearch``/``serving``, so its records name the old modules
(a factory, a block class, stored candidates). Recovery must be bit-exact and a new version must build on it."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mm_jupyter as mm

DATA = Path(__file__).resolve().parent / "data"


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, t in model.state_dict().items():
        h.update(k.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    path = tmp_path / "store_v0"
    shutil.copytree(DATA / "store_v0", path)
    return path


def test_the_fixture_names_the_old_packages() -> None:
    raw = b"".join(p.read_bytes() for p in (DATA / "store_v0" / "objects").rglob("*") if p.is_file())
    assert b"mm_jupyter.search.synthetic:digits_cnn" in raw and b"mm_jupyter.search.hf:GlobalMean" in raw


@pytest.mark.slow
def test_an_old_store_verifies_and_recovers_bit_exactly_in_a_fresh_process(legacy: Path) -> None:
    code = f"""
import hashlib, json, sys, torch, mm_jupyter as mm
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from test_store_legacy import digest
store = mm.Store({str(legacy)!r})
assert store.verify() == [], store.verify()
expected = json.loads(open({str(DATA / "store_v0.expected.json")!r}).read())
for ref, digests in expected.items():
    ms = store.recover_set(ref)
    assert [digest(ms[i]) for i in range(len(ms))] == digests, ref
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


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
