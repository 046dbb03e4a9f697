"""The zoo suite's helpers: the zoo itself (architectures, builders, inputs) lives in the package,
:mod:`mm_jupyter.bench.zoo`, and is re-exported here; this module adds what the tests and
``scripts/zoo_table.py`` check with: saving a set and its update, recovering it in a fresh process
(tests/ is on the subprocesses' PYTHONPATH), and the features a model's own classifier consumes.
``QUICK`` is the subset of the normal test run; ``MM_ZOO=full`` runs every entry.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from mm_jupyter.bench.zoo import (  # noqa: F401 - re-exported for the tests and the script
    AUDIO,
    SIDE,
    TOKENS,
    ZOO,
    Entry,
    build,
    config,
    derived,
    forward,
    inputs,
    labels,
    pad,
    updated,
)

#: the subset of the normal test run (every domain, the issue's failure patterns): ~60 s together
QUICK = ("bert-classifier", "albert-factorized", "llama", "t5-encoder", "dinov2-classifier", "swin", "resnet",
         "wav2vec2")


#: families the Hugging Face rule learnt last (issue 20): searched in every run, one per mechanism —
#: context the backbone computes before its layers (DeBERTa-v2's relative embeddings, a holder child
#: never called; Falcon's mask with ALiBi folded in; MPNet's relative bias), stages whose tokens the
#: model turns into a map (PVT-v2 with the grid it returns, PVT with the grid it was given), a
#: classifier that reads another output of the last stage (CvT's class token)
LEARNT = ("deberta-v2", "falcon-alibi", "mpnet", "pvt", "pvt-v2", "cvt")


def profile() -> tuple[str, ...]:
    """The entries of this run: the whole zoo with ``MM_ZOO=full``, else ``QUICK``."""
    return tuple(ZOO) if os.environ.get("MM_ZOO", "").lower() == "full" else QUICK



# -- saving and recovering ---------------------------------------------------------------------

SEEDS = (0, 1, 2)


def output_digests(model: nn.Module, name: str) -> list[str]:
    """Digests of every tensor the model returns on its zoo input (one thread: bit-reproducible)."""
    from zoo_models import output_digests as digests

    return digests(lambda x: forward(model, name, x), inputs(name), name)


def save(store: Any, name: str) -> dict[str, Any]:
    """Save entry ``name`` as a set of three (version 1) and an update of it (version 2); what a
    fresh process must recover: state digests and output digests per version, or the error."""
    from store_models import model_digests

    import mm_jupyter as mm

    want: dict[str, Any] = {}
    try:
        models = [build(name, seed) for seed in SEEDS]
        versions = {"1": models, "2": [updated(m, 100 + i) for i, m in enumerate(models)]}
        for version, group in versions.items():
            before = model_digests(group)
            store.save_set(group, name, approach="baseline" if version == "1" else "update")
            if model_digests(group) != before:
                return {"error": f"saving version {version} changed the models"}
            want[version] = {"state": before, "outputs": [output_digests(m, name) for m in group]}
    except mm.MMError as e:
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    return want


#: run in a fresh process: ``python -c FRESH store name...`` prints what it recovers, as JSON
FRESH = r"""
import importlib, json, sys
import mm_jupyter as mm
import hf_zoo
from store_models import sd_digests
store = mm.Store(sys.argv[1])
out = {}
for name in sys.argv[2:]:
    got = {}
    entry = hf_zoo.ZOO[name]
    if not entry.config and ":" in entry.model:  # a hand-built class: its module imported, as its user has it
        importlib.import_module(entry.model.split(":")[0])
    for version in ("1", "2"):
        try:
            ms = store.recover_set(f"{name}@{version}")
            models = [ms[i] for i in range(len(ms))]
            got[version] = {"state": [sd_digests(m.state_dict()) for m in models],
                            "outputs": [hf_zoo.output_digests(m, name) for m in models]}
        except Exception as e:
            got[version] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    out[name] = got
print(json.dumps(out))
"""


def recover_fresh(path: str, names: list[str], timeout: int = 900) -> dict[str, Any]:
    """Recover every version of ``names`` from the store at ``path`` in a fresh process."""
    import json

    from store_models import run_python

    return json.loads(run_python(FRESH, path, *names, timeout=timeout).stdout)  # type: ignore[no-any-return]


def roundtrip_problem(want: dict[str, Any], got: dict[str, Any]) -> str | None:
    """Why a saved entry did not come back exactly (None when both versions did)."""
    if "error" in want:
        return f"save: {want['error']}"
    for version in ("1", "2"):
        g = got.get(version, {"error": "not recovered"})
        if "error" in g:
            return f"recover v{version}: {g['error']}"
        if g["state"] != want[version]["state"]:
            return f"v{version}: state differs"
        if g["outputs"] != want[version]["outputs"]:
            return f"v{version}: outputs differ"
    return None


# -- features -----------------------------------------------------------------------------------

def own_features(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """What the model's classifier consumes, computed without the search code: a task model's own
    classifier input; for a backbone, that of a real (randomly initialised) classification model of
    its family holding the backbone's weights (when the family's head needs nothing the backbone
    lacks); else the output's first token. A classifier applied to every token is read at the token
    whose logits the model kept; a token-level output without a classifier at the first token (the
    last non-pad one for a causal model: one whose first output ignores its last token)."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    if not hasattr(model, "base_model"):  # a hand-built module: the input of its ``head``
        seen: list[torch.Tensor] = []
        hook = model.head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            with torch.no_grad():
                model(x)
        finally:
            hook.remove()
        return seen[0]
    task = model
    backbone = model.base_model
    if model is backbone:
        mapping = {"text": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                   "vision": auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
                   "audio": auto.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES}[ZOO[name].domain]
        cls_name = mapping.get(model.config.model_type)
        cls = getattr(transformers, cls_name, None) if isinstance(cls_name, str) else None
        task = None
        if cls is not None:
            candidate = cls(copy.deepcopy(model.config)).eval()
            inner = candidate.base_model
            if type(inner) is type(model):  # the backbone's pooler may go unused; nothing may be missing
                missing, _ = inner.load_state_dict(model.state_dict(), strict=False)
                if not missing:
                    task = candidate
    captured: list[torch.Tensor] = []
    with torch.no_grad():
        if task is None:
            tokens = forward(model, name, x).last_hidden_state
            logits = None
        else:
            inside = {id(m) for m in task.base_model.modules()}
            leaf = next(m for m in task.modules() if id(m) not in inside and next(m.parameters(recurse=False), None)
                        is not None)
            handle = leaf.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
            try:
                logits = forward(task, name, x).logits
            finally:
                handle.remove()
            tokens = captured[0]
    if tokens.dim() in (2, 4):  # one vector per item, or a feature map the head reads whole
        return tokens.flatten(1)
    if logits is not None and isinstance(leaf, nn.Linear) and logits.shape == (len(x), leaf.out_features):
        # a classifier applied to every token, then pooled by the model: the token whose logits it kept
        with torch.no_grad():
            gaps = (leaf(tokens) - logits[:, None]).abs().amax(-1)
        picked = gaps.argmin(-1)
        if bool((gaps.amin(-1) < 1e-5).all()):
            return tokens[torch.arange(len(x)), picked]
    if _causal(model, name, x):
        keep = (x != pad(name)).long() if pad(name) is not None else torch.ones_like(x)
        last = (torch.arange(x.shape[1]) * keep).argmax(-1)
        return tokens[torch.arange(len(x)), last]
    return tokens[:, 0]


def _causal(model: nn.Module, name: str, x: torch.Tensor) -> bool:
    """Whether the model is causal, by its behaviour: the first token's output does not change when
    the last token does."""
    other = x.clone()
    other[:, -1] = (other[:, -1] + 1) % 100
    with torch.no_grad():
        a = forward(model, name, x).last_hidden_state[:, 0]
        b = forward(model, name, other).last_hidden_state[:, 0]
    return bool(torch.equal(a, b))


def head_input(split: Any, features: torch.Tensor) -> torch.Tensor:
    """What the split hands the classifier: the features, through the head's pooler if any (the
    input of the head's classifier, its last parameterised layer)."""
    if split.head is not None:
        leaf = [m for m in split.head.modules() if next(m.parameters(recurse=False), None) is not None][-1]
        seen: list[torch.Tensor] = []
        handle = leaf.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            with torch.no_grad():
                split.head(features)
        finally:
            handle.remove()
        return seen[0]
    if split.pooler is not None:
        with torch.no_grad():
            return split.pooler(features)  # type: ignore[no-any-return]
    return features
