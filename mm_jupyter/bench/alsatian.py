"""The Alsatian paper's evaluation, artefact by artefact (``python -m mm_jupyter.bench alsatian``).

Each artefact (Table 1; Figs. 5, 10-12, 13-14, 15, 16, 17) is one function returning an
``Artefact``: rows for a table and a figure, correctness checks (rankings equal to the baselines'),
and the configuration. What the paper says about each is compared in ``reproduction.py`` (its numbers
are in ``paper_numbers.toml``). Three scales: ``quick`` (seconds: tests and the notebook), ``cpu``
(the default: minutes on a 2-core CPU) and ``paper`` (the paper's sizes, for a GPU;
``MM_JUPYTER_FULL=1`` selects it). The device is CUDA when present.

Timing is robust to a noisy machine: every configuration runs each approach ``repeats`` times,
interleaved (the order rotates per repeat), and reports the median with min and max. Correctness
is checked on every configuration: alsatian's ranking and scores equal shift's (same rungs), and
alsatian without halving equals base exactly (same rungs as base), so sharing never changes an answer.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import results

FIGURES = ("table1", "fig5", "fig10", "fig13", "fig15", "fig16", "fig17")
TITLES = {
    "table1": "Table 1: the architectures (parameters, blocks, bytes, block inference time, intermediates)",
    "fig5": "Fig. 5: where the time of scoring one model goes, by dataset size, without and with a cache",
    "fig10": "Figs. 10-12: search time per distribution and dataset size, per architecture",
    "fig13": "Figs. 13-14: really fine-tuned candidates (digits CNNs, small BERTs on a text task)",
    "fig15": "Fig. 15: a mixed zoo of Hugging Face models of many families",
    "fig16": "Fig. 16: limited memory (cache budget 100 %, 25 %, 5 % of C_min)",
    "fig17": "Fig. 17: BERT on a text task",
}
SCALES = ("quick", "cpu", "paper")
#: older name of the paper scale, still accepted
ALIASES = {"full": "paper"}
APPROACHES = ("base", "shift", "alsatian")
PARTS = ("prepare data", "prepare model", "inference", "proxy", "planning")
DEFAULT_OUT = Path("bench_results") / "alsatian"
Progress = Callable[[str], None]


def default_scale() -> str:
    """``paper`` when ``MM_JUPYTER_FULL=1``, else ``cpu``."""
    return "paper" if os.environ.get("MM_JUPYTER_FULL") == "1" else "cpu"


@dataclass
class Artefact:
    """One reproduced table or figure: ``rows`` (one dict per bar/line point), ``checks`` (claims
    that must hold) and what it ran with."""

    figure: str
    title: str
    rows: list[dict[str, Any]]
    checks: dict[str, bool]
    config: dict[str, Any]
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every correctness claim holds."""
        return all(self.checks.values())

    def to_json(self) -> dict[str, Any]:
        return {"experiment": "alsatian", "figure": self.figure, "title": self.title, "rows": self.rows,
                "checks": self.checks, "config": self.config, "seconds": self.seconds}

    @classmethod
    def from_json(cls, doc: dict[str, Any], path: str | None = None) -> "Artefact":
        """An artefact read back from its results file."""
        return cls(doc["figure"], doc["title"], doc["rows"], doc["checks"], doc["config"], doc.get("seconds", 0.0),
                   [path] if path else [])


# --------------------------------------------------------------------------------------------
# Running approaches, interleaved and repeated


@dataclass(frozen=True)
class Variant:
    """One timed configuration of a search: a label, the approach, and alsatian's cache budget."""

    label: str
    approach: str
    budget: int | None = None


def same_ranking(a: Any, b: Any, tol: float = 0.0) -> bool:
    """Two rankings name the same models in the same order with scores equal within ``tol``."""
    if list(a.ranking["model"]) != list(b.ranking["model"]):
        return False
    return bool((abs(a.ranking["score"].values - b.ranking["score"].values) <= tol).all())


def compare(candidates: Any, data: Any, variants: Sequence[Variant] | None = None, *, repeats: int = 3,
            device: str = "auto", batch_size: int = 64, seed: int = 0, tol: float = 0.0,
            check_base: bool = True, progress: Progress = lambda m: None) -> tuple[list[dict[str, Any]],
                                                                                 dict[str, bool]]:
    """Time ``variants`` (default base, shift, alsatian) ``repeats`` times each, interleaved; return
    one row per variant (median seconds and phases, min/max, stats, speed-ups against base and
    shift) and the checks: every alsatian variant ranks as shift (scores within ``tol``), and, with
    ``check_base``, alsatian without halving ranks exactly as base."""
    from ..modelsearch.api import search

    variants = list(variants or [Variant(a, a) for a in APPROACHES])
    common: dict[str, Any] = {"device": device, "batch_size": batch_size, "seed": seed}
    # untimed warm-up: first-call costs of torch, the planner and the proxy
    n_warm = min(2, len(candidates))
    warm = dict(list(candidates.items())[:n_warm]) if isinstance(candidates, dict) else list(candidates)[:n_warm]
    search(warm, (data[0][:64], data[1][:64]), approach="alsatian", **common)
    times: dict[str, list[float]] = {v.label: [] for v in variants}
    parts: dict[str, list[dict[str, float]]] = {v.label: [] for v in variants}
    results: dict[str, Any] = {}
    for rep in range(repeats):
        shift = rep % len(variants)
        for v in variants[shift:] + variants[:shift]:
            t0 = time.perf_counter()
            res = search(candidates, data, approach=v.approach,
                         cache_budget=v.budget if v.approach == "alsatian" else None, **common)
            times[v.label].append(time.perf_counter() - t0)
            parts[v.label].append(dict(res.timings))
            results.setdefault(v.label, res)
        progress(f"repeat {rep + 1}/{repeats}: " + ", ".join(f"{k} {t[-1]:.2f} s" for k, t in times.items()))
    rows = []
    for v in variants:
        res, ts = results[v.label], times[v.label]
        row: dict[str, Any] = {"approach": v.label, "seconds": statistics.median(ts), "min_s": min(ts),
                               "max_s": max(ts), "repeats": len(ts), "best": res.best,
                               "block_inferences": res.stats["block_inferences"],
                               "unique_edges": res.stats["unique_edges"],
                               "cache_peak_bytes": res.stats["cache_peak_bytes"],
                               "chunks": res.stats.get("chunks"), "rungs": len(res.rungs), "budget": v.budget}
        for p in PARTS:
            row[f"t_{p}"] = statistics.median(t.get(p, 0.0) for t in parts[v.label])
        rows.append(row)
    by = {v.approach: row for v, row in reversed(list(zip(variants, rows)))}  # first variant per approach
    first = {v.approach: v.label for v in reversed(variants)}
    for r in rows:
        r["vs_base"] = by["base"]["seconds"] / r["seconds"] if "base" in by else None
        r["vs_shift"] = by["shift"]["seconds"] / r["seconds"] if "shift" in by else None
    checks: dict[str, bool] = {}
    for v in variants:
        if v.approach == "alsatian" and "shift" in first:
            checks[f"{v.label} ranking == shift"] = same_ranking(results[v.label], results[first["shift"]], tol)
    if check_base and "base" in first:
        exact = search(candidates, data, approach="alsatian", halving=False, **common)
        checks["alsatian (no halving) ranking == base"] = same_ranking(exact, results[first["base"]], tol)
    return rows, checks


def _tag(rows: list[dict[str, Any]], **labels: Any) -> list[dict[str, Any]]:
    return [{**labels, **r} for r in rows]


def _prefix(checks: dict[str, bool], label: str) -> dict[str, bool]:
    return {f"{label}: {k}": v for k, v in checks.items()}


# --------------------------------------------------------------------------------------------
# Table 1


#: Reference parameter counts at full width with 1,000 classes: torchvision's ResNet-18/152 and
#: EfficientNet-B0, ViT-L/32 at 224 px; BERT-base: bert-base-uncased with its pooler (109,482,240)
#: plus the two-class classifier of our row (768 x 2 + 2).
REFERENCE_PARAMS = {"ResNet-18": 11_689_512, "ResNet-152": 60_192_808, "EfficientNet-B0": 5_288_548,
                    "ViT-L/32": 306_535_400, "BERT-base": 109_482_240 + 1_538}
TABLE1 = tuple(REFERENCE_PARAMS)


def table1_model(name: str, scale: str = "cpu", side: int | None = None) -> tuple[Any, Any]:
    """The model of a Table 1 row at ``scale`` (random weights, built from code or a Hugging Face
    config, never downloaded) and a batch of inputs for it. ``quick``: reduced widths at 32 px /
    32 tokens; ``cpu``: full widths at 224 px / 128 tokens except ViT-L/32 (a quarter of its width);
    ``paper``: everything full. ``side`` overrides the image resolution."""
    import torch
    import transformers as tf

    from .synthetic import _seeded, base_model, hf_config, input_shape

    quick = scale == "quick"
    side = side or (32 if quick else 224)
    batch = 2 if quick else (64 if scale == "paper" else 8)
    images = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    with _seeded(0):
        if name == "ResNet-18":
            model = base_model("resnet18", reduced=quick, classes=1000, image_size=side)
        elif name == "ResNet-152":
            model = base_model("resnet152", reduced=quick, classes=1000, image_size=side)
        elif name == "EfficientNet-B0":
            cfg = hf_config(tf.EfficientNetConfig, image_size=side, width_coefficient=0.25 if quick else 1.0,
                            depth_coefficient=0.25 if quick else 1.0, hidden_dim=320 if quick else 1280,
                            num_labels=1000)
            model = tf.EfficientNetForImageClassification(cfg)
        elif name == "ViT-L/32":
            width = 1024 if scale == "paper" else (64 if quick else 256)
            vit = hf_config(tf.ViTConfig, image_size=side, patch_size=8 if quick else 32, hidden_size=width,
                            num_hidden_layers=4 if quick else 24, num_attention_heads=4 if quick else 16,
                            intermediate_size=4 * width, num_labels=1000)
            model = tf.ViTForImageClassification(vit)
        elif name == "BERT-base":
            model = base_model("bert", reduced=quick, classes=2)
            length = 32 if quick else 128
            ids = torch.randint(200, input_shape("bert", reduced=quick).vocab, (batch, length),
                                generator=torch.Generator().manual_seed(0))
            ids[:, 0] = 101
            return model.eval(), ids
        else:
            raise ValueError(f"unknown Table 1 architecture {name!r}; expected one of {', '.join(TABLE1)}")
    return model.eval(), images


def full_width(name: str) -> dict[str, int]:
    """Parameters and state bytes of ``name`` at the paper's full width, built on the meta device (no
    memory, no time): ``params`` (the whole model, our classifier head included), ``paper_params`` (what
    Table 1 counts: BERT without a classifier, the vision models with their 1,000-class heads) and
    ``bytes`` (every tensor of the state dict, buffers included: Table 1's size column)."""
    import torch

    with torch.device("meta"):
        model, _ = table1_model(name, "paper")
    counted = model.bert if name == "BERT-base" else model
    return {"params": sum(p.numel() for p in model.parameters()),
            "paper_params": sum(p.numel() for p in counted.parameters()),
            "bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values())}


def describe_model(name: str, model: Any, x: Any, *, device: str = "cpu", repeats: int = 3) -> dict[str, Any]:
    """One Table 1 row: parameters (also per block), blocks, model bytes, per-block inference time (ms
    per item, the median of ``repeats`` timed runs after a warm-up) and intermediate output bytes per
    item; and the parameters and bytes at full width (``full_*``)."""
    import torch

    from ..modelsearch.blocks import output_sizes
    from ..modelsearch.splitting import split_model

    split = split_model(model)
    params = sum(p.numel() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.to(device)
    x = x.to(device)
    ctx = {k: v.to(device) for k, v in split.context(x).items()}
    sizes = output_sizes(split, x)
    per_block, h = [], x
    with torch.inference_mode():
        for block in split.blocks:
            out = block(h, ctx)  # warm-up
            took = []
            for _ in range(repeats):
                if device != "cpu":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                block(h, ctx)
                if device != "cpu":
                    torch.cuda.synchronize()
                took.append(time.perf_counter() - t0)
            per_block.append(statistics.median(took) / len(x))
            h = out
    model.to("cpu")
    full = full_width(name)
    return {"architecture": name, "params": params, "reference_params": REFERENCE_PARAMS.get(name),
            "blocks": len(split.blocks), "model_bytes": state, "block_ms_mean": 1e3 * statistics.mean(per_block),
            "block_ms_max": 1e3 * max(per_block), "model_ms": 1e3 * sum(per_block),
            "inter_bytes_mean": int(statistics.mean(sizes)), "inter_bytes_max": max(sizes),
            "input_shape": list(x.shape[1:]), "per_block_ms": [1e3 * t for t in per_block],
            "per_block_bytes": sizes, "per_block_params": [sum(p.numel() for p in b.module.parameters())
                                                           for b in split.blocks],
            "full_params": full["params"], "full_paper_params": full["paper_params"], "full_bytes": full["bytes"]}


def table1(scale: str = "cpu", *, device: str = "auto", repeats: int = 3, archs: Sequence[str] = TABLE1,
           progress: Progress = lambda m: None) -> Artefact:
    """Table 1: one row per architecture; at every scale its full-width parameter count must be the
    reference's exactly."""
    from ..modelsearch.api import resolve_device

    dev = resolve_device(device)
    rows, checks = [], {}
    for name in archs:
        model, x = table1_model(name, scale)
        row = describe_model(name, model, x, device=dev, repeats=repeats)
        rows.append(row)
        progress(f"{name}: {row['params']:,} parameters, {row['blocks']} blocks, {row['model_ms']:.1f} ms/item")
        checks[f"{name} parameters at full width == reference"] = row["full_params"] == row["reference_params"]
        if scale == "paper" or (scale == "cpu" and name != "ViT-L/32"):
            checks[f"{name} parameters == reference"] = row["params"] == row["reference_params"]
    return Artefact("table1", TITLES["table1"], rows, checks, {"scale": scale, "device": dev, "repeats": repeats})


# --------------------------------------------------------------------------------------------
# Synthetic candidate sets of the paper's architectures (Figs. 5, 10-12, 16, 17)

#: The architectures of Figs. 5 and 10-12: the synthetic generator's, plus EfficientNet.
SEARCH_ARCHS = ("resnet18", "resnet152", "efficientnet", "vit", "bert")


def search_set(arch: str, models: int, distribution: str, items: int, scale: str, *,
               seed: int = 0) -> tuple[list[Any], tuple[Any, Any]]:
    """``models`` candidates of ``arch`` drawn with ``distribution`` and ``items`` labelled inputs.
    ``quick`` and ``cpu``: reduced widths at 16 px (EfficientNet 32 px), 32 tokens (ResNet-152 keeps its 50 blocks: the
    cpu default of every figure must finish in minutes on a busy 2-core machine); ``full``: full
    widths at 224 px, 128 tokens."""
    import transformers as tf

    from .synthetic import _seeded, derived_candidates, hf_config, sample_data, synthetic_candidates

    reduced = scale != "paper"
    side = 16 if reduced else 224
    if arch == "efficientnet":
        side = 32 if reduced else 224  # its 5x5 kernels need at least 32 px
        with _seeded(seed):
            base = tf.EfficientNetForImageClassification(hf_config(tf.EfficientNetConfig,
                image_size=side, width_coefficient=0.25 if reduced else 1.0,
                depth_coefficient=0.5 if reduced else 1.0, hidden_dim=320 if reduced else 1280, num_labels=10))
        cands = derived_candidates(base, models, distribution, seed=seed)
        return cands, sample_data("resnet18", items, seed=seed, reduced=reduced, image_size=side)
    size = side if arch != "bert" else None
    cands = synthetic_candidates(arch, models, distribution, seed=seed, reduced=reduced, image_size=size)
    return cands, sample_data(arch, items, seed=seed, reduced=reduced, image_size=size)


SEARCH_SIZES = {
    # scale: (archs, models, items, dataset sizes (top-layers), repeats)
    "quick": (("resnet18",), 4, 128, (128, 256), 1),
    "cpu": (SEARCH_ARCHS, 8, 256, (128, 512), 3),
    "paper": (SEARCH_ARCHS, 35, 2000, (2000, 8000), 3),
}
#: Figs. 10-12 run 25 configurations at the cpu scale (5 architectures x 5), so fewer candidates and items.
FIG10_CPU = (SEARCH_ARCHS, 6, 160, (80, 320), 3)


def fig10(scale: str = "cpu", *, device: str = "auto", repeats: int | None = None,
          archs: Sequence[str] | None = None, progress: Progress = lambda m: None) -> Artefact:
    """Figs. 10-12: per architecture, the three distributions at one dataset size, and top-layers at
    several dataset sizes; base vs shift vs alsatian."""
    from .synthetic import DISTRIBUTIONS

    default_archs, models, items, sizes, default_repeats = FIG10_CPU if scale == "cpu" else SEARCH_SIZES[scale]
    repeats = repeats or default_repeats
    rows, checks = [], {}
    for arch in archs or default_archs:
        runs = [(d, items) for d in DISTRIBUTIONS] + [("top-layers", n) for n in sizes if n != items]
        for dist, n in runs:
            cands, data = search_set(arch, models, dist, n, scale)
            progress(f"{arch}, {dist}, {n} items")
            r, c = compare(cands, data, repeats=repeats, device=device, progress=progress)
            rows += _tag(r, arch=arch, distribution=dist, items=n)
            checks.update(_prefix(c, f"{arch} {dist} {n}"))
    config = {"scale": scale, "models": models, "items": items, "sizes": list(sizes), "repeats": repeats}
    return Artefact("fig10", TITLES["fig10"], rows, checks, config)


#: Fig. 5 per scale: (architectures, dataset sizes without a cache, items with the cached input, image side,
#: repeats); the paper's panels are 9,216, 1,024 and 96 images, and 1,024 with the last 3 blocks cached.
BOTTLENECK = {
    "quick": (("ResNet-18",), (32, 96), 96, 32, 1),
    "cpu": (("ResNet-18", "ResNet-152", "EfficientNet-B0", "ViT-L/32"), (96, 1024), 1024, 32, 3),
    "paper": (("ResNet-18", "ResNet-152", "EfficientNet-B0", "ViT-L/32"), (96, 1024, 9216), 1024, 224, 3),
}


def fig5(scale: str = "cpu", *, device: str = "auto", repeats: int | None = None,
         archs: Sequence[str] | None = None, progress: Progress = lambda m: None) -> Artefact:
    """Fig. 5: the time of scoring one model split into preparing the data, preparing the model,
    inference and the proxy, per architecture and dataset size, and with the input of the last three
    blocks read from a cache (``bottleneck.py``)."""
    from ..modelsearch.api import resolve_device
    from .bottleneck import bottleneck_rows

    default_archs, sizes, cached_items, side, default_repeats = BOTTLENECK[scale]
    dev = resolve_device(device)
    models = [(name, table1_model(name, scale, side)[0]) for name in archs or default_archs]
    rows = bottleneck_rows(models, sizes, cached_items, side, device=dev, repeats=repeats or default_repeats,
                           progress=progress)
    checks = {}
    for name in dict.fromkeys(r["arch"] for r in rows):  # the cache changes the time, never the features
        cached = next(r for r in rows if r["arch"] == name and r["cached_blocks"])
        plain = next((r for r in rows if r["arch"] == name and not r["cached_blocks"]
                      and r["items"] == cached["items"]), None)
        if plain is not None:
            (s1, a1), (s2, a2) = cached["feature_checksum"], plain["feature_checksum"]
            same = abs(s1 - s2) <= 1e-5 * max(a1, a2) and abs(a1 - a2) <= 1e-5 * max(a1, a2)
            checks[f"{name}: the cached input gives the same features"] = same
    return Artefact("fig5", TITLES["fig5"], rows, checks,
                    {"scale": scale, "device": dev, "sizes": list(sizes), "cached_items": cached_items,
                     "cached_blocks": 3, "side": side, "repeats": repeats or default_repeats})


# --------------------------------------------------------------------------------------------
# Real fine-tuned candidates (Figs. 13-14)

TRAINED = {"quick": (4, 300, 1), "cpu": (12, 800, 3), "paper": (35, 2000, 3)}  # models, text items, repeats


def fig13(scale: str = "cpu", *, device: str = "auto", repeats: int | None = None,
          progress: Progress = lambda m: None) -> Artefact:
    """Figs. 13-14: the digits fine-tunes (CNNs) and their text counterpart (small BERTs fine-tuned
    on a generated topic task); search time and rankings equal to the baselines'."""
    from .synthetic import trained_candidates, trained_text_candidates

    models, items, default_repeats = TRAINED[scale]
    repeats = repeats or default_repeats
    rows, checks = [], {}
    t0 = time.perf_counter()
    sets = {"digits CNN": trained_candidates(models), "text BERT": trained_text_candidates(models, items=items)}
    progress(f"trained {2 * models} candidates in {time.perf_counter() - t0:.1f} s")
    for name, (cands, data) in sets.items():
        r, c = compare(cands, data, repeats=repeats, device=device, progress=progress)
        rows += _tag(r, set=name, models=len(cands), items=len(data[0]))
        checks.update(_prefix(c, name))
    return Artefact("fig13", TITLES["fig13"], rows, checks,
                    {"scale": scale, "models": models, "text_items": items, "repeats": repeats})


# --------------------------------------------------------------------------------------------
# A mixed zoo of Hugging Face families (Fig. 15)


def zoo_bases(scale: str = "cpu", seed: int = 0) -> dict[str, tuple[str, Any]]:
    """One small model per family, built from a config with random weights: family -> (modality,
    model). Tiny widths below ``full``; ``full`` uses the families' default (base-size) configs."""
    import transformers as tf

    from .synthetic import _seeded, hf_config

    full = scale == "paper"
    side = 224 if full else 32
    vocab = 30522 if full else 1000

    def small(**kw: Any) -> dict[str, Any]:
        return {} if full else kw

    image = {
        "resnet": lambda: tf.ResNetForImageClassification(hf_config(tf.ResNetConfig,
            **small(embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 1, 1]), num_labels=10)),
        "convnext": lambda: tf.ConvNextForImageClassification(hf_config(tf.ConvNextConfig,
            **small(hidden_sizes=[8, 16, 32], depths=[1, 1, 2], num_stages=3), num_labels=10)),
        "regnet": lambda: tf.RegNetForImageClassification(hf_config(tf.RegNetConfig,
            **small(embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 1, 2], groups_width=8), num_labels=10)),
        "mobilenet_v2": lambda: tf.MobileNetV2ForImageClassification(hf_config(tf.MobileNetV2Config,
            image_size=side, **small(depth_multiplier=0.25, finegrained_output=False), num_labels=10)),
        "efficientnet": lambda: tf.EfficientNetForImageClassification(hf_config(tf.EfficientNetConfig,
            image_size=side, **small(width_coefficient=0.1, depth_coefficient=0.2, hidden_dim=128),
            num_labels=10)),
        "swin": lambda: tf.SwinForImageClassification(hf_config(tf.SwinConfig,
            image_size=side, **small(patch_size=2, embed_dim=8, depths=[1, 2, 1], num_heads=[1, 2, 2],
                                     window_size=4), num_labels=10)),
        "deit": lambda: tf.DeiTForImageClassification(hf_config(tf.DeiTConfig,
            image_size=side, **small(patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=64), num_labels=10)),
    }
    text = {
        "bert": lambda: tf.BertForSequenceClassification(hf_config(tf.BertConfig,
            vocab_size=vocab, **small(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64), num_labels=10)),
        "roberta": lambda: tf.RobertaForSequenceClassification(hf_config(tf.RobertaConfig,
            vocab_size=vocab, **small(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=72), num_labels=10)),
        "distilbert": lambda: tf.DistilBertForSequenceClassification(hf_config(tf.DistilBertConfig,
            vocab_size=vocab, **small(dim=32, n_layers=3, n_heads=2, hidden_dim=64, max_position_embeddings=64),
            num_labels=10)),
        "gpt2": lambda: tf.GPT2ForSequenceClassification(hf_config(tf.GPT2Config,  # its own vocabulary at full size
            **small(vocab_size=vocab, n_embd=32, n_layer=3, n_head=2, n_positions=64, bos_token_id=1,
                    eos_token_id=2), pad_token_id=0, num_labels=10)),
    }
    out = {}
    builds: dict[str, Callable[[], Any]] = {**image, **text}
    for i, (family, build) in enumerate(builds.items()):
        with _seeded(seed + i):
            out[family] = ("image" if family in image else "text", build().eval())
    return out


ZOO = {"quick": (1, 160, 1), "cpu": (10, 192, 3), "paper": (45, 2000, 3)}  # per family, items, repeats


def fig15(scale: str = "cpu", *, device: str = "auto", repeats: int | None = None,
          progress: Progress = lambda m: None) -> Artefact:
    """Fig. 15: candidates of eleven Hugging Face families (each family a base model and its
    derivations, top-25), searched together per input modality."""
    from .synthetic import derived_candidates, sample_data

    per_family, items, default_repeats = ZOO[scale]
    repeats = repeats or default_repeats
    groups: dict[str, dict[str, Any]] = {"image": {}, "text": {}}
    for family, (modality, base) in zoo_bases(scale).items():
        for i, model in enumerate(derived_candidates(base, per_family + 1, "top-25")[1:] if per_family > 1
                                  else [base]):
            groups[modality][f"{family}-{i}"] = model
    full = scale == "paper"
    data = {"image": sample_data("resnet18", items, reduced=not full),
            "text": sample_data("bert", items, reduced=not full)}
    rows, checks = [], {}
    for modality, cands in groups.items():
        progress(f"{modality}: {len(cands)} candidates of {len({n.rsplit('-', 1)[0] for n in cands})} families")
        r, c = compare(cands, data[modality], repeats=repeats, device=device, progress=progress)
        rows += _tag(r, modality=modality, models=len(cands))
        checks.update(_prefix(c, modality))
    families = {n.rsplit("-", 1)[0] for g in groups.values() for n in g}
    config = {"scale": scale, "per_family": per_family, "items": items, "repeats": repeats,
              "candidates": sum(len(g) for g in groups.values()), "families": sorted(families)}
    return Artefact("fig15", TITLES["fig15"], rows, checks, config)


# --------------------------------------------------------------------------------------------
# Limited memory (Fig. 16) and BERT (Fig. 17)

BUDGETS = (1.0, 0.25, 0.05)


def fig16(scale: str = "cpu", *, device: str = "auto", repeats: int | None = None, arch: str = "resnet18",
          progress: Progress = lambda m: None) -> Artefact:
    """Fig. 16: alsatian with cache budgets of 100 %, 25 % and 5 % of C_min (the cache peak of an
    unlimited run), against base and shift; the ranking stays shift's (scores within 1e-5: chunks
    smaller than a batch change float summation order)."""
    from ..modelsearch.api import search

    _, models, items, _, default_repeats = SEARCH_SIZES[scale]
    repeats = repeats or default_repeats
    cands, data = search_set(arch, models, "top-layers", items, scale)
    c_min = search(cands, data, approach="alsatian", device=device).stats["cache_peak_bytes"]
    variants = [Variant("base", "base"), Variant("shift", "shift")] + [
        Variant(f"alsatian {f:.0%}", "alsatian", max(1, int(c_min * f))) for f in BUDGETS]
    progress(f"C_min = {c_min:,} bytes")
    rows, checks = compare(cands, data, variants, repeats=repeats, device=device, tol=1e-5, check_base=False,
                           progress=progress)
    for r in rows:
        r["fraction"] = None if r["budget"] is None else r["budget"] / c_min
    return Artefact("fig16", TITLES["fig16"], rows, checks,
                    {"scale": scale, "arch": arch, "models": models, "items": items, "c_min": c_min,
                     "repeats": repeats})


BERT_SIZES = {"quick": (4, (160,), 1), "cpu": (8, (200,), 3), "paper": (35, (2000, 8000), 3)}


def fig17(scale: str = "cpu", *, device: str = "auto", repeats: int | None = None,
          progress: Progress = lambda m: None) -> Artefact:
    """Fig. 17: BERT candidates (reduced on CPU, BERT-base at ``full``) on the generated topic task,
    every distribution, alsatian vs base vs shift."""
    from .synthetic import DISTRIBUTIONS

    models, sizes, default_repeats = BERT_SIZES[scale]
    repeats = repeats or default_repeats
    rows, checks = [], {}
    for n in sizes:
        for dist in DISTRIBUTIONS:
            cands, data = search_set("bert", models, dist, n, scale)
            progress(f"bert, {dist}, {n} items")
            r, c = compare(cands, data, repeats=repeats, device=device, progress=progress)
            rows += _tag(r, distribution=dist, items=n)
            checks.update(_prefix(c, f"{dist} {n}"))
    return Artefact("fig17", TITLES["fig17"], rows, checks,
                    {"scale": scale, "models": models, "sizes": list(sizes), "repeats": repeats})


RUNNERS: dict[str, Callable[..., Artefact]] = {
    "table1": table1, "fig5": fig5, "fig10": fig10, "fig13": fig13, "fig15": fig15, "fig16": fig16, "fig17": fig17,
}


def normalise_scale(scale: str | None) -> str:
    """``scale`` (default: ``default_scale()``; ``full`` is the paper scale's older name), checked."""
    scale = ALIASES.get(scale or default_scale(), scale or default_scale())
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {', '.join(SCALES)}")
    return scale


def run_artefact(figure: str, scale: str | None = None, *, out: str | os.PathLike[str] | None = None,
                 reuse: bool = False, threads: int | None = 1, progress: Progress = lambda m: None,
                 **kwargs: Any) -> Artefact:
    """Run one artefact (``FIGURES``) at ``scale`` (default: ``default_scale()``); with ``out``, write its
    JSON there (``<figure>-<scale>.json``). With ``reuse`` and ``out``, a results file there from the same
    code and arguments (``results.py``) is returned instead of running again: the tests and notebook 06
    share one run. ``threads``: torch's intra-op threads during the run (default 1: on a shared, busy CPU
    two threads contending ran ResNet-18 6x slower than one; None keeps torch's)."""
    if figure not in RUNNERS:
        raise ValueError(f"unknown artefact {figure!r}; expected one of {', '.join(FIGURES)}")
    scale = normalise_scale(scale)
    args = {"figure": figure, "scale": scale, "threads": threads, **kwargs}
    path = Path(out) / f"{figure}-{scale}.json" if out is not None else None
    if reuse and path is not None:
        doc = results.load(path, args)
        if doc is not None:
            progress(f"{figure}: the results of the same code and arguments in {path}")
            return Artefact.from_json(doc, str(path))
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        art = RUNNERS[figure](scale, progress=progress, **kwargs)
    finally:
        torch.set_num_threads(before)
    art.seconds = time.perf_counter() - t0
    art.config["threads"] = threads or before
    if path is not None:
        results.save(path, art.to_json(), args)
        art.files.append(str(path))
    return art
