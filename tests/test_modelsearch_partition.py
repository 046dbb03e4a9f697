"""Subtree partitioning of a task tree for several workers, and the shared-queue baseline."""
from __future__ import annotations

import itertools

import pytest

from mm_jupyter.bench.queue import dfs_order, simulate_queue
from mm_jupyter.modelsearch.engine import batch_ranges
from mm_jupyter.modelsearch.partition import items_balance, partition_tree, split_batches, subtree_costs
from mm_jupyter.modelsearch.tree import TaskTree


def tree_of(paths: dict[str, list[str]], item_bytes: int = 100) -> tuple[TaskTree, dict[int, float]]:
    """A task tree from block-id paths; every block costs 1 per item except ``x*`` blocks (4)."""
    tree = TaskTree(10)
    cost: dict[int, float] = {}
    for name, path in paths.items():
        tree.add_model(name, path, [item_bytes] * len(path))
        for nid, block in zip(tree.path(name)[1:], path):
            cost[nid] = 4.0 if block.startswith("x") else 1.0
    return tree, cost


def covers_once(tree: TaskTree, part) -> bool:
    """Trunk and subtrees together hold every node exactly once, and a subtree is whole."""
    seen = list(part.trunk)
    for roots in part.bins:
        for r in roots:
            stack = [r]
            while stack:
                n = stack.pop()
                seen.append(n)
                stack.extend(tree.nodes[n].children.values())
    return sorted(seen) == sorted(n for n in tree.nodes if n)


def test_wide_tree_splits_at_the_root_and_balances():
    tree, cost = tree_of({f"m{i}": [f"a{i}", f"b{i}", f"c{i}"] for i in range(4)})
    part = partition_tree(tree, cost, 2)
    assert covers_once(tree, part) and not part.trunk
    assert part.loads == (6.0, 6.0) and part.makespan == 6.0 and part.balance == 1.0
    assert part.transfer_bytes(tree) == 0  # every subtree starts from the raw data


def test_shared_stem_becomes_the_trunk_and_its_output_is_shipped():
    # top-layers: a long shared stem, then four expensive distinct tails
    tree, cost = tree_of({f"m{i}": ["s0", "s1", "s2", f"x{i}", f"y{i}"] for i in range(4)})
    part = partition_tree(tree, cost, 2)
    assert covers_once(tree, part)
    stem = tree.path("m0")[1:4]
    assert list(part.trunk) == stem
    assert part.loads == (10.0, 10.0) and part.makespan == 13.0  # 3 (stem, once) + 10
    assert part.cuts(tree) == [stem[-1]]
    assert part.transfer_bytes(tree) == 100  # the stem's output, to the one worker that did not compute it


def test_one_worker_keeps_the_whole_tree_and_more_workers_never_model_slower():
    g = itertools.count()
    paths = {}
    for i in range(30):  # a random-ish derivation tree like the synthetic generator's
        src = paths.get(f"m{(i * 7) % max(i, 1)}", [f"r{j}" for j in range(6)])
        keep = (i * 5) % 6
        paths[f"m{i}"] = src[:keep] + [f"n{next(g)}" for _ in range(6 - keep)]
    tree, cost = tree_of(paths)
    total = subtree_costs(tree, cost)[0]
    one = partition_tree(tree, cost, 1)
    assert not one.trunk and one.makespan == total == sum(cost.values())
    spans = [partition_tree(tree, cost, w).makespan for w in (1, 2, 4, 8)]
    assert all(b <= a for a, b in zip(spans, spans[1:]))
    for w in (2, 4, 8):
        part = partition_tree(tree, cost, w)
        assert covers_once(tree, part)
        assert part.makespan >= total / w  # no partition beats perfect balance
    with pytest.raises(ValueError):
        partition_tree(tree, cost, 0)


def test_item_split_cuts_at_batch_ends_into_contiguous_even_ranges():
    batches = batch_ranges([100, 70], 32)  # segments batched from their own starts
    ends = {b for _, b in batches}
    ranges = split_batches(batches, 2)
    assert ranges == [(0, 96), (96, 170)] and items_balance(ranges) == pytest.approx(192 / 170)
    three = split_batches(batches, 3)
    assert three[0][0] == 0 and three[-1][1] == 170 and all(b in ends for _, b in three)
    assert all(x[1] == y[0] for x, y in zip(three, three[1:]))
    # fewer batches than workers: some get empty ranges
    assert split_batches(batch_ranges([40], 32), 3) == [(0, 32), (32, 32), (32, 40)]


def test_shared_queue_duplicates_or_moves_what_subtrees_keep_local():
    tree, cost = tree_of({f"m{i}": ["s0", "s1", f"x{i}", f"y{i}"] for i in range(6)})
    order = dfs_order(tree)
    assert sorted(order) == sorted(n for n in tree.nodes if n) and order[0] == tree.path("m0")[1]
    alone = simulate_queue(tree, cost, 1, order, "recompute")
    assert alone.duplicated == 0 and alone.transfers == 0 and alone.makespan == sum(cost.values())
    redo = simulate_queue(tree, cost, 3, order, "recompute")
    assert redo.duplicated > 0 and redo.transfers == 0  # a stem recomputed on other workers
    move = simulate_queue(tree, cost, 3, order, "transfer")
    assert move.duplicated == 0 and move.transfers > 0
    part = partition_tree(tree, cost, 3)
    assert part.transfer_bytes(tree) < move.transfer_bytes
    cheap = simulate_queue(tree, cost, 3, order, "cheaper", byte_cost=1.0)  # 100 B costs 100 > any prefix
    assert cheap.transfers == 0 and cheap.duplicated == redo.duplicated
    with pytest.raises(ValueError):
        simulate_queue(tree, cost, 2, order, "teleport")
