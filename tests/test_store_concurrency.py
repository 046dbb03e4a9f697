"""Concurrency: four processes saving into one store at once (one shared set name, one own name
each, every approach) produce gap-free, duplicate-free versions that all recover bit-exactly."""
from __future__ import annotations

import json

import pytest
import store_models as sm
import zygote

import mm_jupyter as mm

WORKERS = 4
VERSIONS = 4

WORKER = r"""
import json, os, sys, time
import store_models as sm
import mm_jupyter as mm

root, w, go, versions = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
store = mm.Store(root)
approaches = ["update", "mmlib-base", "baseline", "auto"]
deadline = time.time() + 120
while not os.path.exists(go):  # start together
    if time.time() > deadline:
        sys.exit("no go signal")
    time.sleep(0.005)
for k in range(versions):
    for name, family in (("shared", 0), (f"own{w}", w + 1)):
        seed = w * 1000 + k * 10 + family
        approach = approaches[(w + k) % len(approaches)]
        ref = store.save_set(sm.crash_models(family, seed), name, approach=approach)
        print(json.dumps({"ref": str(ref), "seed": seed, "approach": approach}), flush=True)
"""


@pytest.mark.slow
def test_four_writers_at_once(tmp_path):
    root = tmp_path / "store"
    # the store does not exist yet: the workers race on creating its folder and catalog too
    go = tmp_path / "go"
    procs = [zygote.start(WORKER, str(root), str(w), str(go), str(VERSIONS), cwd=sm.ROOT, env=sm.subprocess_env())
             for w in range(WORKERS)]
    go.touch()
    reported: dict[str, dict] = {}
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        for line in out.splitlines():
            x = json.loads(line)
            assert x["ref"] not in reported, f"two saves got {x['ref']}"
            reported[x["ref"]] = x

    store = mm.Store(root)
    frame = store.sets()
    listed = [f"{n}@{v}" for n, v in zip(frame["name"], frame["version"])]
    assert sorted(listed) == sorted(reported)
    counts = frame.groupby("name")["version"].apply(sorted).to_dict()
    assert counts == {
        "shared": list(range(1, WORKERS * VERSIONS + 1)),
        **{f"own{w}": list(range(1, VERSIONS + 1)) for w in range(WORKERS)},
    }
    for ref, x in reported.items():
        name = ref.split("@")[0]
        family = 0 if name == "shared" else int(name.removeprefix("own")) + 1
        assert sm.check_crash_set(store.recover_set(ref), family) == x["seed"], ref
        assert store.stats(ref)["requested"] == x["approach"]
    # update versions of the shared name were derived from whichever version was latest then
    lin = store.lineage("shared")
    for base, derived in lin.edges:
        assert base < derived
    assert store.verify() == []
    store.close()
