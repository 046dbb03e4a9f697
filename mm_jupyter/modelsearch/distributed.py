"""Model search on Ray: ``mm.search(..., executor="ray")`` or ``executor=RayExecutor(...)``.

Per rung the driver builds the surviving candidates' task tree, splits it into whole subtrees, one
set per worker, balanced by the block cost model (``partition.py``), and sends each worker its
subtrees; a worker runs them with the DFS+ planner under its own cache budget. A stem shared too
widely to split (the *trunk*) runs first, on every worker, each on its own run of whole batches
(so no worker waits for a serial stem), and its outputs at the cut nodes go through Ray's object
store to the workers whose subtrees start there, concatenated in item order. Workers return
features; the driver keeps them, has the workers score the candidates (the proxy is a pure
function, so where it runs does not change the score) and prunes globally, exactly as the
single-process search does.
Batches are cut as in the single-process run (every subtree batches its items from the start of
each segment), so features, scores and rankings are the same. When no subtree partition is even
enough (modelled time, trunk included, above ``BALANCE_LIMIT`` times an even share; late rungs:
few survivors, one subtree or only a trunk), the rung's items are split instead: each worker runs
the whole tree on a contiguous run of whole batches (cut where the single-process run cuts them),
and the driver concatenates the features in item order. Workers keep loaded blocks across rungs
while a surviving candidate needs them, and a stored set's skeletons across searches.

Candidates stored with ``add_candidates`` are read by the workers themselves from the store
(through ``Store``/``load_candidates`` and the object area's verified reads, so only the blocks a
worker's subtrees need are fetched); in-memory candidates are put into Ray's object store once per
distinct block. Ray's transport pickles task arguments between the driver and its own workers;
nothing read from a model store is ever unpickled.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence

from ..errors import MMError, SearchError
from ..store import Store, trust
from .engine import Candidate, Meter, batch_ranges, extract_shared, extract_whole
from .partition import BALANCE_LIMIT, Partition, items_balance, partition_tree, split_batches
from .stored import load_candidates
from .tree import TaskTree

if TYPE_CHECKING:
    import torch

    from ..store import Store
    from .proxies import ProxyScore

Progress = Callable[[dict[str, Any]], None]
START_TIMEOUT_S = 600.0  # workers import torch; on a busy machine that takes a while


def store_address(store: "Store") -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Arguments that open ``store`` again in another process (a Ray worker): a folder store or a
    team store (PostgreSQL catalog + S3 objects) alike."""
    return store.address()


# -- what travels to a worker -----------------------------------------------------------------------
@dataclass(frozen=True)
class StoredSource:
    """Candidates a worker loads itself from a store (blocks read on first use)."""

    store: tuple[tuple[Any, ...], dict[str, Any]]
    name: str
    version: int
    trust_code: bool
    modules: tuple[str, ...] = ()  # the driver's imported modules: its records' classes may live there


@dataclass(frozen=True)
class MemorySource:
    """In-memory candidates: per candidate its block ids, output sizes and object references of
    its blocks and batch context in Ray's object store."""

    entries: tuple[tuple[str, tuple[str, ...] | None, tuple[int, ...] | None, tuple[Any, ...], Any], ...]


@dataclass(frozen=True)
class Job:
    """Work for one worker call: ``names`` get features; a shared job starts at depth ``start``
    from the trunk output ``source`` (a block-id path; None: the raw items) and hands on the
    intermediates ``exports`` ((candidate, depth) pairs); a whole job runs each candidate alone."""

    names: tuple[str, ...]
    start: int = 0
    source: tuple[str, ...] | None = None
    exports: tuple[tuple[str, int], ...] = ()
    whole: bool = False


@dataclass
class WorkerResult:
    features: list[dict[Hashable, "torch.Tensor"]]
    exports: dict[tuple[str, ...], "torch.Tensor"] = field(default_factory=dict)
    meter: Meter = field(default_factory=Meter)
    seconds: float = 0.0  # wall-clock time of the call in the worker
    cpu_seconds: float = 0.0  # the worker process's CPU time in it (below ``seconds``: the CPU was busy elsewhere)


@dataclass
class RungPlan:
    """How the workers run one rung. ``ranges[w]``: worker ``w``'s items (whole batches, in item
    order). Item split (``split``): worker ``w`` runs ``jobs[w]`` (the whole tree) on its items.
    Otherwise the ``trunk`` (if any) runs on every worker, each on its own items, and then worker
    ``w`` runs the whole subtrees ``jobs[w]`` on every item, starting from the trunk's outputs."""

    jobs: list[list[Job]]
    ranges: list[tuple[int, int]]
    trunk: Job | None = None
    split: bool = False


# -- the worker (a Ray actor) -----------------------------------------------------------------------
class Worker:
    """One search worker: a CPU slot (``threads`` intra-op threads) or one GPU."""

    def __init__(self, threads: int, device: str) -> None:
        import torch

        torch.set_num_threads(threads)
        self.device = device
        self.cands: dict[str, Candidate] = {}
        self.resident: dict[tuple[str, ...], Any] = {}
        self._stored: tuple[StoredSource, Any] | None = None  # the last stored set and its open store

    def ready(self) -> int:
        return os.getpid()

    def setup(self, source: StoredSource | MemorySource, sample: "torch.Tensor", shared: bool) -> None:
        """Candidates for the search that starts (ids and sizes as the driver computed them). A
        stored set stays open between searches, with its architectures' skeletons built, as in a
        driver that searches the same ``load_candidates`` object again; its blocks are not kept."""
        self.reset()
        if isinstance(source, StoredSource):
            if self._stored is None or self._stored[0] != source:

                self.forget()
                trust.adopt_session(source.modules)  # the worker acts for the driver's session
                args, kwargs = source.store
                store = Store(*args, **kwargs)
                self._stored = source, load_candidates(store, source.name, source.version,
                                                       trust_code=source.trust_code)
            stored = self._stored[1]
            self.cands = {str(c.name): c for c in stored.engine_candidates(sample, shared=shared, device=self.device)}
            return
        self.forget()
        import ray

        for name, ids, sizes, blocks, context in source.entries:
            fetch = _Fetch(blocks, self.device)
            self.cands[name] = Candidate(name, fetch, len(blocks), ray.get(context),
                                         list(ids) if ids is not None else None,
                                         list(sizes) if sizes is not None else None)

    def extract(self, jobs: Sequence[Job], segments: list["torch.Tensor"], live: Sequence[str], batch_size: int,
                budget: int | None, *trunk: WorkerResult) -> WorkerResult:
        """Run ``jobs`` one after another; features per segment, exported intermediates, counters.
        ``trunk``: the trunk's results, one per worker that ran it on its share of the items, in
        item order (a shared job starting at a cut takes their outputs there, concatenated).
        Loaded blocks stay while a ``live`` candidate (this rung's) still needs them."""
        import torch

        t0, c0 = time.perf_counter(), time.process_time()
        keep = {tuple(c.ids[: d + 1]) for c in map(self.cands.__getitem__, live) if c.ids is not None
                for d in range(c.count)}
        for key in [k for k in self.resident if k not in keep]:
            del self.resident[key]
        meter = Meter()
        features: list[dict[Hashable, torch.Tensor]] = [{} for _ in segments]
        exports: dict[tuple[str, ...], torch.Tensor] = {}
        for job in jobs:
            cands = [self.cands[n] for n in job.names]
            if job.whole:
                for c in cands:
                    for i, f in enumerate(extract_whole(c, segments, batch_size=batch_size, device=self.device,
                                                        meter=meter)):
                        features[i][c.name] = f
                continue
            cuts = {tuple(self.cands[n].ids[:d]): self.cands[n].prefix(d, ("cut", n, d))  # type: ignore[index]
                    for n, d in job.exports}
            group = cands + list(cuts.values())
            inputs = None
            if job.source is not None:
                parts = [t.exports[job.source] for t in trunk]
                inputs = parts[0] if len(parts) == 1 else torch.cat(parts)
            per_segment = extract_shared(group, segments, batch_size=batch_size, device=self.device, budget=budget,
                                         host_budget=budget, meter=meter, resident=self.resident,
                                         from_depth=job.start, inputs=inputs, exports={c.name for c in cuts.values()})
            for key, cut in cuts.items():
                exports[key] = torch.cat([seg[cut.name] for seg in per_segment])
            for i, seg in enumerate(per_segment):
                features[i].update({n: f for n, f in seg.items() if isinstance(n, str)})
        return WorkerResult(features, exports, meter, time.perf_counter() - t0, time.process_time() - c0)

    def score(self, items: Sequence[tuple[str, "torch.Tensor", "torch.Tensor"]], y_train: "torch.Tensor",
              y_test: "torch.Tensor", proxy: str, seed: int) -> dict[str, "ProxyScore"]:
        """Proxy scores of candidates from their train and test features (those with the same number
        of train rows together, see ``score_many``: the same scores as one at a time)."""
        from .proxies import score_many

        by_rows: dict[int, list[tuple[str, "torch.Tensor", "torch.Tensor"]]] = {}
        for item in items:
            by_rows.setdefault(len(item[1]), []).append(item)
        out: dict[str, "ProxyScore"] = {}
        for rows, group in by_rows.items():
            scores = score_many(proxy, [(tr, te) for _, tr, te in group], y_train[:rows], y_test, seed=seed)
            out.update(zip([name for name, _, _ in group], scores))
        return out

    def reset(self) -> None:
        """Forget the last search's candidates and loaded blocks."""
        self.cands.clear()
        self.resident.clear()

    def forget(self) -> None:
        """Close the stored set kept from earlier searches."""
        if self._stored is not None:
            self._stored[1].store.close()
            self._stored = None


class _Fetch:
    """A worker's access to in-memory blocks: fetched from Ray's object store when first run."""

    def __init__(self, refs: Sequence[Any], device: str) -> None:
        self.refs = refs
        self.device = device

    def __call__(self, i: int) -> Any:
        import ray

        block = ray.get(self.refs[i])
        block.module.to(self.device)
        return block


# -- the executor ------------------------------------------------------------------------------------
class RayExecutor:
    """Ray workers for ``mm.search(..., executor=...)``: one actor per CPU slot or GPU.

    ``address``: an existing cluster (``ray.init(address=...)``); without it, and when Ray is not
    initialised yet, a local Ray starts with ``workers`` CPUs (default: this machine's), without
    dashboard and usage statistics, bound to 127.0.0.1. ``gpus``: one worker per GPU (None: when
    the cluster has GPUs). ``threads``: torch threads per CPU worker, and the CPU slots it reserves
    (default: the cluster's CPUs divided by the workers). Use as a context manager, or ``close()``.
    ``executor="ray"`` uses the executor started last and still open, else starts a default one
    that stays up for later searches."""

    def __init__(self, workers: int | None = None, *, address: str | None = None, gpus: bool | None = None,
                 threads: int | None = None, object_store_memory: int | None = None) -> None:
        for value, what in ((workers, "workers"), (threads, "threads")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SearchError(f"{what} must be an integer >= 1 (or None), not {value!r}")
        self.workers = workers
        self.address = address
        self.gpus = gpus
        self.threads = threads
        self.object_store_memory = object_store_memory
        self.actors: list[Any] = []
        self.device = "cpu"
        self._started_ray = False

    def __enter__(self) -> "RayExecutor":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RayExecutor({len(self.actors) or self.workers or 'auto'} workers, {self.device})"

    def start(self) -> None:
        """Connect to (or start) Ray and start the workers; waits until every worker is up."""
        if self.actors:
            return
        ray = _ray()
        if not ray.is_initialized():
            if self.address is not None:
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                self._started_ray = start_local_ray(self.workers, self.object_store_memory)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        use_gpus = bool(gpus) if self.gpus is None else self.gpus
        if use_gpus and not gpus:
            raise SearchError("RayExecutor(gpus=True) but the Ray cluster has no GPUs")
        slots = gpus if use_gpus else int(resources.get("CPU", 0))
        workers = self.workers or slots
        if workers > slots or workers < 1:
            raise SearchError(f"{workers} Ray worker(s) requested but the cluster has {slots} "
                              f"{'GPU' if use_gpus else 'CPU'} slot(s)")
        # CPUs each CPU worker reserves: its threads (so executors of 1-thread workers can coexist)
        share = self.threads or max(1, int(resources.get("CPU", 1)) // workers)
        if not use_gpus and workers * share > slots:
            raise SearchError(f"{workers} Ray worker(s) of {share} thread(s) need {workers * share} CPU slots but "
                              f"the cluster has {slots}")
        self.device = "cuda" if use_gpus else "cpu"
        options = {"num_gpus": 1, "num_cpus": 0} if use_gpus else {"num_cpus": share}
        remote = ray.remote(Worker).options(**options)
        self.actors = [remote.remote(share, self.device) for _ in range(workers)]
        try:
            _get([a.ready.remote() for a in self.actors], timeout=START_TIMEOUT_S)
        except SearchError:
            self.close()
            raise
        _OPEN.append(self)

    def close(self) -> None:
        """Stop the workers (and Ray, if this executor started it)."""
        if self in _OPEN:
            _OPEN.remove(self)
        if self.actors:
            ray = _ray()
            for a in self.actors:
                ray.kill(a)
            self.actors = []
        if self._started_ray:
            _ray().shutdown()
            self._started_ray = False


def start_local_ray(cpus: int | None = None, object_store_memory: int | None = None) -> bool:
    """Start a private local Ray with ``cpus`` CPU slots (default: this machine's) unless Ray is
    initialised already; returns whether it started one. No dashboard, no usage statistics,
    bound to 127.0.0.1, workers' output not copied to the caller's."""
    ray = _ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports sent anywhere
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU workers keep CUDA_VISIBLE_DEVICES
    ray.init(num_cpus=cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", object_store_memory=object_store_memory, logging_level=logging.WARNING)
    return True


_OPEN: list[RayExecutor] = []  # started and not closed, oldest first


def resolve_executor(executor: Any) -> RayExecutor:
    """``"ray"`` -> the executor started last (a default one if none is open); a RayExecutor is
    started if it is not yet."""
    if isinstance(executor, RayExecutor):
        executor.start()
        return executor
    if isinstance(executor, str) and executor == "ray":
        if not _OPEN:
            RayExecutor().start()
        return _OPEN[-1]
    raise SearchError(f"executor must be None, 'ray' or a RayExecutor, not {executor!r}")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SearchError("executor='ray' needs Ray: pip install 'mm_jupyter[ray]'") from None
    return ray


def _get(refs: Any, timeout: float | None = None) -> Any:
    """``ray.get``, with a worker's failure as one MMError line."""
    ray = _ray()
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise SearchError(f"the Ray workers did not start within {timeout:g} s (does the cluster have free "
                          "CPU/GPU slots?)") from None
    except ray.exceptions.RayTaskError as e:
        cause = e.cause
        if isinstance(cause, MMError):
            raise cause from None
        raise SearchError(f"a Ray worker failed: {type(cause).__name__}: {cause}") from None
    except ray.exceptions.RayError as e:
        first = str(e).strip().splitlines()
        raise SearchError(f"a Ray worker was lost: {type(e).__name__}: {first[0] if first else ''}") from None


# -- one search on the executor -----------------------------------------------------------------------
class RaySearch:
    """The distributed half of one ``mm.search`` call: ships the candidates, runs each rung's
    extraction and scoring on the workers, and keeps which worker held which candidates, so a
    later rung hands a subtree to the worker that already loaded its blocks."""

    def __init__(self, executor: RayExecutor, named: Any, cands: list[Candidate], sample: "torch.Tensor",
                 device: str, *, shared: bool, batch_size: int, budget: int | None, proxy: str, seed: int) -> None:
        if device not in ("auto", "cpu") and not (device.startswith("cuda") and executor.device == "cuda"):
            raise SearchError(f"device {device!r} is not what the Ray workers have ({executor.device}); "
                              "use device='auto'")
        self.executor = executor
        self.cands = {str(c.name): c for c in cands}
        self.shared = shared
        self.batch_size = batch_size
        self.budget = budget
        self.proxy = proxy
        self.seed = seed
        self.held: dict[str, int] = {}  # candidate -> worker that last extracted it
        self.stats: dict[str, Any] = {"workers": len(executor.actors), "transfer_bytes": 0, "trunk_blocks": 0,
                                      "item_split_rungs": 0,
                                      "worker_seconds": [0.0] * len(executor.actors),
                                      "worker_cpu_seconds": [0.0] * len(executor.actors), "modelled_balance": []}
        source = self._source(named, cands)
        _get([a.setup.remote(source, sample, shared) for a in executor.actors])

    def _source(self, named: Any, cands: list[Candidate]) -> StoredSource | MemorySource:
        ray = _ray()
        if hasattr(named, "engine_candidates"):

            return StoredSource(store_address(named.store), named.ref.name, named.ref.version, named.trust_code,
                                trust.session_modules())
        refs: dict[Any, Any] = {}
        entries = []
        meter = Meter()
        for c in cands:
            blocks = []
            for i in range(c.count):
                block = c.block(i, meter)
                key = c.ids[i] if c.ids is not None else id(block.module)
                if key not in refs:
                    refs[key] = ray.put(block)
                blocks.append(refs[key])
            if ("context", id(c.context)) not in refs:
                refs["context", id(c.context)] = ray.put(c.context)
            ctx = refs["context", id(c.context)]
            entries.append((str(c.name), tuple(c.ids) if c.ids is not None else None,
                            tuple(c.sizes) if c.sizes is not None else None, tuple(blocks), ctx))
        return MemorySource(tuple(entries))

    # -- extraction ---------------------------------------------------------------------------------
    def extract(self, group: list[Candidate], segments: list["torch.Tensor"], meter: Meter,
                progress: Progress) -> list[dict[Hashable, "torch.Tensor"]]:
        """Features of ``group`` per segment, computed by the workers."""
        import torch

        ray = _ray()
        t0 = time.perf_counter()
        plan = self._plan(group, segments)
        meter.add("planning", time.perf_counter() - t0)
        t0 = time.perf_counter()
        actors = self.executor.actors
        lengths = [len(s) for s in segments]
        live = tuple(str(c.name) for c in group)
        # (worker, its items as (segment, start, stop) pieces, result reference); the calls on
        # the workers' own items come first and in worker order, so their pieces are in item order
        calls: list[tuple[int, list[tuple[int, int, int]], Any]] = []
        for w, (a, b) in enumerate(plan.ranges):
            jobs = plan.jobs[w] if plan.split else [plan.trunk] if plan.trunk is not None else []
            if b > a and jobs:
                pieces = _pieces(lengths, a, b)
                calls.append((w, pieces, actors[w].extract.remote(
                    jobs, [segments[i][s:e].clone() for i, s, e in pieces], live, self.batch_size, self.budget)))
        ranged = len(calls)  # these ran the same tree (the trunk, or all of it on an item split)
        if not plan.split:
            trunk = [ref for _, _, ref in calls]
            segs = ray.put(segments)
            every = [(i, 0, n) for i, n in enumerate(lengths)]
            calls += [(w, every, actors[w].extract.remote(js, segs, live, self.batch_size, self.budget,
                                                           *(trunk if any(j.source for j in js) else ())))
                      for w, js in enumerate(plan.jobs) if js]
        results: list[WorkerResult] = _get([ref for _, _, ref in calls])
        meter.add("inference", time.perf_counter() - t0)
        parts: list[dict[Hashable, list[torch.Tensor]]] = [{} for _ in segments]
        for (w, pieces, _), res in zip(calls, results):
            _absorb(meter, res.meter)
            self.stats["worker_seconds"][w] += res.seconds
            self.stats["worker_cpu_seconds"][w] += res.cpu_seconds
            progress({"event": "cache", "bytes": res.meter.cache_peak_bytes, "chunk": meter.chunks, "worker": w})
            for (i, _, _), feats in zip(pieces, res.features):
                for n, f in feats.items():
                    parts[i].setdefault(n, []).append(f)
                self.held.update({str(n): w for n in feats})
        edges = [res.meter.unique_edges for res in results[:ranged]]
        if edges:  # a tree several workers ran on their own items: its edges are counted once
            meter.unique_edges -= sum(edges) - max(edges)
        out: list[dict[Hashable, torch.Tensor]] = [
            {n: fs[0] if len(fs) == 1 else torch.cat(fs) for n, fs in seg.items()} for seg in parts]
        missing = [c.name for c in group if segments and c.name not in out[0]]
        if missing:
            raise SearchError(f"the Ray workers returned no features for {missing[:3]}")
        return out

    def _plan(self, group: list[Candidate], segments: list["torch.Tensor"]) -> RungPlan:
        """How the workers run one rung: whole subtrees per worker after a trunk split by items,
        or (when that is too uneven and splitting every item is more even) the whole tree per
        worker on its own items. Modelled balance: the modelled time over an even share of the
        work (1.0 = every worker busy all the time)."""
        workers = len(self.executor.actors)
        lengths = [len(s) for s in segments]
        ranges = split_batches(batch_ranges(lengths, self.batch_size), workers)
        share = max(b - a for a, b in ranges) / max(1, sum(lengths))  # the largest worker's share of the items
        if not self.shared:
            tree = TaskTree(1)
            cost: dict[int, float] = {}
            for c in group:  # each candidate is a subtree of its own
                leaf = tree.add_model(c.name, [str(c.name)], [1])
                cost[leaf] = sum(c.costs or [1.0])
        else:
            tree = TaskTree(segments[0][:1].element_size() * max(1, segments[0][:1].numel()))
            cost = {}
            for c in group:
                assert c.ids is not None and c.sizes is not None and c.costs is not None
                tree.add_model(c.name, c.ids, c.sizes)
                for depth, nid in enumerate(tree.path(c.name)[1:]):
                    cost[nid] = c.costs[depth]
        part = partition_tree(tree, cost, workers)
        # the trunk runs on every worker, each on its own items, before the subtrees start
        span = part.trunk_cost * share + max(part.loads, default=0.0)
        balance = span * workers / part.total if part.total else 1.0
        if balance > BALANCE_LIMIT and items_balance(ranges) < balance:
            self.stats["item_split_rungs"] += 1
            self.stats["modelled_balance"].append(round(items_balance(ranges), 4))
            return RungPlan([[Job(tuple(str(c.name) for c in group), whole=not self.shared)]] * workers, ranges,
                            split=True)
        self.stats["modelled_balance"].append(round(balance, 4))
        order = self._match(part, tree)
        if not self.shared:
            return RungPlan([[Job(tuple(str(n) for r in part.bins[b] for n in tree.nodes[r].ends), whole=True)]
                             if part.bins[b] else [] for b in order], ranges)
        self.stats["trunk_blocks"] += len(part.trunk)
        path = _paths(tree)
        trunk = None
        if part.trunk:
            ends = tuple(str(m) for n in part.trunk for m in tree.nodes[n].ends)
            exports = tuple((str(min(tree.nodes[p].models, key=str)), len(path[p])) for p in part.cuts(tree))
            trunk = Job(ends, exports=exports)
        jobs: list[list[Job]] = []
        for w, b in enumerate(order):
            by_parent: dict[int, list[int]] = {}
            for r in part.bins[b]:
                by_parent.setdefault(tree.nodes[r].parent, []).append(r)  # type: ignore[arg-type]
            # a worker receives the trunk's outputs at its cuts for the items other workers ran
            others = sum(lengths) - (ranges[w][1] - ranges[w][0])
            self.stats["transfer_bytes"] += sum(tree.nodes[p].item_bytes for p in by_parent if p) * others
            jobs.append([Job(tuple(sorted({str(m) for r in roots for m in tree.nodes[r].models})), len(path[p]),
                             path[p] if p else None) for p, roots in sorted(by_parent.items())])
        return RungPlan(jobs, ranges, trunk)

    def _match(self, part: Partition, tree: TaskTree) -> list[int]:
        """``order[w]``: the bin worker ``w`` runs. Bins are interchangeable, so each goes to the
        worker that extracted most of its candidates last rung (its blocks are still loaded there)."""
        workers = len(part.bins)
        overlap = []
        for b, roots in enumerate(part.bins):
            names = {str(m) for r in roots for m in tree.nodes[r].models}
            for w in range(workers):
                overlap.append((-sum(self.held.get(n) == w for n in names), b, w))
        order = [-1] * workers
        used: set[int] = set()
        for _, b, w in sorted(overlap):
            if order[w] < 0 and b not in used:
                order[w] = b
                used.add(b)
        return order

    # -- scoring ----------------------------------------------------------------------------------------
    def score(self, items: list[tuple[str, "torch.Tensor", "torch.Tensor"]], y_train: "torch.Tensor",
              y_test: "torch.Tensor") -> dict[str, "ProxyScore"]:
        """Proxy scores, candidates spread over the workers (largest feature matrices first)."""
        ray = _ray()
        workers = len(self.executor.actors)
        bins: list[list[tuple[str, torch.Tensor, torch.Tensor]]] = [[] for _ in range(workers)]
        loads = [0] * workers
        for item in sorted(items, key=lambda it: -it[1].numel()):
            w = min(range(workers), key=lambda i: (loads[i], i))
            bins[w].append(item)
            loads[w] += item[1].numel()
        ys = ray.put(y_train), ray.put(y_test)
        calls = [a.score.remote(b, ys[0], ys[1], self.proxy, self.seed)
                 for a, b in zip(self.executor.actors, bins) if b]
        out: dict[str, ProxyScore] = {}
        for part in _get(calls):
            out.update(part)
        return out

    def close(self) -> None:
        """Let the workers drop this search's candidates and blocks."""
        if self.executor.actors:
            _get([a.reset.remote() for a in self.executor.actors])


def _paths(tree: TaskTree) -> dict[int, tuple[str, ...]]:
    """Block-id path from the root to every node (a node's identity across workers)."""
    out: dict[int, tuple[str, ...]] = {0: ()}
    stack = [0]
    while stack:
        nid = stack.pop()
        for block, child in tree.nodes[nid].children.items():
            out[child] = out[nid] + (block,)
            stack.append(child)
    return out


def _pieces(lengths: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """Items ``start:stop`` of the concatenated segments as (segment, start, stop) within each."""
    out, base = [], 0
    for i, n in enumerate(lengths):
        a, b = max(start, base), min(stop, base + n)
        if a < b:
            out.append((i, a - base, b - base))
        base += n
    return out


def _absorb(meter: Meter, other: Meter) -> None:
    """Add a worker's counters to the search's (its timings stay the worker's own)."""
    meter.block_inferences += other.block_inferences
    meter.unique_edges += other.unique_edges
    meter.cache_peak_bytes = max(meter.cache_peak_bytes, other.cache_peak_bytes)
    meter.bytes_loaded += other.bytes_loaded
    meter.spilled_bytes += other.spilled_bytes
    meter.chunks += other.chunks
    for depth, items in other.depth_items.items():
        meter.depth_items[depth] = meter.depth_items.get(depth, 0) + items

