"""Exercise 2's optimisation task: cached frozen-prefix features train exactly what the plain loop
trains, every optimisation runs and is measured, and the runs are recorded in (and recovered from) the store."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")

import mm_jupyter as mm
from mm_jupyter.usecases import transfer as tr

EPOCHS = 6


@pytest.fixture(scope="module")
def task() -> tr.TransferTask:
    return tr.transfer_task(5, seed=0)


@pytest.fixture(scope="module")
def pretrained(task: tr.TransferTask) -> torch.nn.Module:
    return tr.pretrain(task, epochs=2, seed=0)


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("strategy", ["freeze-most", "probe"])
def test_plain_run_is_fit_and_cached_features_train_the_same_bits(task, pretrained, strategy):
    fitted = tr.fit(tr.prepare(strategy, pretrained, 5, seed=1), task.target_train, epochs=EPOCHS, seed=1)
    config = {"strategy": strategy, "epochs": EPOCHS, "lr": tr.LR, "batch_size": tr.BATCH_SIZE, "seed": 1}
    plain = tr.train_run(tr.prepare(strategy, pretrained, 5, seed=1), task.target_train, config)
    assert _states_equal(plain, fitted), "optimisation 'none' is the plain loop of fit"
    tr.FEATURES.clear()
    cached = [tr.train_run(tr.prepare(strategy, pretrained, 5, seed=1), task.target_train,
                           {**config, "optimisation": "cached-features", "lr": lr}) for lr in (tr.LR, 0.01)]
    assert tr.FEATURES.computed == 1 and tr.FEATURES.reused == 1, "features extracted once, reused by the second run"
    assert _states_equal(cached[0], plain), "same mini-batches, same arithmetic: same trained bytes"
    assert not _states_equal(cached[1], plain)
    for name, p in cached[0].named_parameters():
        assert p.requires_grad, name  # the caller gets a normal model back


def test_optimisation_runs_are_measured_and_recorded_in_the_store(task, pretrained, tmp_path):
    runs = tr.optimisation_runs(task, pretrained, strategies=("probe",), lrs=(tr.LR,), epochs=EPOCHS, seed=0,
                                optimisations=("none", "cached-features", "bf16", "channels-last"))
    frame = tr.runs_frame(runs)
    assert list(frame["optimisation"]) == ["none", "cached-features", "bf16", "channels-last"]
    assert (frame["seconds"] > 0).all() and frame.loc[0, "speedup"] == pytest.approx(1.0)
    assert frame.loc[1, "accuracy_change"] == 0.0      # identical training
    assert all(0.0 <= a <= 1.0 for a in frame["accuracy"])
    with pytest.raises(ValueError, match="unknown optimisation"):
        tr.train_run(tr.prepare("probe", pretrained, 5), task.target_train, {"strategy": "probe", "optimisation": "x"})

    store = mm.Store(tmp_path / "store")
    ref = tr.record_runs(store, runs, task, pretrained, name="ex2", seed=0)
    assert ref.version == 2 and store.row(ref).approach == "provenance"
    recorded = tr.recorded_runs(store, ref)
    assert list(recorded["run"]) == [r.run for r in runs]
    assert list(recorded["accuracy"]) == [r.accuracy for r in runs]
    assert set(recorded.columns) >= {"strategy", "optimisation", "lr", "epochs", "seconds"}
    tr.FEATURES.clear()
    recovered = store.recover_set(ref)                 # retrains every run and checks every tensor
    for r in runs:
        assert _states_equal(recovered[r.run], r.model), r.run
    lineage = store.lineage("ex2").versions[-1]
    assert len(lineage.datasets) == len(runs) and lineage.datasets[0][1].startswith(tr.RUN_LOADER)
