"""Shared folders and garbage collection: temp files belong to their writer through a lock (never
to a PID), opening a store deletes nothing, and ``gc`` removes only what no version references —
also while other processes save, and across PID namespaces."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import store_models as sm
import zygote

import mm_jupyter as mm

KILLED_MMLIB = r"""
import os, signal, sys
import store_models as sm
import mm_jupyter as mm
store = mm.Store(sys.argv[1])
real = store.objects.put_filled
calls = {"n": 0}
def put_filled(nbytes, fill):
    calls["n"] += 1
    out = real(nbytes, fill)
    if calls["n"] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
store.objects.put_filled = put_filled
store.save_set(sm.crash_models(1, 7, n=5), "fam1", approach="mmlib-base")
"""


def object_files(root: Path) -> set[str]:
    return {p.name for p in (root / "objects").rglob("*") if p.is_file()}


def pending_rows(root: Path) -> int:
    import sqlite3

    db = sqlite3.connect(f"file:{root / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM sets WHERE version IS NULL").fetchone()[0]
    finally:
        db.close()


@pytest.mark.slow
def test_gc_removes_what_killed_saves_left(tmp_path):
    root = tmp_path / "store"
    store = mm.Store(root)
    ref = store.save_set(sm.crash_models(0, 1), "fam0", approach="mmlib-base")
    store.save_set(sm.crash_models(0, 2), "fam0", approach="update")
    kept = object_files(root)
    proc = sm.run_python(KILLED_MMLIB, str(root), check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = object_files(root) - kept
    assert len(left) >= 5 and pending_rows(root) == 1  # two models' documents, a third's parameters
    (root / "tmp" / "notes.txt").write_text("not ours")  # a stray file: left alone
    garbage = sum((root / "objects" / o[:2] / o).stat().st_blocks * 512 for o in left)
    report = store.gc()
    assert report.objects == len(left) and report.pending_rows == 1 and report.bytes_freed >= garbage
    assert object_files(root) == kept and pending_rows(root) == 0
    assert (root / "tmp" / "notes.txt").read_text() == "not ours"
    assert "freed" in str(report)
    assert store.verify() == []
    assert sm.check_crash_set(store.recover_set(ref), 0) == 1
    assert sm.check_crash_set(store.recover_set("fam0@2"), 0) == 2
    assert store.gc().objects == 0  # nothing left to collect
    assert store.save_set(sm.crash_models(1, 8), "fam1", approach="mmlib-base").version == 1
    store.close()
    cli = subprocess.run([sys.executable, "-m", "mm_jupyter", "store", "gc", str(root)], capture_output=True,
                         text=True, env=sm.subprocess_env(), cwd=sm.ROOT)
    assert cli.returncode == 0 and cli.stdout.startswith("removed 0 unreferenced object(s)")


WRITER = r"""
import json, os, sys, time
import store_models as sm
import mm_jupyter as mm
root, w, go, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
approaches = ["update", "mmlib-base", "baseline", "auto", "update"]
deadline = time.time() + 120
while not os.path.exists(go):
    if time.time() > deadline:
        sys.exit("no go signal")
    time.sleep(0.005)
for k in range(count):
    store = mm.Store(root)  # reopened per save, as the Jupyter endpoints do
    seed = w * 1000 + k
    approach = approaches[(w + k) % len(approaches)]
    ref = store.save_set(sm.crash_models(w, seed, n=int(sys.argv[5])), f"w{w}", approach=approach)
    store.close()
    print(json.dumps({"ref": str(ref), "seed": seed, "family": w, "n": int(sys.argv[5])}), flush=True)
"""


def start_writers(root: Path, go: Path, prefixes: list[list[str]], count: int,
                  n: int) -> list["zygote.Child | subprocess.Popen[str]"]:
    """One writer per prefix: a fork of the test zygote, or a new interpreter behind the prefix (``unshare``)."""
    args = [str(root), "", str(go), str(count), str(n)]
    return [
        subprocess.Popen([*prefix, sys.executable, "-c", WRITER, *args[:1], str(w), *args[2:]], cwd=sm.ROOT,
                         env=sm.subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if prefix else zygote.start(WRITER, *args[:1], str(w), *args[2:], cwd=sm.ROOT, env=sm.subprocess_env())
        for w, prefix in enumerate(prefixes)
    ]


def collect(procs: list["zygote.Child | subprocess.Popen[str]"]) -> dict[str, dict]:
    reported = {}
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        for line in out.splitlines():
            x = json.loads(line)
            reported[x["ref"]] = x
    return reported


def check_all(root: Path, reported: dict[str, dict]) -> None:
    store = mm.Store(root)
    listed = {f"{n}@{v}" for n, v in store.sets()[["name", "version"]].values.tolist()}
    assert set(reported) <= listed, f"acknowledged saves are missing: {sorted(set(reported) - listed)}"
    for ref, x in reported.items():
        assert sm.check_crash_set(store.recover_set(ref), x["family"], x["n"]) == x["seed"], ref
    assert store.verify() == []
    store.close()


@pytest.mark.slow
def test_gc_while_other_processes_save(tmp_path):
    root = tmp_path / "store"
    store = mm.Store(root)
    store.save_set(sm.crash_models(0, 1), "seed", approach="baseline")
    proc = sm.run_python(KILLED_MMLIB, str(root), check=False)  # garbage to collect
    assert proc.returncode == -signal.SIGKILL
    go = tmp_path / "go"
    procs = start_writers(root, go, [[], [], []], count=8, n=12)
    go.touch()
    reports = []
    while any(p.poll() is None for p in procs):
        reports.append(store.gc())
        time.sleep(0.01)
    reported = collect(procs)
    assert len(reported) == 24
    assert len(reports) >= 3, "gc did not run while the writers saved"
    assert sum(r.objects for r in reports) >= 5 and sum(r.pending_rows for r in reports) == 1
    check_all(root, reported)
    store.close()


@pytest.mark.slow
def test_two_pid_namespaces_share_one_folder(tmp_path):
    """Writers in separate PID namespaces (as in two containers) see PIDs that mean nothing to each
    other; neither may take the other's temp files for a dead writer's."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create PID namespaces (needs root): {probe.stderr.strip()[:200]}")
    root = tmp_path / "store"
    mm.Store(root).close()
    go = tmp_path / "go"
    # different PIDs inside each namespace: the python process is PID 3 in one and PID 5 in the other
    prefixes = [["unshare", "--pid", "--fork", "sh", "-c", '/bin/true; "$@"; exit $?', "sh"],
                ["unshare", "--pid", "--fork", "sh", "-c", '/bin/true; /bin/true; /bin/true; "$@"; exit $?', "sh"]]
    procs = start_writers(root, go, prefixes, count=6, n=40)
    go.touch()
    reported = collect(procs)
    assert len(reported) == 12
    check_all(root, reported)
