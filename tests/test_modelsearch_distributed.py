"""Model search on a local Ray cluster of two workers: same rankings and scores as one process."""
from __future__ import annotations

import os

import pytest
import torch
from test_modelsearch_engine import blobs, family

import mm_jupyter as mm
from mm_jupyter.modelsearch.distributed import RayExecutor, store_address
from mm_jupyter.store import testing

pytest.importorskip("ray")  # an extra; `make install` installs it, so the suite runs these tests
pytestmark = [pytest.mark.services, pytest.mark.xdist_group("ray")]  # the session's Ray cluster (conftest.py)


@pytest.fixture(scope="module")
def ray2(ray_cluster: int):
    """Two one-thread CPU workers on the session's local Ray (closed after this module)."""
    ex = RayExecutor(2, threads=1)
    try:
        ex.start()
        yield ex
    finally:
        ex.close()


@pytest.fixture(autouse=True)
def one_thread():
    """The workers run one torch thread each; the single-process reference does too, because a
    matrix product may sum in another order with more threads (then losses differ in the last
    bits, though rankings agree)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def same(a, b, work: bool = True) -> None:
    """Exactly the same ranking, scores, losses and rungs, and (``work``) the same block work: the
    same edges, every item through each depth as often. ``a`` may make more block calls (a trunk
    that several workers run, each on its own items), never fewer."""
    assert list(a.ranking["model"]) == list(b.ranking["model"])
    assert list(a.ranking["rung"]) == list(b.ranking["rung"])
    assert a.ranking["score"].tolist() == b.ranking["score"].tolist()
    assert a.ranking["loss"].tolist() == b.ranking["loss"].tolist()
    for key in ("unique_edges", "items_per_depth") if work else ():
        assert a.stats[key] == b.stats[key], key
    if work:
        assert a.stats["block_inferences"] >= b.stats["block_inferences"]


def test_local_ray_is_private_and_quiet(ray2, ray_cluster):
    import ray

    ctx = ray.get_runtime_context()
    assert ray.is_initialized() and ray.cluster_resources()["CPU"] == ray_cluster
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    assert ctx.gcs_address.startswith("127.0.0.1:")
    assert ray2.device == "cpu" and len(ray2.actors) == 2
    assert len(set(ray.get([a.ready.remote() for a in ray2.actors]))) == 2  # two processes


def test_alsatian_on_two_workers_equals_one_process(ray2):
    cands, data = family(16, seed=3), blobs(700)
    local = mm.search(cands, data, k=1, approach="alsatian", batch_size=32)
    events: list[dict] = []
    dist = mm.search(cands, data, k=1, approach="alsatian", batch_size=32, executor="ray", progress=events.append)
    same(dist, local)
    d = dist.stats["distributed"]
    assert d["workers"] == 2 and all(s > 0 for s in d["worker_seconds"])  # both workers ran subtrees
    assert {e["worker"] for e in events if e["event"] == "cache"} == {0, 1}
    assert [e["event"] for e in events].count("model_scored") == sum(r.models for r in dist.rungs)


def test_shared_stem_runs_once_and_is_handed_on(ray2):
    # every candidate shares the first block: the stem is the trunk; each worker runs it on its own
    # items and hands its output on to the other, whose subtrees need it for every item
    cands, data = family(10, seed=5), blobs(500)
    first = cands["m0"][0]
    for m in cands.values():
        m[0].load_state_dict(first.state_dict())
    local = mm.search(cands, data, k=2, approach="alsatian", batch_size=32, halving=False)
    dist = mm.search(cands, data, k=2, approach="alsatian", batch_size=32, halving=False, executor=ray2)
    same(dist, local)
    d = dist.stats["distributed"]
    assert d["trunk_blocks"] >= 1 and d["transfer_bytes"] > 0 and d["item_split_rungs"] == 0
    assert dist.stats["items_per_depth"][0] == len(data[0])  # the stem ran once over every item,
    # in two calls (one per worker), while every other block ran in one
    assert dist.stats["block_inferences"] == local.stats["block_inferences"] + d["trunk_blocks"]


def test_uneven_rungs_split_their_items_and_equal_one_process(ray2):
    # every candidate shares its first two blocks: late rungs are a trunk and one or two leaves, no
    # even subtree partition, so the workers split the items (whole batches) and run the whole tree
    cands, data = family(6, seed=3), blobs(500)
    first = cands["m0"]
    for m in cands.values():
        for a, b in list(zip(m, first))[:-4]:
            a.load_state_dict(b.state_dict())
    for approach in ("alsatian", "shift"):
        local = mm.search(cands, data, k=1, approach=approach, batch_size=32)
        dist = mm.search(cands, data, k=1, approach=approach, batch_size=32, executor=ray2)
        same(dist, local, work=False)
        d = dist.stats["distributed"]
        assert d["item_split_rungs"] >= 1 and all(s > 0 for s in d["worker_seconds"])
        assert dist.stats["items_per_depth"] == local.stats["items_per_depth"]  # no item ran twice
        assert dist.stats["unique_edges"] == local.stats["unique_edges"]
        # each worker runs every block on its own items: more block calls, the same block work
        assert dist.stats["block_inferences"] > local.stats["block_inferences"]
        if approach == "alsatian":
            assert d["trunk_blocks"] >= 1 and len(d["modelled_balance"]) == len(dist.rungs)


def test_shift_and_a_tight_budget_on_two_workers(ray2):
    cands, data = family(8, seed=1), blobs(400)
    for approach, budget in (("shift", None), ("alsatian", 20_000)):
        local = mm.search(cands, data, k=1, approach=approach, batch_size=32, cache_budget=budget)
        dist = mm.search(cands, data, k=1, approach=approach, batch_size=32, cache_budget=budget, executor=ray2)
        # under a budget every worker chunks its own (smaller) subtrees: fewer repeated edges, same batches
        same(dist, local, work=budget is None)
        if budget:
            assert dist.stats["cache_peak_bytes"] <= budget and dist.stats["chunks"] > len(dist.rungs)
            assert dist.stats["unique_edges"] == local.stats["unique_edges"]
            assert dist.stats["block_inferences"] <= local.stats["block_inferences"]


def test_stored_candidates_are_read_by_the_workers(ray2, tmp_path):
    from mm_jupyter.modelsearch.stored import add_candidates, load_candidates

    cands, data = family(12, seed=2), blobs(600)
    store = mm.Store(tmp_path / "s")
    add_candidates(store, cands, "mlps")
    stored = load_candidates(store, "mlps")
    local = mm.search(stored, data, k=1, approach="alsatian", batch_size=32)
    dist = mm.search(stored, data, k=1, approach="alsatian", batch_size=32, executor=ray2)
    same(dist, local)
    same(dist, mm.search(cands, data, k=1, approach="alsatian", batch_size=32))
    # the driver never loads a block in a distributed search: every byte counted was read by a worker
    assert dist.stats["bytes_loaded"] >= local.stats["bytes_loaded"] > 0
    # workers verify what they read: a flipped byte in a block object is one IntegrityError line
    entry = stored.entries[0]
    path = next((tmp_path / "s" / "objects").rglob(entry["blocks"][0]["object"]))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(mm.IntegrityError):
        mm.search(load_candidates(store, "mlps"), data, k=1, approach="alsatian", batch_size=32, executor=ray2)
    store.close()


def test_stored_candidates_of_a_team_store_are_read_by_the_workers(ray2):
    """PostgreSQL catalog + S3 objects: the workers open the same team store, not a folder named
    'None' (the address once carried ``store.root``, which a database store does not have)."""
    from mm_jupyter.modelsearch.stored import add_candidates, load_candidates

    cands, data = family(8, seed=5), blobs(400)
    with testing.postgres_server(durable=False) as pg, testing.s3_server() as s3:
        store = mm.Store(pg.database(), objects=s3.bucket_url())
        (where,), kwargs = store_address(store)
        assert where.startswith("postgresql://") and kwargs["objects"].startswith("s3://")
        add_candidates(store, cands, "mlps")
        stored = load_candidates(store, "mlps")
        dist = mm.search(stored, data, k=1, approach="alsatian", batch_size=32, executor=ray2)
        same(dist, mm.search(cands, data, k=1, approach="alsatian", batch_size=32))
        assert dist.stats["bytes_loaded"] > 0  # the workers read the blocks from S3
        store.close()


def test_store_address_opens_the_same_store_from_another_directory(tmp_path, monkeypatch):
    """A relative folder (and a relative object folder) stay the same store in a process that runs elsewhere."""
    monkeypatch.chdir(tmp_path)
    store = mm.Store("rel", objects="objs")
    args, kwargs = store_address(store)
    assert args == (str(tmp_path / "rel"),) and kwargs["objects"] == str(tmp_path / "objs")
    monkeypatch.chdir(tmp_path.parent)
    twin = mm.Store(*args, **kwargs)
    assert twin.location == str(tmp_path / "rel") and twin.sets().empty
    twin.close()
    store.close()


def test_executor_arguments_are_checked(ray2, ray_cluster):
    cands, data = family(4), blobs(100)
    with pytest.raises(mm.SearchError, match="executor must be"):
        mm.search(cands, data, executor="dask")
    with pytest.raises(mm.SearchError, match="workers must be"):
        RayExecutor(0)
    with pytest.raises(mm.SearchError, match="not what the Ray workers have"):
        mm.search(cands, data, device="cuda", executor=ray2)
    with pytest.raises(mm.SearchError, match=f"{ray_cluster + 1} Ray worker"):
        RayExecutor(ray_cluster + 1).start()  # more workers than the cluster has CPU slots
    with pytest.raises(mm.SearchError, match="need 4 CPU slots"):
        RayExecutor(2, threads=2).start()  # a worker reserves a slot per thread
    # a block failing inside a worker is the usual one-line SearchError naming candidate and block
    bad = {"a": cands["m0"], "b": torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))}
    with pytest.raises(mm.SearchError, match="candidate 'b'"):
        mm.search(bad, data, executor=ray2)
