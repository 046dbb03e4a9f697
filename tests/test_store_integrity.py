"""Integrity: any flipped byte, truncation or deletion of any object is detected, never returned."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import store_models as sm
import torch

import mm_jupyter as mm
from mm_jupyter.store.objects import header_size_for

ARCH = mm.Architecture.factory("store_models:mlp", width=48, depth=2, inputs=8)


def models(seed: int, n: int = 3) -> dict[str, torch.nn.Module]:
    return {f"m{i}": sm.fill_(sm.mlp(width=48, depth=2, inputs=8), seed * 10 + i) for i in range(n)}


def build(root: Path) -> dict[str, list[dict[str, str]]]:
    """A store with every approach and object role: baseline, mmlib-base (params, architecture
    and environment records), update full (params, digests) and derived (index, delta), auto, and
    a big baseline object that spans several chunks."""
    store = mm.Store(root)
    want = {}

    def save(ms, name, approach, **kw):
        ref = store.save_set(ms, name, approach=approach, architecture=kw.pop("architecture", ARCH), **kw)
        want[str(ref)] = sm.model_digests(ms)

    save(models(1), "base", "baseline")
    save(models(2, 2), "mmlib", "mmlib-base")
    save(models(3), "upd", "update")
    v2 = models(3)
    sm.fill_(v2["m1"], 77, only=["2.bias"])
    v2["m9"] = sm.fill_(sm.mlp(width=48, depth=2, inputs=8), 999)
    save(v2, "upd", "update")
    save(models(4), "auto", "auto")
    big = [sm.fill_(sm.mlp(width=200, depth=2, inputs=8), i) for i in range(12)]  # ~2 MB: many chunks
    save(big, "big", "baseline", architecture=mm.Architecture.factory("store_models:mlp", width=200, inputs=8))
    store.close()
    return want


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("integrity") / "store"
    want = build(root)
    return root, want


def object_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "objects").rglob("*") if p.is_file())


def recover_all(root: Path, want: dict, refs: set[str] | None = None, modules: bool = True) -> dict[str, str]:
    """Full recovery of every set (or those in ``refs``) with a fresh Store: 'ok', or the
    IntegrityError. Anything else (a wrong result, another exception) fails the test."""
    store = mm.Store(root)
    out = {}
    try:
        for ref, digests in want.items():
            if refs is not None and ref not in refs:
                continue
            try:
                ms = store.recover_set(ref).load()
                got = [sm.sd_digests(sd) for sd in ms.state_dicts()]
                built = [sm.sd_digests(ms[i].state_dict()) for i in range(len(ms))] if modules else got
            except mm.IntegrityError as e:
                out[ref] = f"IntegrityError: {e}"
                continue
            assert got == digests, f"{ref}: corrupted store returned wrong data silently"
            assert built == digests, f"{ref}: corrupted store built wrong modules silently"
            out[ref] = "ok"
        out["verify"] = "; ".join(store.verify())
    finally:
        store.close()
    return out


def users(root: Path) -> dict[str, set[str]]:
    """Which sets list each object among their own artifacts."""
    store = mm.Store(root)
    out: dict[str, set[str]] = {}
    for name, version, *_ in store.catalog.listing():
        row = store.row(f"{name}@{version}")
        for oid in [row.manifest_oid] + [oid for _, oid, _ in store.catalog.artifacts(row.id)]:
            out.setdefault(oid, set()).add(f"{name}@{version}")
    store.close()
    return out


def dependents(refs: set[str], want: dict) -> set[str]:
    """``refs`` plus every later version of the same names (derived versions read their bases)."""
    out = set(refs)
    for ref in refs:
        name, version = ref.split("@")
        out |= {r for r in want if r.split("@")[0] == name and int(r.split("@")[1]) >= int(version)}
    return out


def positions(size: int, payload: int) -> list[int]:
    """Header (magic, sizes, digests, padding) and payload start/middle/end."""
    h = size - payload
    cand = [0, 7, 8, 16, 20, 24, h - 1, h, h + payload // 2, size - 1]
    return sorted({p for p in cand if 0 <= p < size})


@pytest.mark.slow
def test_every_flipped_byte_is_detected(pristine, tmp_path):
    src, want = pristine
    root = tmp_path / "store"
    shutil.copytree(src, root)
    assert all(v == "ok" for k, v in recover_all(root, want).items() if k != "verify")
    who = users(root)
    files = object_files(root)
    # 1 + 2 x 3 (mmlib) + 1 (mmlib model index) + 2 + 2 (update) + 1 + 1, and a manifest per version
    assert len(files) == len(who) == 14 + 6
    checked = 0
    for path in files:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
        payload = int.from_bytes(head[8:16], "little")
        assert size == header_size_for(payload) + payload
        for pos in positions(size, payload):
            raw = bytearray(path.read_bytes())
            orig = raw[pos]
            raw[pos] ^= 0x01 if pos % 2 else 0x80
            path.write_bytes(raw)
            try:
                result = recover_all(root, want, dependents(who[path.name], want), modules=False)
            finally:
                raw[pos] = orig
                path.write_bytes(raw)
            for ref in who[path.name]:
                assert result[ref].startswith("IntegrityError"), (path.name[:12], pos, ref, result[ref])
            assert path.name[:12] in result["verify"], (path.name[:12], pos, result["verify"])
            checked += 1
    assert checked > 100
    assert all(v == "ok" for k, v in recover_all(root, want).items() if k != "verify")


def test_partial_reads_detect_corruption(pristine, tmp_path):
    """Reading one model of a corrupted chunk raises; reading a model in an intact chunk works."""
    src, want = pristine
    root = tmp_path / "store"
    shutil.copytree(src, root)
    store = mm.Store(root)
    row = store.row("big@1")
    path = store.objects.path(row.manifest["params"])
    stride = store.recover_set("big@1").layout.stride
    size = path.stat().st_size
    hsize = size - 12 * stride
    raw = bytearray(path.read_bytes())
    raw[hsize + 11 * stride + 5] ^= 0xFF  # inside the last model
    path.write_bytes(raw)
    ms = store.recover_set("big@1")
    assert sm.sd_digests(ms.state_dict(0)) == want["big@1"][0]
    with pytest.raises(mm.IntegrityError, match="corrupt"):
        ms.state_dict(11)
    with pytest.raises(mm.IntegrityError):
        store.recover_set("big@1")[11]
    with pytest.raises(mm.IntegrityError):
        store.recover_set("big@1").stacked("0.weight")
    with pytest.raises(mm.IntegrityError):
        store.recover_set("big@1").state_dicts()
    store.close()


@pytest.mark.parametrize("damage", ["truncate", "truncate-header", "delete", "empty", "append"])
def test_truncated_deleted_or_grown_objects(pristine, tmp_path, damage):
    src, want = pristine
    root = tmp_path / "store"
    shutil.copytree(src, root)
    who = users(root)
    for path in object_files(root):
        backup = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(backup[:-1])
        elif damage == "truncate-header":
            path.write_bytes(backup[:20])
        elif damage == "delete":
            path.unlink()
        elif damage == "empty":
            path.write_bytes(b"")
        else:
            path.write_bytes(backup + b"\0")
        try:
            result = recover_all(root, want, dependents(who[path.name], want), modules=False)
        finally:
            path.write_bytes(backup)
        for ref in who[path.name]:
            assert result[ref].startswith("IntegrityError"), (damage, path.name[:12], ref, result[ref])
        assert path.name[:12] in result["verify"]
