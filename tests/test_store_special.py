"""Every failure a user can cause is one clear MMError: stray and special files in the store's
folders, out-of-range references, unknown tensor keys, bad candidate set names."""
from __future__ import annotations

import json
import os

import pytest
import store_models as sm
import torch

import mm_jupyter as mm
from mm_jupyter.modelsearch.stored import add_candidates

ARCH = mm.Architecture.factory("store_models:mlp", width=8, depth=2, inputs=4)


@pytest.fixture
def saved(store):
    ref = store.save_set({"a": sm.fill_(sm.mlp(), 1), "b": sm.fill_(sm.mlp(), 2)}, "mlp", architecture=ARCH)
    return store, ref


def test_stray_files_in_tmp_are_left_alone(saved):
    store, ref = saved
    tmp = store.root / "tmp"
    strays = {"notes.txt": "x", "123.part": "y", "abc-def.part": "z", f"{'0' * 32}-{'1' * 32}.part.bak": "w"}
    for name, text in strays.items():
        (tmp / name).write_text(text)
    os.mkfifo(tmp / f"{'a' * 32}-{'b' * 32}.part")  # a FIFO named like a temp file: never opened
    os.mkdir(tmp / "folder")
    store2 = mm.Store(store.root)
    assert store2.save_set({"a": sm.fill_(sm.mlp(), 3)}, "other", architecture=ARCH).version == 1
    store2.gc()
    assert {p.name: p.read_text() for p in tmp.iterdir() if p.is_file() and not p.is_fifo()} == strays
    assert store2.verify() == []
    store2.close()


SPECIAL = r"""
import json, sys
import mm_jupyter as mm
store = mm.Store(sys.argv[1])
out = {}
for what, call in (("recover", lambda: store.recover_set("mlp").state_dicts()), ("verify", store.verify)):
    try:
        out[what] = repr(call())
    except mm.MMError as e:
        out[what] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


@pytest.mark.parametrize("kind", ["fifo", "symlink", "folder"])
def test_special_file_in_place_of_an_object(saved, kind):
    store, ref = saved
    path = store.objects.path(store.row(ref).manifest["params"])
    target = path.with_suffix(".real")
    path.rename(target)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to(target)
    else:
        path.mkdir()
    # in a subprocess with a timeout: opening a FIFO for reading would hang this test forever
    out = json.loads(sm.run_python(SPECIAL, str(store.root), timeout=120).stdout)
    assert out["recover"].startswith("IntegrityError") and "not a regular file" in out["recover"] or (
        kind == "symlink" and "symbolic link" in out["recover"]), out
    assert path.name[:12] in out["verify"], out
    if kind == "folder":
        path.rmdir()
    else:
        path.unlink()
    target.rename(path)
    assert store.verify() == []


def test_special_file_in_place_of_the_catalog(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    os.mkfifo(root / "catalog.sqlite")
    with pytest.raises(mm.StoreError, match="not a regular file"):
        mm.Store(root)


def test_numbers_too_large_for_the_catalog(saved):
    store, ref = saved
    for bad in ("mlp@99999999999999999999", "mlp@9223372036854775808", "mlp@0"):
        with pytest.raises(mm.RefError, match="no version .* of set .mlp.*; its versions: 1$"):
            store.recover_set(bad)
    for bad in (mm.SetRef(ref.id, "mlp", 2**70), mm.SetRef(2**80, "mlp", 1), mm.SetRef(ref.id, "mlp", True)):
        with pytest.raises(mm.RefError):
            store.recover_set(bad)
    with pytest.raises(mm.RefError):
        store.save_set({"a": sm.mlp()}, "mlp", approach="update", base="mlp@99999999999999999999",
                       architecture=ARCH)


def test_unknown_tensor_keys(saved):
    store, ref = saved
    ms = store.recover_set(ref)
    assert ms.stacked("0.weight").shape == (2, 8, 4)
    assert torch.equal(ms.stacked(-1), ms.stacked("4.bias"))
    for bad in ("nope", 99, -99, True, 1.0, None):
        with pytest.raises(mm.StoreError, match="has no tensor"):
            ms.stacked(bad)


@pytest.mark.parametrize("name", ["", "a/b", "../x", "x" * 201, " lead", None, 3])
def test_bad_candidate_set_names(store, name):
    with pytest.raises(mm.SearchError, match="candidate set name"):
        add_candidates(store, [sm.mlp()], name, architectures={"0": ARCH})
    assert not (store.root / "refs" / "candidates").exists() or not list((store.root / "refs" / "candidates").iterdir())
