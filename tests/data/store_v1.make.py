"""Writes tests/data/store_v1 with mm_jupyter at ced9df8 (before the synthetic candidate sets moved to bench/):
its records name mm_jupyter.modelsearch.synthetic:base_model and :digits_cnn."""
import hashlib
import json
import sys

import torch

import mm_jupyter as mm
from mm_jupyter.modelsearch.stored import add_candidates
from mm_jupyter.modelsearch.synthetic import base_model, digits_cnn, synthetic_candidates


def digest(model):
    h = hashlib.sha256()
    for k, t in model.state_dict().items():
        h.update(k.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

store = mm.Store(sys.argv[1])
mlps = [base_model("mlp", seed=1, classes=3) for _ in range(2)]
with torch.no_grad():
    mlps[1][-1].weight.mul_(0.5)
with torch.random.fork_rng():
    torch.manual_seed(5)
    cnns = [digits_cnn(classes=4) for _ in range(2)]
refs = [store.save_set(mlps, "mlp", approach="baseline"), store.save_set(cnns, "digits", approach="baseline")]
with torch.no_grad():
    cnns[1][-1].bias.add_(1.0)
refs.append(store.save_set(cnns, "digits", approach="update"))
add_candidates(store, synthetic_candidates("mlp", 3, seed=4, classes=3), "cands")
expected = {f"{r.name}@{r.version}": [digest(m) for m in store.recover_set(r)] for r in refs}
print(json.dumps(expected, indent=1))
store.close()
