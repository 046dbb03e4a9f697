"""The shared-queue baseline of distributed search, simulated on a task tree under the cost model
of ``mm_jupyter.modelsearch.partition`` (the paper's comparison for subtree partitioning).

**Shared queue** (the baseline, after Renggli et al.): the block steps in DFS order are one queue;
whichever worker is free takes the next step whose parent output exists somewhere. A step whose
parent output is not on that worker either recomputes the missing prefix (duplicated block work)
or receives the parent's output (a transfer), whichever the cost model says is cheaper.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Mapping

from ..modelsearch.tree import TaskTree


@dataclass
class QueueRun:
    """Outcome of the shared-queue simulation (costs per item, transfers in bytes per item)."""

    makespan: float
    busy: list[float]
    duplicated: float  # recomputed block work
    transfer_bytes: int
    transfers: int
    recomputed_steps: int = 0
    held: list[set[int]] = field(default_factory=list, repr=False)

    @property
    def balance(self) -> float:
        mean = sum(self.busy) / len(self.busy) if self.busy else 0.0
        return max(self.busy) / mean if mean else 1.0


POLICIES = ("recompute", "transfer", "cheaper")


def simulate_queue(tree: TaskTree, cost: Mapping[int, float], workers: int, order: list[int],
                   policy: str = "cheaper", byte_cost: float = 0.0) -> QueueRun:
    """Run the block steps ``order`` (node ids, parents first) as one shared queue on ``workers``
    workers: the worker free first takes the earliest step in queue order whose parent output
    exists by then (else the step whose parent output comes first). A worker keeps every output it
    computed or received. When a step's parent output is on another worker, the worker recomputes
    the missing prefix (from the nearest ancestor it holds, or the raw data: duplicated block work)
    or receives the parent's output (``byte_cost`` per byte): ``policy`` says which, ``"cheaper"``
    takes whichever costs less."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    pos = {n: i for i, n in enumerate(order)}
    held: list[set[int]] = [{0} for _ in range(workers)]
    free = [(0.0, w) for w in range(workers)]
    busy = [0.0] * workers
    done_at: dict[int | None, float] = {0: 0.0}  # by node id (looked up by parent ids: only the root's is None)
    avail = sorted(tree.nodes[0].children.values(), key=pos.__getitem__)
    duplicated = 0.0
    moved = transfers = recomputed = 0
    end = 0.0
    while avail:
        t, w = heapq.heappop(free)
        ready = [n for n in avail if done_at[tree.nodes[n].parent] <= t]
        step = min(ready, key=pos.__getitem__) if ready else min(
            avail, key=lambda n: (done_at[tree.nodes[n].parent], pos[n]))
        avail.remove(step)
        parent = tree.nodes[step].parent
        assert parent is not None
        start = max(t, done_at[parent])
        extra = 0.0
        if parent not in held[w]:
            missing: list[int] = []
            a: int | None = parent
            while a is not None and a not in held[w]:  # every worker holds the root (0)
                missing.append(a)
                a = tree.nodes[a].parent
            redo = sum(cost[n] for n in missing)
            receive = tree.nodes[parent].item_bytes * byte_cost
            if policy == "recompute" or (policy == "cheaper" and redo < receive):
                extra, duplicated, recomputed = redo, duplicated + redo, recomputed + len(missing)
                held[w].update(missing)
            else:
                extra = receive
                moved += tree.nodes[parent].item_bytes
                transfers += 1
                held[w].add(parent)
        finish = start + extra + cost[step]
        busy[w] += extra + cost[step]
        done_at[step] = finish
        end = max(end, finish)
        held[w].add(step)
        avail.extend(tree.nodes[step].children.values())
        heapq.heappush(free, (finish, w))
    return QueueRun(end, busy, duplicated, moved, transfers, recomputed, held)


def dfs_order(tree: TaskTree) -> list[int]:
    """Block steps (non-root nodes) in depth-first order: the queue's best order for locality."""
    out: list[int] = []
    stack = sorted(tree.nodes[0].children.values(), reverse=True)
    while stack:
        nid = stack.pop()
        out.append(nid)
        stack.extend(sorted(tree.nodes[nid].children.values(), reverse=True))
    return out
