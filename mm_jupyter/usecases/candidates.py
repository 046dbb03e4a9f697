"""The Alsatian paper's model factories, importable by store records: randomly initialised base
models of the synthetic candidate sets' architectures (``base_model``; weights built from
``transformers`` configs, never downloaded), the digits CNN of the trained candidates and its data,
and ``clone_module`` (a fast ``copy.deepcopy`` of a module). The candidate sets built from them are
in ``mm_jupyter.bench.synthetic``.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import SearchError
from ..store.architectures import architecture

ARCHS = ("resnet18", "resnet152", "vit", "bert", "mlp")

MLP_FEATURES = 16
C = TypeVar("C")


@dataclass(frozen=True)
class Shape:
    """Input geometry of an architecture: image side (0 if not images), sequence length, vocabulary."""

    image: int = 0
    seq_len: int = 0
    vocab: int = 0


def input_shape(arch: str, *, reduced: bool = True, image_size: int | None = None) -> Shape:
    """What ``sample_data`` produces for ``arch`` (and what ``base_model`` expects); ``image_size``
    overrides the resolution of image architectures (e.g. full ResNet-18 widths at 64 px on a CPU)."""
    _check_arch(arch)
    if arch in ("resnet18", "resnet152", "vit"):
        size = image_size or (32 if reduced else 224)
        if size % 8:
            raise SearchError(f"image_size must be a multiple of 8, not {size}")
        return Shape(image=size)
    if arch == "bert":
        return Shape(seq_len=32 if reduced else 128, vocab=1000 if reduced else 30522)
    return Shape()


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise SearchError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _mlp(classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(MLP_FEATURES, 32), nn.ReLU(),
        nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, classes),
    )


def hf_config(cls: type[C], **kwargs: Any) -> C:
    """``cls(**kwargs)`` for a transformers config class: transformers 5's config dataclasses take
    ``num_labels`` (and other ``PretrainedConfig`` settings) through ``**kwargs`` that their
    signatures omit, so a direct call does not type-check while it works."""
    return cls(**kwargs)


def _build(arch: str, reduced: bool, classes: int, image_size: int | None = None) -> nn.Module:
    if arch == "mlp":
        return _mlp(classes)
    import transformers as tf

    if arch == "resnet18":
        sizes = [16, 32, 64, 128] if reduced else [64, 128, 256, 512]
        cfg = hf_config(tf.ResNetConfig, layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=sizes,
                        embedding_size=sizes[0], num_labels=classes)
        return tf.ResNetForImageClassification(cfg)
    if arch == "resnet152":
        # reduced: the real 3-8-36-3 bottleneck structure (so B is ResNet-152's), an eighth of the widths
        sizes = [32, 64, 128, 256] if reduced else [256, 512, 1024, 2048]
        cfg = hf_config(tf.ResNetConfig, layer_type="bottleneck", depths=[3, 8, 36, 3], hidden_sizes=sizes,
                        embedding_size=16 if reduced else 64, num_labels=classes)
        return tf.ResNetForImageClassification(cfg)
    if arch == "vit":
        if reduced:
            vit = hf_config(tf.ViTConfig, image_size=image_size or 32, patch_size=8, hidden_size=64,
                            num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, num_labels=classes)
        else:
            vit = hf_config(tf.ViTConfig, image_size=image_size or 224, patch_size=16, num_labels=classes)
        return tf.ViTForImageClassification(vit)
    shape = input_shape("bert", reduced=reduced)
    if reduced:
        bert = hf_config(tf.BertConfig, vocab_size=shape.vocab, hidden_size=64, num_hidden_layers=4,
                         num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                         num_labels=classes)
    else:
        bert = hf_config(tf.BertConfig, vocab_size=shape.vocab, num_labels=classes)  # BERT-base
    return tf.BertForSequenceClassification(bert)


@architecture
def base_model(arch: str, *, reduced: bool = True, classes: int = 10, seed: int = 0,
               image_size: int | None = None) -> nn.Module:
    """A randomly initialised model of ``arch`` (eval mode); the same seed gives the same weights."""
    _check_arch(arch)
    if classes < 2:
        raise SearchError(f"classes must be at least 2, got {classes}")
    input_shape(arch, reduced=reduced, image_size=image_size)
    with _seeded(seed):
        model = _build(arch, reduced, classes, image_size)
    return model.eval()


_SCALAR_TYPES = (bool, int, float, str, bytes, type(None))


def clone_module(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` with a fast path for plain modules: each module's internal dicts are
    rebuilt directly instead of through the generic reduce protocol, which is most of deepcopy's
    time for deep models (ResNet-152: ~10k objects). Tensors, configs and anything unusual still go
    through ``copy.deepcopy`` with one shared memo, so ties and shared objects are preserved."""
    return _clone(model, {})


def _plain_module(cls: type) -> bool:
    """No custom copy protocol, so deepcopy would copy ``__dict__`` as ``_clone`` does (a custom
    ``__setstate__``, e.g. Conv's, only fills in attributes missing from old pickles)."""
    c: Any = cls  # compares unbound methods: mypy would call the identity checks non-overlapping
    return (
        getattr(c, "__deepcopy__", None) is None and c.__reduce_ex__ is object.__reduce_ex__
        and c.__reduce__ is object.__reduce__ and c.__getstate__ is nn.Module.__getstate__
        and not any("__slots__" in k.__dict__ for k in c.__mro__ if k is not object)
    )


def _clone(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    found: nn.Module | None = memo.get(id(module))
    if found is not None:
        return found
    cls = type(module)
    if not _plain_module(cls):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        if key == "_compiled_call_impl":  # nn.Module.__getstate__ drops it too
            continue
        if key == "_modules":
            state[key] = type(value)((n, None if c is None else _clone(c, memo)) for n, c in value.items())
        elif key in ("_parameters", "_buffers") and type(value) in (dict, OrderedDict):
            state[key] = type(value)((n, copy.deepcopy(t, memo)) for n, t in value.items())
        elif isinstance(value, _SCALAR_TYPES) or (
            type(value) is tuple and all(isinstance(v, _SCALAR_TYPES) for v in value)
        ):
            state[key] = value  # immutable
        elif type(value) in (dict, OrderedDict, set) and not value:
            state[key] = type(value)()
        elif type(value) is set and all(isinstance(v, _SCALAR_TYPES) for v in value):
            state[key] = set(value)
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    return new


@architecture
def digits_cnn(classes: int = 10) -> nn.Sequential:
    """The small CNN of ``trained_candidates`` (8x8 single-channel digits): four blocks and a head."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, classes),
    )


def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits (no download) as ``(N, 1, 8, 8)`` float32 in [0, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SearchError("trained candidates need scikit-learn: pip install 'mm_jupyter[search]'") from exc
    data = load_digits()
    x = torch.from_numpy((data.data / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    return x, torch.from_numpy(data.target.astype(np.int64))


__all__ = ["ARCHS", "MLP_FEATURES", "Shape", "base_model", "clone_module", "digits", "digits_cnn", "hf_config",
           "input_shape"]
