"""Out of space is an error, never a crash; a full disk or a read-only mount can still be read.

The file systems are real: small tmpfs mounts and a loop-mounted ext4 image (root is needed to
mount; the tests skip, saying so, where mounting is impossible). Saves that may hit a full disk run
in a subprocess, so a regression (SIGBUS from writing through a mapping of unallocated blocks)
fails the test instead of killing the test runner.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import store_models as sm
import torch
from torch import nn

import mm_jupyter as mm
from mm_jupyter.store import catalog as catalog_mod

ARCH = mm.Architecture.factory("torch.nn:Linear", in_features=1000, out_features=1000)


def big_models(seed: int, n: int = 5) -> list[nn.Module]:
    """n x 4 MB."""
    torch.manual_seed(seed)
    return [nn.Linear(1000, 1000) for _ in range(n)]


def small_models(seed: int) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Linear(1000, 1000) for _ in range(1)]


def digests(models: list[nn.Module]) -> list[dict[str, str]]:
    return sm.model_digests(models)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


@contextmanager
def mounted(path: Path, kind: str, size_mb: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    image = path.parent / f"{path.name}.img"
    if kind == "tmpfs":
        r = run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)])
    else:
        with open(image, "wb") as f:
            f.truncate(size_mb * 2**20)
        r = run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(image)])
        if r.returncode == 0:
            r = run(["mount", "-o", "loop", str(image), str(path)])
    if r.returncode != 0:
        pytest.skip(f"cannot mount a {kind} (needs root with mount rights): {r.stderr.strip()[:200]}")
    try:
        yield path
    finally:
        run(["umount", "-l", str(path)])
        image.unlink(missing_ok=True)


def fill(fs: Path, leave: int) -> Path:
    """Write a filler file so that about ``leave`` bytes stay free (no free byte for 0)."""
    filler = fs / f"filler-{uuid.uuid4().hex}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for block in (2**20, 4096, 512, 1):
            while True:
                st = os.statvfs(fs)
                free = st.f_bavail * st.f_frsize
                if leave and free <= leave:
                    break
                try:
                    os.write(fd, b"\xff" * (min(block, free - leave) if leave else block))
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


def fill_up(fs: Path) -> Path:
    return fill(fs, 0)


SAVE = r"""
import json, sys, torch
from torch import nn
import mm_jupyter as mm
from test_store_space import ARCH, big_models
store = mm.Store(sys.argv[1])
try:
    ref = store.save_set(big_models(1), "big", architecture=ARCH, approach=sys.argv[2])
    print(json.dumps({"saved": str(ref)}))
except mm.MMError as e:
    print(json.dumps({"error": str(e), "type": type(e).__name__}))
"""

READ = r"""
import json, sys
import mm_jupyter as mm
import store_models as sm
store = mm.Store(sys.argv[1])
out = {"sets": store.sets()[["name", "version"]].values.tolist(), "verify": store.verify()}
out["digests"] = [sm.sd_digests(sd) for sd in store.recover_set("small").state_dicts()]
try:
    store.save_set([], "x")
except mm.StoreError as e:
    out["save"] = str(e)
print(json.dumps(out))
"""


def no_temps(root: Path) -> bool:
    return not list((root / "tmp").glob("*"))


@pytest.mark.slow
@pytest.mark.parametrize("kind,approach", [("tmpfs", "baseline"), ("ext4", "baseline"), ("tmpfs", "mmlib-base")])
def test_save_on_a_full_disk_is_a_clear_error(tmp_path, kind, approach):
    with mounted(tmp_path / "fs", kind, 32) as fs:
        root = fs / "store"
        store = mm.Store(root)
        store.save_set(small_models(0), "small", architecture=ARCH)
        want_small = digests(small_models(0))
        store.close()
        filler = fill(fs, 5 * 2**20)
        proc = sm.run_python(SAVE, str(root), approach, check=False)
        assert proc.returncode == 0, f"the save crashed (signal {-proc.returncode}): {proc.stderr[-2000:]}"
        assert proc.returncode != -signal.SIGBUS
        out = json.loads(proc.stdout)
        assert out.get("type") == "StoreError", out
        assert f"no space left on {fs} for set 'big': needed " in out["error"] and "free " in out["error"]
        assert no_temps(root), list((root / "tmp").iterdir())
        store = mm.Store(root)
        assert store.sets()["name"].tolist() == ["small"]  # nothing listed
        assert [sm.sd_digests(sd) for sd in store.recover_set("small").state_dicts()] == want_small
        assert store.verify() == []
        filler.unlink()
        ref = store.save_set(big_models(1), "big", architecture=ARCH, approach=approach)
        assert [sm.sd_digests(sd) for sd in store.recover_set(ref).state_dicts()] == digests(big_models(1))
        assert store.verify() == []
        store.gc()
        assert store.verify() == []
        store.close()


def test_catalog_commit_on_a_full_disk(tmp_path, monkeypatch):
    """The objects fit, then the disk fills up before SQLite writes the transaction."""
    with mounted(tmp_path / "fs", "tmpfs", 24) as fs:
        root = fs / "store"
        store = mm.Store(root)
        store.save_set(small_models(0), "small", architecture=ARCH)
        store.gc()  # truncates the -wal file: the next transaction must allocate
        real = catalog_mod.SQLiteCatalog.insert_set
        fillers = []

        def full_then_insert(self, tx, m, oid, size):
            fillers.append(fill_up(fs))
            return real(self, tx, m, oid, size)

        monkeypatch.setattr(catalog_mod.SQLiteCatalog, "insert_set", full_then_insert)
        with pytest.raises(mm.StoreError, match=rf"no space left on {fs} for set 'more'"):
            store.save_set(small_models(1), "more", architecture=ARCH)
        monkeypatch.setattr(catalog_mod.SQLiteCatalog, "insert_set", real)
        assert store.sets()["name"].tolist() == ["small"]
        assert no_temps(root)
        fillers[0].unlink()
        ref = store.save_set(small_models(1), "more", architecture=ARCH)
        assert ref.version == 1
        assert [sm.sd_digests(sd) for sd in store.recover_set(ref).state_dicts()] == digests(small_models(1))
        assert store.verify() == []
        store.close()


def test_fsync_out_of_space(store, monkeypatch):
    """ENOSPC surfacing at an object's fsync (delayed allocation): one StoreError, and the object whose
    fsync failed is removed — Linux reports a write-back error once, so a later save deduplicating
    against it would fsync without an error and reference data the disk never got."""
    store.save_set(small_models(0), "small", architecture=ARCH)
    real = os.fsync
    failed: list[Path] = []

    def fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if not failed and path.is_file() and (store.root / "objects") in path.parents:
            failed.append(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(mm.StoreError, match="no space left on .* for set 'big'"):
        store.save_set(big_models(2, 2), "big", architecture=ARCH)
    monkeypatch.setattr(os, "fsync", real)
    assert failed and not failed[0].exists()
    assert no_temps(store.root)
    assert store.sets()["name"].tolist() == ["small"]
    assert store.save_set(big_models(2, 2), "big", architecture=ARCH).version == 1


WITHOUT_FALLOCATE = r"""
import errno, json, os, sys
def unsupported(fd, offset, length):
    raise OSError(errno.EOPNOTSUPP, "Operation not supported")
os.posix_fallocate = unsupported
import mm_jupyter as mm
import store_models as sm
from test_store_space import ARCH, big_models
store = mm.Store(sys.argv[1])
try:
    ref = store.save_set(big_models(int(sys.argv[2])), "big", architecture=ARCH)
    ms = store.recover_set(ref)
    print(json.dumps({"saved": [sm.sd_digests(sd) for sd in ms.state_dicts()]}))
except mm.MMError as e:
    print(json.dumps({"error": str(e)}))
"""


@pytest.mark.slow
def test_without_fallocate_bytes_are_written_not_mapped(tmp_path):
    """Where the file system cannot allocate ahead, saves use write() calls: they work, and on a
    full disk they fail with a clear error instead of a SIGBUS."""
    proc = sm.run_python(WITHOUT_FALLOCATE, str(tmp_path / "store"), "3")
    assert json.loads(proc.stdout)["saved"] == digests(big_models(3))
    with mounted(tmp_path / "fs", "tmpfs", 16) as fs:
        mm.Store(fs / "store").close()
        fill(fs, 5 * 2**20)
        proc = sm.run_python(WITHOUT_FALLOCATE, str(fs / "store"), "4", check=False)
        assert proc.returncode == 0, f"the save crashed (signal {-proc.returncode}): {proc.stderr[-2000:]}"
        assert "no space left on" in json.loads(proc.stdout)["error"]
        assert no_temps(fs / "store")


@pytest.mark.slow
@pytest.mark.parametrize("writer_open", [False, True], ids=["closed", "writer-open"])
def test_reading_a_store_on_a_full_disk(tmp_path, writer_open):
    with mounted(tmp_path / "fs", "tmpfs", 16) as fs:
        root = fs / "store"
        store = mm.Store(root)
        store.save_set(small_models(0), "small", architecture=ARCH)
        if not writer_open:
            store.close()
        filler = fill_up(fs)
        proc = sm.run_python(READ, str(root))
        out = json.loads(proc.stdout)
        assert out["sets"] == [["small", 1]] and out["verify"] == []
        assert out["digests"] == digests(small_models(0))
        assert "empty" in out["save"]  # bad input is still reported as such
        if writer_open:
            store.close()
        reader = mm.Store(root)  # opened while the disk is full: read-only for now
        assert reader.sets()["name"].tolist() == ["small"]
        with pytest.raises(mm.StoreError, match="no space left on"):
            reader.save_set(small_models(1), "more", architecture=ARCH)
        filler.unlink()
        ref = reader.save_set(small_models(1), "more", architecture=ARCH)  # the same store, space again
        assert [sm.sd_digests(sd) for sd in reader.recover_set(ref).state_dicts()] == digests(small_models(1))
        assert reader.verify() == []
        reader.close()


@pytest.mark.slow
def test_read_only_mount(tmp_path):
    with mounted(tmp_path / "fs", "tmpfs", 16) as fs:
        root = fs / "store"
        store = mm.Store(root)
        store.save_set(small_models(0), "small", architecture=ARCH)
        store.close()
        before = sorted(p.name for p in root.rglob("*"))
        r = run(["mount", "-o", "remount,ro", str(fs)])
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()[:200]}")
        proc = sm.run_python(READ, str(root))
        out = json.loads(proc.stdout)
        assert out["sets"] == [["small", 1]] and out["verify"] == []
        assert out["digests"] == digests(small_models(0))
        store = mm.Store(root)
        with pytest.raises(mm.StoreError, match="read-only"):
            store.save_set(small_models(1), "more", architecture=ARCH)
        with pytest.raises(mm.StoreError, match="read-only"):
            store.gc()
        with pytest.raises(mm.StoreError, match="read-only"):
            mm.Store.rebuild_catalog(root)
        store.close()
        with pytest.raises(mm.StoreError, match="cannot be created"):
            mm.Store(fs / "new")
        assert sorted(p.name for p in root.rglob("*")) == before  # nothing was written
