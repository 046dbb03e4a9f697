"""Search over Hugging Face candidates (reduced sizes): alsatian agrees with shift and base."""
from __future__ import annotations

import pytest
import torch

import mm_jupyter as mm

pytest.importorskip("transformers")
from mm_jupyter.bench.synthetic import sample_data, synthetic_candidates


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "vit", "bert"])
def test_same_result_for_every_approach(arch):
    cands = synthetic_candidates(arch, 6, "top-25", seed=1)
    data = sample_data(arch, 240, seed=2)
    shared = mm.search(cands, data, k=1, approach="alsatian", batch_size=32)
    whole = mm.search(cands, data, k=1, approach="shift", batch_size=32)
    assert list(shared.ranking["model"]) == list(whole.ranking["model"])
    assert torch.allclose(torch.tensor(shared.ranking["score"].values), torch.tensor(whole.ranking["score"].values))
    assert shared.stats["block_inferences"] == shared.stats["unique_edges"] < whole.stats["block_inferences"]
    full = mm.search(cands, data, k=1, approach="alsatian", halving=False, batch_size=32)
    base = mm.search(cands, data, k=1, approach="base", batch_size=32)
    assert list(full.ranking["model"]) == list(base.ranking["model"]) and full.best == base.best


def test_budget_below_cmin_spills_nothing_and_agrees():
    cands = synthetic_candidates("resnet18", 5, "top-layers", seed=3)
    data = sample_data("resnet18", 200, seed=4)
    free = mm.search(cands, data, k=2, approach="alsatian", batch_size=16)
    tight = mm.search(cands, data, k=2, approach="alsatian", batch_size=16,
                      cache_budget=free.stats["cache_peak_bytes"] // 4)
    assert tight.stats["chunks"] > free.stats["chunks"]
    assert tight.stats["cache_peak_bytes"] <= free.stats["cache_peak_bytes"] // 4
    assert list(tight.ranking["model"]) == list(free.ranking["model"])
