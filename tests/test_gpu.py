"""Search on the accelerator: the CUDA tests of scripts/gpu_check.sh.

They run on ``MM_JUPYTER_TEST_DEVICE`` (default: CUDA when there is one, else the CPU), so the same checks run
in every ``make test`` on a CPU and, through ``scripts/gpu_check.sh``, on a lent GPU: rankings equal shift's
and base's on the device, the device's features equal the CPU's within TF32-free float tolerance, live
successive-halving progress (events and the widget) works while the device scores and carries no device
tensors, a cache budget below C_min keeps the ranking, and the benchmarks' timings synchronise the device.
"""
from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

import mm_jupyter as mm
from mm_jupyter.bench.synthetic import sample_data, synthetic_candidates
from mm_jupyter.modelsearch.splitting import split_model

DEVICE = os.environ.get("MM_JUPYTER_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
#: the device's features against the CPU's (float32 with TF32 off; cuDNN may pick other algorithms)
RTOL, ATOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def task() -> tuple[list[Any], tuple[torch.Tensor, torch.Tensor]]:
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"MM_JUPYTER_TEST_DEVICE={DEVICE} but torch sees no CUDA device")
    cands = synthetic_candidates("resnet18", 6, "top-layers", seed=0, reduced=True)
    return cands, sample_data("resnet18", 192, seed=0, reduced=True)


@pytest.mark.slow
def test_rankings_on_the_device_equal_shift_and_base(task: tuple[list[Any], Any]) -> None:
    cands, data = task
    al = mm.search(cands, data, approach="alsatian", device=DEVICE)
    shift = mm.search(cands, data, approach="shift", device=DEVICE)
    assert list(al.ranking["model"]) == list(shift.ranking["model"])
    assert (al.ranking["score"].values == shift.ranking["score"].values).all()
    exact = mm.search(cands, data, approach="alsatian", device=DEVICE, halving=False)
    base = mm.search(cands, data, approach="base", device=DEVICE)
    assert list(exact.ranking["model"]) == list(base.ranking["model"])
    assert al.stats["block_inferences"] == al.stats["unique_edges"] < shift.stats["block_inferences"]


def test_device_features_equal_the_cpus(task: tuple[list[Any], Any]) -> None:
    cands, (x, _) = task
    split = split_model(cands[1])
    allow = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        outs = []
        for dev in ("cpu", DEVICE):
            h = x[:64].to(dev)
            with torch.inference_mode():
                for block in split.blocks:
                    block.module.to(dev)
                    h = block(h, {})
            outs.append(h.float().cpu())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = allow
        for block in split.blocks:
            block.module.to("cpu")
    torch.testing.assert_close(outs[1], outs[0], rtol=RTOL, atol=ATOL)


def _plain(value: Any) -> bool:
    """Nothing from the device: plain Python values all the way down."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def test_live_progress_while_the_device_scores(task: tuple[list[Any], Any]) -> None:
    """Events arrive rung by rung while the search runs (not all at its end), carry no device tensors (a
    widget or a log never touches the device), and the live widget follows them to the result's ranking."""
    from mm_jupyter.jupyter.widgets import SearchProgress

    cands, data = task
    widget = SearchProgress(throttle=0.0)
    seen: list[tuple[float, dict[str, Any]]] = []

    def progress(event: dict[str, Any]) -> None:
        seen.append((time.perf_counter(), event))
        widget(event)

    t0 = time.perf_counter()
    result = mm.search(cands, data, approach="alsatian", device=DEVICE, progress=progress)
    t1 = time.perf_counter()
    names = [e["event"] for _, e in seen]
    assert names[-1] == "done" and all(_plain(e) for _, e in seen), [e for _, e in seen if not _plain(e)]
    starts = [i for i, n in enumerate(names) if n == "rung_start"]
    ends = [i for i, n in enumerate(names) if n == "rung_end"]
    assert len(starts) == len(result.rungs) > 1 and all(s < e for s, e in zip(starts, ends))
    assert all(e < s for e, s in zip(ends, starts[1:]))  # a rung is reported before the next one runs
    first_rung_end = seen[ends[0]][0]
    assert t0 < first_rung_end < seen[-1][0] <= t1  # live: the first rung is told before the search ends
    assert widget.state == "done" and widget.renders > len(result.rungs)
    assert [e.model for e in widget.ranking] == list(result.ranking["model"])
    assert widget.cache_peak == result.stats["cache_peak_bytes"]


def test_a_cache_budget_below_c_min_keeps_the_ranking_on_the_device(task: tuple[list[Any], Any]) -> None:
    cands, data = task
    free = mm.search(cands, data, approach="alsatian", device=DEVICE)
    budget = max(1, free.stats["cache_peak_bytes"] // 4)
    limited = mm.search(cands, data, approach="alsatian", device=DEVICE, cache_budget=budget)
    assert limited.stats["chunks"] > free.stats["chunks"] and limited.stats["cache_peak_bytes"] <= budget
    assert list(limited.ranking["model"]) == list(free.ranking["model"])
    assert abs(limited.ranking["score"].values - free.ranking["score"].values).max() <= 1e-5


def test_the_benchmarks_time_the_device_synchronously() -> None:
    """Table 1's per-block times and Fig. 5's phases on the device (each timing waits for the device), and
    Fig. 5's cached input gives the features of the whole model there too."""
    from mm_jupyter.bench.alsatian import describe_model, table1_model
    from mm_jupyter.bench.bottleneck import score_one

    model, x = table1_model("ResNet-18", "quick")
    row = describe_model("ResNet-18", model, x, device=DEVICE, repeats=1)
    assert len(row["per_block_ms"]) == row["blocks"] and min(row["per_block_ms"]) > 0
    plain = score_one(model, 96, 32, device=DEVICE, repeats=1)
    cached = score_one(model, 96, 32, cached_blocks=3, device=DEVICE, repeats=1)
    assert cached["feature_checksum"] == pytest.approx(plain["feature_checksum"], rel=1e-5)
    assert all(plain[f"t_{p}"] > 0 for p in ("prepare data", "prepare model", "inference", "proxy"))
