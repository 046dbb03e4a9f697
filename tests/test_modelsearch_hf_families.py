"""The generic Hugging Face rule on the families a user searches next (tiny configs, random weights):
composed blocks equal the model's own features, a classifier head gives the model's logits, and a
search over three candidates of each family runs with sharing and agrees with shift."""
from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
from search_models import assert_search_agrees
from torch import nn

from mm_jupyter.bench.synthetic import parameterised, reinitialise
from mm_jupyter.modelsearch.splitting import split_model

tf = pytest.importorskip("transformers")


def _images(n: int, side: int = 16, width: int | None = None, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, width or side, generator=torch.Generator().manual_seed(seed))


def _tokens(n: int, length: int = 12, pad: int = 0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, length), generator=g)
    for i in range(n):  # right padding of different lengths
        ids[i, length - (i % 4) * 2:] = pad
    return ids


def _pooled(out: Any) -> torch.Tensor:
    return out.pooler_output.flatten(1)


def _cls(out: Any) -> torch.Tensor:
    return out.last_hidden_state[:, 0]


# name: (model class, config, input maker, reference features of the model's output)
FAMILIES: dict[str, tuple[type, Callable[[], Any], Callable[..., torch.Tensor], Callable[[Any], torch.Tensor]]] = {
    "convnext": (tf.ConvNextModel, lambda: tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 2], num_stages=2),
                 _images, _pooled),
    "swin": (tf.SwinModel, lambda: tf.SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=[1, 2],
                                                 num_heads=[1, 2], window_size=2), _images, _pooled),
    "regnet": (tf.RegNetModel, lambda: tf.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2],
                                                       groups_width=8), _images, _pooled),
    "mobilenet_v2": (tf.MobileNetV2Model, lambda: tf.MobileNetV2Config(depth_multiplier=0.25, image_size=16,
                                                                      finegrained_output=False), _images, _pooled),
    "efficientnet": (tf.EfficientNetModel, lambda: tf.EfficientNetConfig(
        image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128),
        lambda n, seed=0: _images(n, 32, seed=seed), _pooled),  # five stride-2 stages and 5x5 kernels
    "deit": (tf.DeiTModel, lambda: tf.DeiTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=32), _images, _cls),
    "distilbert": (tf.DistilBertModel, lambda: tf.DistilBertConfig(vocab_size=100, dim=16, n_layers=2, n_heads=2,
                                                                   hidden_dim=32, max_position_embeddings=32),
                   _tokens, _cls),
    "roberta": (tf.RobertaModel, lambda: tf.RobertaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=32,
                                                          max_position_embeddings=40, pad_token_id=1),
                lambda n, seed=0: _tokens(n, pad=1, seed=seed), _cls),
    "gpt2": (tf.GPT2Model, lambda: tf.GPT2Config(vocab_size=100, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                                 bos_token_id=1, eos_token_id=2, pad_token_id=0),
             _tokens, None),  # reference: the last non-pad token (below)
}


def _build(family: str, seed: int = 0) -> nn.Module:
    cls, config, _, _ = FAMILIES[family]
    torch.manual_seed(seed)
    return cls(config()).eval()


def _reference(family: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    _, _, _, ref = FAMILIES[family]
    with torch.no_grad():
        if model.main_input_name != "input_ids":
            return ref(model(x))
        keep = (x != model.config.pad_token_id).long()
        out = model(x, attention_mask=keep)
    if ref is not None:
        return ref(out)
    last = (torch.arange(x.shape[1]) * keep).argmax(-1)  # as GPT2ForSequenceClassification reads it
    return out.last_hidden_state[torch.arange(len(x)), last]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_composed_blocks_equal_the_models_features(family: str) -> None:
    model = _build(family)
    split = split_model(model)
    assert split.kind == f"hf-{model.config.model_type}" and split.head is None
    assert len(split.blocks) >= 4  # stem, at least two layers, the feature step
    assert len(parameterised(split)) >= 3
    x = FAMILIES[family][2](5)
    torch.testing.assert_close(split.features(x), _reference(family, model, x), atol=1e-5, rtol=1e-5)


def test_swin_non_square_images_find_their_token_grid() -> None:
    model = _build("swin")
    x = _images(2, 16, 12)  # 8 x 6 patches, then 4 x 3, then 2 x 2 (odd sides rounded up)
    torch.testing.assert_close(split_model(model).features(x), _reference("swin", model, x), atol=1e-5, rtol=1e-5)


def test_stages_that_only_chain_their_layers_are_expanded() -> None:
    convnext = _build("convnext")
    split = split_model(convnext)
    stage = convnext.encoder.stages[1]
    inner = [b.module for b in split.blocks]
    assert stage.layers[1] in inner and stage.downsampling_layer[1] in inner and stage not in inner
    swin = _build("swin")  # a Swin stage needs the token grid: it stays one block
    assert swin.encoder.layers[0] in [b.module for b in split_model(swin).blocks]


@pytest.mark.parametrize("cls, config, x", [
    (tf.ConvNextForImageClassification, lambda: tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                                                  num_labels=3), _images(3)),
    (tf.RegNetForImageClassification, lambda: tf.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                              groups_width=8, num_labels=3), _images(3)),
    (tf.MobileNetV2ForImageClassification, lambda: tf.MobileNetV2Config(depth_multiplier=0.25, image_size=16,
                                                                        finegrained_output=False, num_labels=3),
     _images(3)),
    (tf.SwinForImageClassification, lambda: tf.SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=[1, 1],
                                                          num_heads=[1, 2], window_size=2, num_labels=3), _images(3)),
    (tf.DeiTForImageClassification, lambda: tf.DeiTConfig(image_size=16, patch_size=4, hidden_size=16,
                                                          num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=32, num_labels=3), _images(3)),
    (tf.GPT2ForSequenceClassification, lambda: tf.GPT2Config(vocab_size=100, n_embd=16, n_layer=2, n_head=2,
                                                             n_positions=32, pad_token_id=0, num_labels=3),
     _tokens(4)),
])
def test_classifier_head_gives_the_logits(cls: type, config: Callable[[], Any], x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = cls(config()).eval()
    split = split_model(model)
    assert split.head is not None
    with torch.no_grad():
        logits = model(x).logits
    torch.testing.assert_close(split.head(split.features(x)), logits, atol=1e-5, rtol=1e-5)


def test_task_heads_that_are_not_one_classifier_are_left_out() -> None:
    torch.manual_seed(0)
    model = tf.DistilBertForSequenceClassification(FAMILIES["distilbert"][1]()).eval()
    split = split_model(model)  # pre_classifier + ReLU + classifier: not a Linear head
    assert split.head is None
    x = _tokens(3)
    with torch.no_grad():
        ref = model.distilbert(x, attention_mask=(x != 0).long()).last_hidden_state[:, 0]
    torch.testing.assert_close(split.features(x), ref, atol=1e-5, rtol=1e-5)


def _derived(family: str) -> dict[str, nn.Module]:
    """A base and two copies with their last one or two parameterised blocks redrawn."""
    base = _build(family)
    models = {"base": base}
    for i, redraw in enumerate((1, 2), start=1):
        m = copy.deepcopy(base)
        split = split_model(m)
        torch.manual_seed(100 + i)
        for j in parameterised(split)[-redraw:]:
            reinitialise(split.blocks[j].module)
        models[f"d{i}"] = m.eval()
    return models


@pytest.mark.parametrize("family", list(FAMILIES))
def test_search_over_three_candidates(family: str) -> None:
    cands = _derived(family)
    assert_search_agrees(cands, FAMILIES[family][2](36, seed=1), torch.arange(36) % 3)
