"""The task tree (Alsatian, Section 5.1): candidates' shared block prefixes merged into one tree.

The root stands for the prepared input data; every other node is the output of one block applied
to its parent's output, so an edge is one block inference. Two candidates share a node exactly
when their block-id prefixes up to it are equal. A node *ends* the candidates whose feature
extractor stops there (their features are that node's output).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Sequence


@dataclass
class Node:
    """One intermediate result: produced by ``block`` from the parent's output."""

    id: int
    parent: int | None
    block: str | None  # block id of the edge parent -> this node (None for the root)
    item_bytes: int  # bytes of this node's output per data item
    children: dict[str, int] = field(default_factory=dict)  # block id -> node id
    models: set[Hashable] = field(default_factory=set)  # candidates whose path runs through here
    ends: list[Hashable] = field(default_factory=list)  # candidates whose features are this output


class TaskTree:
    """Add candidates as block-id paths; prune candidates; read nodes and edges."""

    def __init__(self, input_item_bytes: int) -> None:
        self.nodes: dict[int, Node] = {0: Node(0, None, None, int(input_item_bytes))}
        self._next = 1

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def add_model(self, model: Hashable, blocks: Sequence[str], item_bytes: Sequence[int]) -> int:
        """Merge a candidate's path (block ids and each block's output bytes per item); returns
        the node holding its features."""
        if len(blocks) != len(item_bytes):
            raise ValueError("one output size per block is needed")
        if not blocks:
            raise ValueError(f"candidate {model!r} has no blocks")
        node = self.root
        node.models.add(model)
        for block, size in zip(blocks, item_bytes):
            child = node.children.get(block)
            if child is None:
                child = self._next
                self._next += 1
                self.nodes[child] = Node(child, node.id, block, int(size))
                node.children[block] = child
            node = self.nodes[child]
            node.models.add(model)
        node.ends.append(model)
        return node.id

    def prune_models(self, models: Iterable[Hashable]) -> None:
        """Remove candidates breadth-first; nodes no candidate passes through any more (and
        their edges) are deleted."""
        gone = set(models)
        queue = deque([0])
        while queue:
            node = self.nodes[queue.popleft()]
            node.models -= gone
            node.ends = [m for m in node.ends if m not in gone]
            for block, child in list(node.children.items()):
                if not (self.nodes[child].models - gone):
                    self._drop(child)
                    del node.children[block]
                else:
                    queue.append(child)

    def _drop(self, node_id: int) -> None:
        stack = [node_id]
        while stack:
            node = self.nodes.pop(stack.pop())
            stack.extend(node.children.values())

    @property
    def edges(self) -> int:
        """Number of block inferences one pass over the data needs."""
        return len(self.nodes) - 1

    def models(self) -> list[Hashable]:
        return sorted(self.root.models, key=str)

    def path(self, model: Hashable) -> list[int]:
        """Node ids from the root to the node holding ``model``'s features."""
        out, node = [0], self.root
        while model not in node.ends:
            nxt = [c for c in node.children.values() if model in self.nodes[c].models]
            if not nxt:
                raise KeyError(model)
            node = self.nodes[nxt[0]]
            out.append(node.id)
        return out
