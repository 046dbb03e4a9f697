"""Feature extraction: shared (Alsatian: task tree + DFS+ plan + tiered cache) and whole-model
(the ``base`` and ``shift`` baselines).

Both paths cut the items into the same batches (``batch_size`` from the start of every segment,
chunks a multiple of the batch size), so a block sees exactly the same inputs either way and the
features — and hence the scores and rankings — are identical.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Collection, Hashable, Protocol

from ..errors import SearchError
from .cache import TieredCache
from .planner import Plan, plan_tree
from .tree import TaskTree

if TYPE_CHECKING:
    import torch

    from .blocks import Block

Progress = Callable[[dict[str, Any]], None]


class Tap(Protocol):
    """Receives chosen block outputs during shared extraction (see ``extract_shared``)."""

    @property
    def paths(self) -> Collection[tuple[str, ...]]: ...

    def take(self, path: tuple[str, ...], start: int, stop: int, output: "torch.Tensor") -> None: ...


@dataclass
class Meter:
    """Counters and time buckets shared by every approach."""

    timings: dict[str, float] = field(default_factory=lambda: {
        "prepare data": 0.0, "prepare model": 0.0, "inference": 0.0, "proxy": 0.0, "planning": 0.0})
    block_inferences: int = 0
    unique_edges: int = 0
    cache_peak_bytes: int = 0
    bytes_loaded: int = 0
    spilled_bytes: int = 0
    chunks: int = 0
    depth_items: dict[int, int] = field(default_factory=dict)

    def ran(self, depth: int, items: int) -> None:
        """Count one block inference of the block at ``depth`` over ``items`` items."""
        self.block_inferences += 1
        self.depth_items[depth] = self.depth_items.get(depth, 0) + items

    def add(self, bucket: str, seconds: float) -> None:
        self.timings[bucket] += seconds

    def stats(self) -> dict[str, Any]:
        """Counters; ``items_per_depth[d]`` is how many items went through blocks at depth ``d``
        (the work done, which the benchmark turns into a modelled inference time)."""
        depth = max(self.depth_items, default=-1) + 1
        return {
            "block_inferences": self.block_inferences,
            "unique_edges": self.unique_edges,
            "cache_peak_bytes": self.cache_peak_bytes,
            "bytes_loaded": self.bytes_loaded,
            "spilled_bytes": self.spilled_bytes,
            "chunks": self.chunks,
            "items_per_depth": [self.depth_items.get(d, 0) for d in range(depth)],
        }


class Candidate:
    """One candidate as the engine sees it: named blocks, their ids and output sizes, and how to
    get a block (in memory, or loaded from a store on first use)."""

    def __init__(self, name: Hashable, blocks: Callable[[int], "Block"], count: int,
                 context: Callable[["torch.Tensor"], dict[str, Any]], ids: list[str] | None = None,
                 sizes: list[int] | None = None, nbytes: Callable[[int], int] | None = None,
                 costs: list[float] | None = None) -> None:
        self.name = name
        self._blocks = blocks
        self.count = count
        self.context = context
        self.ids = ids
        self.sizes = sizes
        self._nbytes = nbytes or (lambda i: 0)
        self.costs = costs  # per-item cost of each block (distributed runs balance by it)

    def block(self, i: int, meter: Meter) -> "Block":
        meter.bytes_loaded += self._nbytes(i)
        return self._blocks(i)

    def prefix(self, depth: int, name: Hashable) -> "Candidate":
        """The first ``depth`` blocks as a candidate called ``name``: its "features" are the
        intermediate output at that depth (what a distributed trunk hands to other workers)."""
        return Candidate(name, self._blocks, depth, self.context, None if self.ids is None else self.ids[:depth],
                         None if self.sizes is None else self.sizes[:depth], self._nbytes)


def batch_ranges(lengths: list[int], batch_size: int) -> list[tuple[int, int]]:
    """Batches over the concatenation of segments, each segment batched from its own start."""
    out, base = [], 0
    for n in lengths:
        out += [(base + a, base + min(a + batch_size, n)) for a in range(0, n, batch_size)]
        base += n
    return out


def chunk_ranges(batches: list[tuple[int, int]], chunk_items: int) -> list[list[tuple[int, int]]]:
    """Group consecutive batches into chunks of at most ``chunk_items`` items; a batch larger than
    a chunk is cut (the only case in which batches differ from the whole-model path)."""
    chunks: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    size = 0
    for a, b in batches:
        if b - a > chunk_items:
            if current:
                chunks.append(current)
                current, size = [], 0
            chunks += [[(x, min(x + chunk_items, b))] for x in range(a, b, chunk_items)]
            continue
        if size + (b - a) > chunk_items and current:
            chunks.append(current)
            current, size = [], 0
        current.append((a, b))
        size += b - a
    if current:
        chunks.append(current)
    return chunks


def _context(cand: Candidate, raw: "torch.Tensor", device: str) -> dict[str, Any]:
    from .blocks import block_failure

    try:
        return {k: v.to(device) for k, v in cand.context(raw).items()}
    except Exception as e:  # noqa: BLE001 - one line naming the candidate
        raise block_failure(cand.name, None, None, e) from None


def _apply(block: "Block", h: "torch.Tensor", raw: "torch.Tensor", batches: list[tuple[int, int]],
           cand: Candidate, depth: int, device: str) -> "torch.Tensor":
    """Run one block over a chunk, batch by batch (``batches`` relative to the chunk)."""
    import torch

    from .blocks import block_failure

    out = None
    with torch.inference_mode():
        for a, b in batches:
            ctx = _context(cand, raw[a:b], device)
            try:
                # a copy: a block may write its input in place (``x.mul_``, ``ReLU(inplace=True)``), and ``h`` is
                # the cached output other blocks read too (a copy costs little beside a block's arithmetic)
                o = block(h[a:b].to(device, copy=True), ctx)
                if out is None:
                    out = torch.empty((len(h), *o.shape[1:]), dtype=o.dtype, device=o.device)
                out[a:b] = o
            except Exception as e:  # noqa: BLE001 - one line naming the candidate and block
                raise block_failure(cand.name, depth, block, e) from None
    assert out is not None
    return out


def extract_whole(cand: Candidate, segments: list["torch.Tensor"], *, batch_size: int, device: str,
                  meter: Meter) -> list["torch.Tensor"]:
    """Features of one candidate per segment, the model loaded whole and every block run on every
    batch (no sharing): the ``base`` and ``shift`` path."""
    import torch

    from .blocks import block_failure

    t0 = time.perf_counter()
    blocks = [cand.block(i, meter) for i in range(cand.count)]
    meter.add("prepare model", time.perf_counter() - t0)
    raw = torch.cat(segments) if len(segments) > 1 else segments[0]
    feats = None
    t0 = time.perf_counter()
    with torch.inference_mode():
        for a, b in batch_ranges([len(s) for s in segments], batch_size):
            batch = raw[a:b]
            ctx = _context(cand, batch, device)
            h = batch.to(device, copy=True)  # a block may write its input in place: never the caller's data
            for depth, blk in enumerate(blocks):
                try:
                    h = blk(h, ctx)
                except Exception as e:  # noqa: BLE001 - one line naming the candidate and block
                    raise block_failure(cand.name, depth, blk, e) from None
            f = h.reshape(len(batch), -1).float().cpu()
            if feats is None:
                feats = torch.empty((len(raw), f.shape[1]), dtype=f.dtype)
            feats[a:b] = f
    meter.add("inference", time.perf_counter() - t0)
    for depth in range(cand.count):
        meter.ran(depth, len(raw))
    meter.unique_edges += cand.count
    assert feats is not None
    return _split(feats, segments)


def _split(feats: "torch.Tensor", segments: list["torch.Tensor"]) -> list["torch.Tensor"]:
    out, at = [], 0
    for s in segments:
        out.append(feats[at : at + len(s)])
        at += len(s)
    return out


def plan_for(cands: list[Candidate], raw: "torch.Tensor", budget: int | None,
             meter: Meter, start: int = 0) -> tuple[TaskTree, Plan]:
    """Task tree of ``cands`` (their blocks from depth ``start`` on) over the items of ``raw``
    (the input at that depth) and its DFS+ plan."""
    t0 = time.perf_counter()
    per_item = raw[:1].element_size() * max(1, raw[:1].numel())
    tree = TaskTree(per_item)
    for c in cands:
        assert c.ids is not None and c.sizes is not None
        tree.add_model(c.name, c.ids[start:], c.sizes[start:])
    plan = plan_tree(tree, max(1, len(raw)), budget)
    meter.add("planning", time.perf_counter() - t0)
    meter.unique_edges += tree.edges
    return tree, plan


def extract_shared(cands: list[Candidate], segments: list["torch.Tensor"], *, batch_size: int, device: str,
                   budget: int | None, meter: Meter, progress: Progress | None = None,
                   host_budget: int | None = None,
                   resident: dict[tuple[str, ...], "Block"] | None = None, from_depth: int = 0,
                   inputs: "torch.Tensor | None" = None,
                   exports: Collection[Hashable] = (),
                   tap: Tap | None = None) -> list[dict[Hashable, "torch.Tensor"]]:
    """Features of all candidates per segment, every shared block run once per chunk (Alsatian):
    one task tree, one DFS+ plan, and the same batches as the whole-model path.

    ``resident`` keeps loaded blocks across calls (rungs), keyed by their block-id path from the
    root, so a block still needed by surviving candidates is not loaded again. A subtree starts at
    depth ``from_depth`` from ``inputs`` (the candidates' shared first ``from_depth`` blocks' output on
    the items of ``segments``, which still give the batches and the blocks' context); candidates
    named in ``exports`` yield their last output as it is (not flattened to features).

    ``tap`` (kept features) receives every block output whose block-id path it names:
    ``tap.take(path, start, stop, output)`` for items ``start:stop`` of the concatenated segments.
    With a tap, batches are never cut (chunks hold whole batches), so an output depends only on its
    batch's items, whatever the budget.

    Off the CPU the cache has two memory tiers: ``budget`` bytes on ``device`` and ``host_budget``
    bytes of host memory (None: unbounded); what fits neither spills to disk."""
    import torch

    if not cands:
        return [{} for _ in segments]
    raw = torch.cat(segments) if len(segments) > 1 else segments[0]
    root = raw if inputs is None else inputs
    tree, plan = plan_for(cands, root, budget, meter, from_depth)
    chunk_items = plan.chunk_items
    if tap is not None:
        chunk_items = max(chunk_items, batch_size)
    if batch_size <= chunk_items < len(raw):
        chunk_items = chunk_items // batch_size * batch_size  # whole batches per chunk
    chunks = chunk_ranges(batch_ranges([len(s) for s in segments], batch_size), max(1, chunk_items))
    source: dict[int, tuple[Candidate, int]] = {}
    for c in cands:
        for depth, nid in enumerate(tree.path(c.name)[1:], from_depth):
            source.setdefault(nid, (c, depth))
    uses: dict[int, list[int]] = {}
    for pos, st in enumerate(plan.steps):
        node = tree.nodes[st.node]
        if st.kind == "infer" and node.parent is not None:
            uses.setdefault(node.parent, []).append(pos)
        elif st.kind == "score":
            uses.setdefault(st.node, []).append(pos)
    now = [0]

    def next_use(key: int) -> int:
        return next((p for p in uses.get(key, []) if p >= now[0]), 1 << 60)

    devices = [device] if device == "cpu" else [device, "cpu"]
    budgets: list[int | None] = [budget] if device == "cpu" else [budget, host_budget]
    loaded: dict[tuple[str, ...], Block] = resident if resident is not None else {}
    prefix: dict[int, tuple[str, ...]] = {0: tuple(cands[0].ids[:from_depth])}  # type: ignore[index]
    for nid in sorted(tree.nodes):
        node = tree.nodes[nid]
        for block, child in node.children.items():
            prefix[child] = prefix[nid] + (block,)
    feats: dict[Hashable, torch.Tensor] = {}
    try:
        for batches in chunks:
            start, stop = batches[0][0], batches[-1][1]
            piece = raw[start:stop]
            local = [(a - start, b - start) for a, b in batches]
            cache = TieredCache(devices, budgets, next_use)
            meter.chunks += 1
            try:
                cache.put(0, root[start:stop].to(device))
                for pos, st in enumerate(plan.steps):
                    now[0] = pos
                    node = tree.nodes[st.node]
                    if st.kind == "infer":
                        cand, depth = source[st.node]
                        key = prefix[st.node]
                        if key not in loaded:
                            t0 = time.perf_counter()
                            loaded[key] = cand.block(depth, meter)
                            meter.add("prepare model", time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        parent = cache.get(node.parent, device)  # type: ignore[arg-type]
                        out = _apply(loaded[key], parent, piece, local, cand, depth, device)
                        del parent
                        if tap is not None and key in tap.paths:
                            tap.take(key, start, stop, out)
                        cache.put(st.node, out)
                        meter.add("inference", time.perf_counter() - t0)
                        meter.ran(depth, len(piece))
                    elif st.kind == "score":
                        f = cache.get(st.node, device)
                        f = f.cpu() if st.model in exports else f.reshape(len(piece), -1).float().cpu()
                        if st.model not in feats:
                            feats[st.model] = torch.empty((len(raw), *f.shape[1:]), dtype=f.dtype)
                        feats[st.model][start:stop] = f
                    else:
                        cache.release(st.node)
                meter.cache_peak_bytes = max(meter.cache_peak_bytes, cache.peak)
                meter.spilled_bytes += cache.spilled_bytes
                if progress is not None:
                    progress({"event": "cache", "bytes": cache.peak, "chunk": meter.chunks})
            finally:
                cache.close()
    finally:
        if resident is None:
            loaded.clear()
    return [{name: _split(f, segments)[i] for name, f in feats.items()} for i in range(len(segments))]


def check_items(x: Any, y: Any) -> None:
    if len(x) != len(y):
        raise SearchError(f"data has {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise SearchError("data is empty")
