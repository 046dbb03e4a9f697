"""DFS+ planner against exhaustive enumeration of depth-first orders on random small trees."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from mm_jupyter.errors import SearchError
from mm_jupyter.modelsearch.planner import Step, plan_tree, requirements, simulate
from mm_jupyter.modelsearch.tree import TaskTree


def random_tree(rng: random.Random, models: int, depth: int) -> TaskTree:
    """Candidates share prefixes: each copies a random earlier path and replaces a random suffix."""
    tree = TaskTree(input_item_bytes=rng.randint(1, 50))
    sizes: dict[str, int] = {}
    paths: list[list[str]] = []
    for m in range(models):
        if paths and rng.random() < 0.8:
            base = rng.choice(paths)
            keep = rng.randint(0, len(base))
            extra = rng.randint(0, max(0, depth - keep)) or (0 if keep else 1)
            path = base[:keep] + [f"b{m}_{j}" for j in range(extra)]
        else:
            path = [f"b{m}_{j}" for j in range(rng.randint(1, depth))]
        for b in path:
            sizes.setdefault(b, rng.randint(1, 100))
        paths.append(path)
        tree.add_model(m, path, [sizes[b] for b in path])
    return tree


def all_dfs_orders(tree: TaskTree, nid: int = 0):
    """Every depth-first step sequence (any child order at every node), parent released after
    its last child was computed."""
    node = tree.nodes[nid]
    head = [Step("score", nid, m) for m in node.ends]
    kids = list(node.children.values())
    if not kids:
        yield head + [Step("release", nid)]
        return

    def rec(perm: tuple[int, ...], i: int):  # the children from perm[i] on, each subtree depth-first
        if i == len(perm):
            yield []
            return
        c = perm[i]
        pre = [Step("infer", c)] + ([Step("release", nid)] if i == len(perm) - 1 else [])
        for sub in all_dfs_orders(tree, c):
            for rest in rec(perm, i + 1):
                yield pre + sub + rest

    for perm in itertools.permutations(kids):
        yield from (head + seq for seq in rec(perm, 0))


def test_brute_force_yields_every_depth_first_order_once() -> None:
    """The oracle below is complete: one order per choice of child order at every node."""
    for seed in range(60):
        rng = random.Random(seed)
        tree = random_tree(rng, models=rng.randint(1, 5), depth=3)
        want = math.prod(math.factorial(len(node.children)) for node in tree.nodes.values())
        orders = [tuple(order) for order in all_dfs_orders(tree)]
        assert len(orders) == len(set(orders)) == want, seed


@pytest.mark.parametrize("seed", range(60))
def test_planner_is_optimal_against_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    tree = random_tree(rng, models=rng.randint(1, 5), depth=3)
    plan = plan_tree(tree, items=10)
    # the reported peak is the simulated peak of the plan itself
    assert simulate(tree, plan.steps) == plan.peak_per_item == requirements(tree)[0]
    # every edge runs exactly once and every candidate is scored once
    infers = [s.node for s in plan.steps if s.kind == "infer"]
    assert sorted(infers) == sorted(n for n in tree.nodes if n != 0)
    scored = [s.model for s in plan.steps if s.kind == "score"]
    assert sorted(scored) == sorted(tree.root.models)
    # no depth-first order has a lower peak
    best = min(simulate(tree, order) for order in itertools.islice(all_dfs_orders(tree), 20000))
    assert plan.peak_per_item == best


def test_shared_prefix_is_one_edge_and_prune_removes_empty_edges() -> None:
    tree = TaskTree(4)
    tree.add_model("a", ["x", "y", "p"], [8, 8, 2])
    tree.add_model("b", ["x", "y", "q"], [8, 8, 2])
    tree.add_model("c", ["x", "z"], [8, 2])
    assert tree.edges == 5  # x, y, p, q, z
    tree.prune_models(["a", "c"])
    assert tree.edges == 3 and tree.models() == ["b"]
    assert [tree.nodes[n].block for n in tree.path("b")[1:]] == ["x", "y", "q"]


def test_chunks_fit_the_budget_and_tiny_budget_is_an_error() -> None:
    rng = random.Random(3)
    tree = random_tree(rng, 4, 3)
    per_item = requirements(tree)[0]
    plan = plan_tree(tree, items=1000, budget=per_item * 37)
    assert plan.chunk_items == 37 and plan.chunks == 28 and plan.peak_bytes <= per_item * 37
    assert plan_tree(tree, items=10, budget=per_item * 100).chunks == 1
    with pytest.raises(SearchError, match="too small for one item"):
        plan_tree(tree, items=10, budget=per_item - 1)


def test_deep_tree_does_not_recurse() -> None:
    tree = TaskTree(1)
    tree.add_model("deep", [f"b{i}" for i in range(5000)], [1] * 5000)
    plan = plan_tree(tree, items=1)
    assert plan.inferences_per_chunk == 5000 and simulate(tree, plan.steps) == 2
