"""Splitting a rung's task tree among workers: whole subtrees per worker (Alsatian's distributed
step), balanced by a cost model. The shared-queue alternative it is compared with is simulated
in ``mm_jupyter.bench.queue``.

**Cost model** (per data item; a rung multiplies everything by its items):

* *compute*: the edge into node ``v`` (one block inference) costs ``cost[v]``: the block's
  floating-point operations on one item as torch's ``FlopCounterMode`` counts them on the
  one-item probe, and at least its output elements, so a lookup or element-wise block is not free;
* *transfer*: handing node ``v``'s output to another worker moves ``item_bytes(v)`` bytes.

**Subtree partitioning.** Every worker receives whole subtrees (a node and all its descendants),
which it runs with the DFS+ planner under its own cache budget, so the prefixes shared inside a
subtree and their cached intermediates stay on one worker and nothing is computed twice. When the
tree is too narrow at the top (``top-layers``: every candidate shares a long stem), the stem is
split off as the *trunk*: one worker runs it first and ships its outputs at the *cut nodes* (the
parents of the subtrees below it) once to the workers that need them. The subtrees are chosen
greedily: start with the root's children; repeatedly move the most expensive subtree's root into
the trunk (its children become subtrees); pack the subtrees longest first onto the least loaded
worker (LPT); keep the partition with the lowest modelled makespan ``trunk + max(load)``.

**Item split.** Late rungs keep few candidates, often one subtree or only a trunk, so no subtree
partition is even. When the best one's balance exceeds ``BALANCE_LIMIT``, the rung's items are
split instead: every worker runs the whole tree on a contiguous run of whole batches
(``split_batches``), as even in items as the batches allow.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Mapping

from .tree import TaskTree

BALANCE_LIMIT = 1.25  # a subtree partition less even than this gives way to the item split


def subtree_costs(tree: TaskTree, cost: Mapping[int, float]) -> dict[int, float]:
    """``C(v)``: the cost of the edge into ``v`` plus every edge below it (the root costs 0)."""
    out: dict[int, float] = {}
    order = [0]
    for nid in order:  # breadth-first, then summed bottom-up
        order.extend(tree.nodes[nid].children.values())
    for nid in reversed(order):
        node = tree.nodes[nid]
        out[nid] = (cost[nid] if nid else 0.0) + sum(out[c] for c in node.children.values())
    return out


@dataclass(frozen=True)
class Partition:
    """Work of one rung for ``workers`` workers (all costs per item).

    ``trunk``: nodes one worker computes first; ``bins[w]``: roots of the whole subtrees worker
    ``w`` runs; ``cuts``: trunk nodes whose outputs are handed to subtrees; ``trunk_worker``: the
    worker that runs the trunk (the least loaded one)."""

    workers: int
    trunk: tuple[int, ...]
    bins: tuple[tuple[int, ...], ...]
    loads: tuple[float, ...]
    trunk_cost: float
    total: float
    trunk_worker: int

    @property
    def makespan(self) -> float:
        """Modelled time: the trunk, then the most loaded worker."""
        return self.trunk_cost + max(self.loads, default=0.0)

    @property
    def balance(self) -> float:
        """Most loaded worker over the mean load (1.0 = perfectly even; the trunk counts for the
        worker that runs it)."""
        loads = [load + (self.trunk_cost if w == self.trunk_worker else 0.0) for w, load in enumerate(self.loads)]
        mean = sum(loads) / len(loads) if loads else 0.0
        return max(loads) / mean if mean else 1.0

    def cuts(self, tree: TaskTree) -> list[int]:
        """Trunk nodes whose output some subtree starts from."""
        return sorted({p for roots in self.bins for r in roots if (p := tree.nodes[r].parent)})

    def transfer_bytes(self, tree: TaskTree) -> int:
        """Bytes per item handed between workers: each cut output once to every worker that
        needs it (the raw data every worker receives anyway is not counted)."""
        out = 0
        for w, roots in enumerate(self.bins):
            if w == self.trunk_worker:
                continue
            for p in {tree.nodes[r].parent for r in roots}:
                if p:
                    out += tree.nodes[p].item_bytes
        return out


def _pack(roots: list[int], sub: Mapping[int, float], workers: int) -> tuple[list[list[int]], list[float]]:
    """Longest processing time first onto the least loaded worker."""
    bins: list[list[int]] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    heap = [(0.0, w) for w in range(workers)]
    for r in sorted(roots, key=lambda n: (-sub[n], n)):
        load, w = heapq.heappop(heap)
        bins[w].append(r)
        loads[w] = load + sub[r]
        heapq.heappush(heap, (loads[w], w))
    return bins, loads


def partition_tree(tree: TaskTree, cost: Mapping[int, float], workers: int) -> Partition:
    """The subtree partition of ``tree`` for ``workers`` workers with the lowest modelled makespan
    among those the greedy split visits (see the module docstring)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    sub = subtree_costs(tree, cost)
    total = sub[0]
    frontier = list(tree.nodes[0].children.values())
    trunk: list[int] = []
    trunk_cost = 0.0
    best: tuple[float, int, list[list[int]], list[float]] | None = None
    while True:
        bins, loads = _pack(frontier, sub, workers)
        span = trunk_cost + max(loads, default=0.0)
        if best is None or span < best[0] - 1e-9 * max(total, 1.0):
            best = (span, len(trunk), bins, loads)
        splittable = [n for n in frontier if tree.nodes[n].children]
        if workers == 1 or not splittable or trunk_cost >= best[0]:
            break
        top = max(splittable, key=lambda n: (sub[n], -n))
        if sub[top] * workers <= total:  # every subtree already fits an even share
            break
        frontier.remove(top)
        frontier.extend(tree.nodes[top].children.values())
        trunk.append(top)
        trunk_cost += cost[top]
    span, kept, bins, loads = best
    chosen = trunk[:kept]
    worker = min(range(workers), key=lambda w: (loads[w], w))
    return Partition(workers, tuple(chosen), tuple(tuple(b) for b in bins), tuple(loads),
                     sum(cost[n] for n in chosen), total, worker)


def split_batches(batches: list[tuple[int, int]], workers: int) -> list[tuple[int, int]]:
    """Item range per worker: contiguous runs of whole ``batches`` (consecutive, covering the
    items from 0), their ends as near to even shares as the batch ends allow; a worker left
    without a batch gets an empty range."""
    total = batches[-1][1] if batches else 0
    ends = [b for _, b in batches]
    cuts = [0]
    for w in range(1, workers):
        target = total * w / workers
        cuts.append(max(cuts[-1], min(ends, key=lambda e: (abs(e - target), e), default=0)))
    cuts.append(total)
    return [(cuts[w], cuts[w + 1]) for w in range(workers)]


def items_balance(ranges: list[tuple[int, int]]) -> float:
    """Most items on one worker over the mean (1.0 = even)."""
    total = sum(b - a for a, b in ranges)
    return max(b - a for a, b in ranges) * len(ranges) / total if total else 1.0
