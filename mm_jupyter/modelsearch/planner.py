"""The DFS+ planner (Alsatian, Section 5.3): an execution order for a task tree in which every
block runs once and the cache of intermediate outputs stays as small as possible.

Cache model, per data item (everything scales linearly with the items of a chunk):
* a node's output is in the cache from the inference that produced it until it is released;
* inferring edge ``v -> c`` needs ``v`` and ``c`` resident at once;
* ``v`` is released right after its last child has been computed from it;
* scoring a candidate reads its node's output (features move to the feature store).

``M(v)``, the peak of processing ``v``'s subtree with ``v`` resident: ``s(v)`` for a node without
children; otherwise, with children ``c_1..c_k`` in visiting order,
``max(max_{j<k}(s(v) + M(c_j)), s(v) + s(c_k), M(c_k))``. Visiting children in increasing order
of ``M`` puts the largest subtree last, where ``s(v)`` is no longer held — which minimises ``M(v)``
over all depth-first orders (exchange argument; checked against brute force in the tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Literal

from ..errors import SearchError
from .tree import TaskTree


@dataclass(frozen=True)
class Step:
    """``infer`` computes node ``node`` from its parent; ``score`` extracts ``model``'s features
    from ``node``; ``release`` drops ``node``'s output from the cache."""

    kind: Literal["infer", "score", "release"]
    node: int
    model: Hashable | None = None


@dataclass(frozen=True)
class Plan:
    """Steps for one chunk of ``chunk_items`` items, repeated for ``chunks`` chunks."""

    steps: tuple[Step, ...]
    peak_per_item: int  # C_min per item: the simulated peak of one pass over one item
    items: int
    chunk_items: int

    @property
    def chunks(self) -> int:
        return -(-self.items // self.chunk_items) if self.items else 0

    @property
    def c_min(self) -> int:
        """Peak cache bytes of processing all items in one pass."""
        return self.peak_per_item * self.items

    @property
    def peak_bytes(self) -> int:
        """Peak cache bytes of the plan as executed (one chunk at a time)."""
        return self.peak_per_item * min(self.chunk_items, self.items)

    @property
    def inferences_per_chunk(self) -> int:
        return sum(1 for s in self.steps if s.kind == "infer")


def requirements(tree: TaskTree) -> dict[int, int]:
    """``M(v)`` per node (bytes per item), computed bottom-up."""
    req: dict[int, int] = {}
    order = _postorder(tree)
    for nid in order:
        node = tree.nodes[nid]
        s = node.item_bytes
        kids = sorted(node.children.values(), key=lambda c: (req[c], c))
        if not kids:
            req[nid] = s
            continue
        peak = s
        for c in kids[:-1]:
            peak = max(peak, s + req[c])
        last = kids[-1]
        req[nid] = max(peak, s + tree.nodes[last].item_bytes, req[last])
    return req


def _postorder(tree: TaskTree) -> list[int]:
    out, stack = [], [(0, False)]
    while stack:
        nid, done = stack.pop()
        if done:
            out.append(nid)
            continue
        stack.append((nid, True))
        stack.extend((c, False) for c in tree.nodes[nid].children.values())
    return out


def plan_tree(tree: TaskTree, items: int, budget: int | None = None) -> Plan:
    """DFS+ plan for ``items`` items; when the one-pass peak exceeds ``budget`` bytes, the items
    are processed in chunks small enough to fit."""
    req = requirements(tree)
    steps = _expand(tree, req)
    per_item = req[0]
    chunk = items
    if budget is not None and items and per_item * items > budget:
        chunk = budget // per_item if per_item else items
        if chunk < 1:
            raise SearchError(
                f"cache budget of {budget} bytes is too small for one item: the plan needs {per_item} "
                "bytes of intermediate results per item"
            )
    return Plan(tuple(steps), per_item, items, max(1, chunk) if items else 0)


def _expand(tree: TaskTree, req: dict[int, int]) -> list[Step]:
    """The DFS+ step sequence (iterative, so deep trees do not hit the recursion limit)."""
    steps: list[Step] = []
    # work items: ("visit", node) or ("infer", child, parent, release_parent_after)
    work: list[tuple[Any, ...]] = [("visit", 0)]
    while work:
        item = work.pop()
        if item[0] == "infer":
            _, child, parent, last = item
            steps.append(Step("infer", child))
            if last:
                steps.append(Step("release", parent))
            work.append(("visit", child))
            continue
        nid = item[1]
        node = tree.nodes[nid]
        steps.extend(Step("score", nid, m) for m in node.ends)
        kids = sorted(node.children.values(), key=lambda c: (req[c], c))
        if not kids:
            steps.append(Step("release", nid))
            continue
        for i, c in enumerate(reversed(kids)):
            work.append(("infer", c, nid, i == 0))
    return steps


def simulate(tree: TaskTree, steps: tuple[Step, ...] | list[Step]) -> int:
    """Peak cache bytes per item of executing ``steps`` (checks the plan is valid while at it)."""
    resident = {0}
    size = tree.nodes[0].item_bytes
    peak = size
    done: set[int] = {0}
    for st in steps:
        node = tree.nodes[st.node]
        if st.kind == "infer":
            if node.parent not in resident:
                raise SearchError(f"plan infers node {st.node} while its parent is not cached")
            if st.node in done:
                raise SearchError(f"plan infers node {st.node} twice")
            resident.add(st.node)
            done.add(st.node)
            size += node.item_bytes
            peak = max(peak, size)
        elif st.kind == "release":
            resident.discard(st.node)
            size -= node.item_bytes
        elif st.node not in resident:
            raise SearchError(f"plan scores from node {st.node}, which is not cached")
    if done != set(tree.nodes):
        raise SearchError("plan leaves nodes uncomputed")
    return peak
