"""The transfer-learning exercise (digits 0-4 -> 5-9): splits, strategies, freezing, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from mm_jupyter.modelsearch.hashing import block_id
from mm_jupyter.modelsearch.splitting import split_model
from mm_jupyter.usecases import transfer as tr

pytestmark = pytest.mark.xdist_group("transfer")  # its module-scoped fixture is built once

SHOTS = 5
EPOCHS = 10  # enough to move every trainable tensor; the exercise's default is longer


@pytest.fixture(scope="module")
def task() -> tr.TransferTask:
    return tr.transfer_task(SHOTS, seed=0)


@pytest.fixture(scope="module")
def pretrained(task: tr.TransferTask) -> torch.nn.Module:
    return tr.pretrain(task, epochs=4, seed=0)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                       b.view(-1).view(torch.uint8))


def test_task_split(task: tr.TransferTask) -> None:
    xs, ys = task.source
    assert set(ys.tolist()) == set(range(5)) and len(xs) == len(ys) > 800
    xtr, ytr = task.target_train
    assert np.bincount(ytr.numpy(), minlength=5).tolist() == [SHOTS] * 5   # `shots` per target class
    for x, y in (task.target_pool, task.target_test):
        assert set(y.tolist()) == set(range(5)) and x.shape[1:] == (1, 8, 8)
    # the training examples come from the pool; the test set shares no image with either
    def rows(x: torch.Tensor) -> set[bytes]:
        return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}

    test, pool, train = rows(task.target_test[0]), rows(task.target_pool[0]), rows(xtr)
    assert train <= pool and not (test & pool)
    with pytest.raises(ValueError):
        tr.transfer_task(source_classes=(0, 1, 5), target_classes=(5, 6))


def test_pretrained_learns_source(task: tr.TransferTask, pretrained: torch.nn.Module) -> None:
    assert tr.accuracy(pretrained, task.source) > 0.9


@pytest.mark.parametrize("strategy,frozen", [("freeze-early", 1), ("freeze-most", 3), ("probe", 4)])
def test_frozen_blocks_stay_bit_identical(task, pretrained, strategy: str, frozen: int) -> None:
    before = _state(pretrained)
    res = tr.run_strategy(strategy, task, pretrained, epochs=EPOCHS, seed=0)
    assert res.frozen == frozen
    src, got = split_model(pretrained), split_model(res.model)
    for i, (a, b) in enumerate(zip(src.blocks, got.blocks)):
        sa, sb = a.module.state_dict(), b.module.state_dict()
        if i < frozen:
            assert all(_same(sa[k], sb[k]) for k in sa), f"{strategy}: frozen block {i} changed"
            assert block_id(a) == block_id(b)  # what lets model search share the block
        else:
            assert all(not torch.equal(sa[k], sb[k]) for k in sa), f"{strategy}: block {i} was not trained"
    assert res.model[-1].out_features == task.target_n_classes
    # the source model is never modified and the result is trainable again afterwards
    assert all(_same(before[k], v) for k, v in pretrained.state_dict().items())
    assert all(p.requires_grad for p in res.model.parameters())


def test_probe_trains_only_the_head(task, pretrained) -> None:
    res = tr.run_strategy("probe", task, pretrained, epochs=EPOCHS, seed=0)
    head = res.model[-1]
    assert res.trainable == head.weight.numel() + head.bias.numel()
    src, got = pretrained.state_dict(), res.model.state_dict()
    head_keys = {"10.weight", "10.bias"}
    assert set(got) == set(src)
    assert all(_same(src[k], got[k]) for k in src if k not in head_keys)  # the whole body, bit for bit
    assert all(not torch.equal(src[k], got[k]) for k in head_keys)       # a new, trained head


def test_trainable_counts(task, pretrained) -> None:
    total = sum(p.numel() for p in pretrained.parameters()) - sum(p.numel() for p in pretrained[-1].parameters())
    total += 64 * task.target_n_classes + task.target_n_classes
    counts = {s: tr.run_strategy(s, task, pretrained, epochs=1, seed=0).trainable for s in tr.STRATEGIES}
    assert counts["scratch"] == counts["finetune"] == total
    assert total > counts["freeze-early"] > counts["freeze-most"] > counts["probe"] > 0


@pytest.mark.slow
def test_deterministic_under_a_seed(task, pretrained) -> None:
    state = torch.random.get_rng_state()
    a = tr.run_strategy("finetune", task, pretrained, epochs=EPOCHS, seed=3)
    b = tr.run_strategy("finetune", task, pretrained, epochs=EPOCHS, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert a.accuracy == b.accuracy
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(_same(sa[k], sb[k]) for k in sa)
    c = tr.run_strategy("finetune", task, pretrained, epochs=EPOCHS, seed=4)
    assert not all(torch.equal(sa[k], v) for k, v in c.model.state_dict().items())
    again = tr.pretrain(task, epochs=4, seed=0)
    assert all(_same(v, again.state_dict()[k]) for k, v in pretrained.state_dict().items())


def test_transfer_beats_chance_and_scratch_is_a_real_baseline(task, pretrained) -> None:
    ex = tr.run_exercise(task, strategies=("scratch", "probe"), pretrain_epochs=4, epochs=20, seed=0)
    assert all(r.accuracy > 0.4 for r in ex.results)  # chance is 0.2 for five target digits
    assert list(ex.frame()["strategy"]) == ["scratch", "probe"]
    assert ex.by("probe").seconds >= 0 and ex.by("scratch").frozen == 0
    with pytest.raises(ValueError):
        tr.run_strategy("freeze-everything", task, pretrained)


def test_model_zoo_shares_frozen_prefixes(task, pretrained) -> None:
    zoo = tr.model_zoo(4, task, pretrained, epochs=1, seed=0)
    names = list(zoo)
    assert names[0] == "src-0.1.2.3.4" and zoo[names[0]] is pretrained
    assert [n.split("-")[1] for n in names[1:]] == ["early", "most", "probe"]
    src_ids = [block_id(b) for b in split_model(pretrained).blocks]
    for name, shared in zip(names[1:], (1, 3, 4)):
        ids = [block_id(b) for b in split_model(zoo[name]).blocks]
        assert ids[:shared] == src_ids[:shared]
        assert all(a != b for a, b in zip(ids[shared:], src_ids[shared:]))
        assert zoo[name][-1].out_features == len(name.split("-")[2].split("."))
    again = tr.model_zoo(4, task, pretrained, epochs=1, seed=0)
    assert list(again) == names
    assert all(_same(v, again[names[1]].state_dict()[k]) for k, v in zoo[names[1]].state_dict().items())
