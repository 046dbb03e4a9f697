"""Block view of candidate models: composed blocks reproduce each model's own features exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mm_jupyter.errors import SearchError
from mm_jupyter.modelsearch.blocks import Block, Blocks, Split, output_sizes
from mm_jupyter.modelsearch.splitting import split_model

tf = pytest.importorskip("transformers")


def _run_blocks(split: Split, raw: torch.Tensor) -> list[torch.Tensor]:
    outs, h = [], raw
    with torch.no_grad():
        ctx = split.context(raw)
        for b in split.blocks:
            h = b(h, ctx)
            outs.append(h)
    return outs


# ---------------------------------------------------------------- sequential


def _nested_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),  # leading parameter-free step joins the first block
        nn.Sequential(nn.Linear(12, 16), nn.ReLU()),
        nn.Sequential(nn.Sequential(nn.Linear(16, 16)), nn.GELU(), nn.Dropout(0.3)),
        nn.Linear(16, 8), nn.Tanh(),
        nn.Linear(8, 3),
    )


def test_nested_sequential_mlp_blocks_and_head() -> None:
    model = _nested_mlp()
    split = split_model(model)
    assert split.kind == "sequential" and len(split.blocks) == 3
    assert split.head is model[5]
    first = split.blocks[0].module
    assert isinstance(first, nn.Sequential) and first[1] is model[1][0]  # the model's own modules, not copies
    assert split.blocks[1].module[0] is model[2][0][0]
    x = torch.randn(5, 3, 4)
    model.eval()
    with torch.no_grad():
        ref = model[:5](x)
        logits = model(x)
    feats = split.features(x)
    assert feats.shape == (5, 8)
    torch.testing.assert_close(feats, ref)
    torch.testing.assert_close(split.head(feats), logits)


def test_cnn_with_batchnorm_eval_mode_and_training_flags_restored() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 5),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.train()
    split = split_model(model)
    assert [type(b.module).__name__ for b in split.blocks] == ["Conv2d", "Sequential", "Sequential"]
    assert split.head is model[8]
    x = torch.randn(4, 3, 16, 16)
    feats = split.features(x)
    assert all(m.training for m in model.modules())  # restored
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats, model[:8](x))
        torch.testing.assert_close(split.head(feats), model(x))


def test_no_linear_head_and_module_list() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten())
    split = split_model(model)
    assert split.head is None and len(split.blocks) == 2
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(split.features(x), model(x))

    layers = nn.ModuleList([nn.Linear(4, 6), nn.ReLU(), nn.ModuleList([nn.Linear(6, 6), nn.ReLU()]), nn.Linear(6, 2)])
    split = split_model(layers)
    assert len(split.blocks) == 2 and split.head is layers[3]
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(split.features(x), torch.relu(layers[2][0](torch.relu(layers[0](x)))))


def test_single_linear_is_a_block_not_a_head() -> None:
    split = split_model(nn.Sequential(nn.Linear(3, 2)))
    assert len(split.blocks) == 1 and split.head is None


class _Doubling(nn.Sequential):
    """A Sequential subclass with its own forward: one step, never expanded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_sequential_subclass_with_own_forward_is_one_step() -> None:
    inner = _Doubling(nn.Linear(4, 4), nn.ReLU())
    model = nn.Sequential(nn.Linear(4, 4), inner, nn.Linear(4, 2))
    split = split_model(model)
    assert [b.module for b in split.blocks] == [model[0], inner]
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(split.features(x), model[:2](x))
    alone = _Doubling(nn.Linear(4, 4), nn.ReLU())  # as a model of its own it is traced
    split = split_model(alone)
    assert split.kind == "traced" and len(split.blocks) == 1
    with torch.no_grad():
        torch.testing.assert_close(split.features(x), alone(x))


# ---------------------------------------------------------------- Hugging Face


def _resnet_config(layer_type: str = "basic") -> tf.ResNetConfig:
    return tf.ResNetConfig(layer_type=layer_type, depths=[2, 1, 2, 1], hidden_sizes=[8, 16, 16, 32],
                           embedding_size=8, num_labels=4)


def _vit_config() -> tf.ViTConfig:
    return tf.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, num_labels=4)


def _bert_config(attn: str) -> tf.BertConfig:
    cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=4)
    cfg._attn_implementation = attn
    return cfg


def _images(n: int = 3, side: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(2))


def _tokens(n: int = 4, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 100, (n, length), generator=g)
    for i in range(n):  # different padding per row (pad id 0)
        ids[i, length - 3 * i:] = 0
    return ids


def _build(cls, config):
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_hf_resnet_model(layer_type: str) -> None:
    model = _build(tf.ResNetModel, _resnet_config(layer_type))
    split = split_model(model)
    layers = sum(len(s.layers) for s in model.encoder.stages)
    assert split.kind == "hf-resnet" and len(split.blocks) == 1 + layers + 1 and split.head is None
    assert split.blocks[0].module is model.embedder
    x = _images()
    with torch.no_grad():
        ref = model(x).pooler_output.flatten(1)
    torch.testing.assert_close(split.features(x), ref, atol=1e-5, rtol=1e-5)


def test_hf_resnet_for_classification_head() -> None:
    model = _build(tf.ResNetForImageClassification, _resnet_config())
    split = split_model(model)
    assert split.head is model.classifier
    x = _images()
    with torch.no_grad():
        ref = model.resnet(x).pooler_output.flatten(1)
        logits = model(x).logits
    feats = split.features(x)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split.head(feats), logits, atol=1e-5, rtol=1e-5)


def test_hf_vit_model_and_classifier() -> None:
    model = _build(tf.ViTModel, _vit_config())
    split = split_model(model)
    assert split.kind == "hf-vit" and len(split.blocks) == 1 + 3 + 1 and split.head is None
    x = _images()
    with torch.no_grad():
        ref = model(x).last_hidden_state[:, 0]
    torch.testing.assert_close(split.features(x), ref, atol=1e-5, rtol=1e-5)

    clf = _build(tf.ViTForImageClassification, _vit_config())
    split = split_model(clf)
    assert split.head is clf.classifier
    with torch.no_grad():
        ref = clf.vit(x).last_hidden_state[:, 0]
        logits = clf(x).logits
    feats = split.features(x)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split.head(feats), logits, atol=1e-5, rtol=1e-5)


def test_hf_dinov2_model() -> None:
    cfg = tf.Dinov2Config(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                          mlp_ratio=2)
    model = _build(tf.Dinov2Model, cfg)
    split = split_model(model)
    assert split.kind == "hf-dinov2" and len(split.blocks) == 5 and split.head is None
    x = _images()
    with torch.no_grad():
        tokens = model(x).last_hidden_state
    # what Dinov2ForImageClassification's classifier consumes: CLS next to the mean patch token
    ref = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1)
    torch.testing.assert_close(split.features(x), ref, atol=1e-5, rtol=1e-5)
    clf = _build(tf.Dinov2ForImageClassification, cfg)
    split = split_model(clf)
    assert split.head is clf.classifier
    with torch.no_grad():
        torch.testing.assert_close(split.head(split.features(x)), clf(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_bert_model_with_padding_mask(attn: str) -> None:
    model = _build(tf.BertModel, _bert_config(attn))
    split = split_model(model)
    assert split.kind == "hf-bert" and len(split.blocks) == 1 + 3 + 1 and split.head is None
    ids = _tokens()
    mask = (ids != model.config.pad_token_id).long()
    assert "attention_mask" in split.context(ids)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state[:, 0]
        unmasked = model(ids).last_hidden_state[:, 0]
    feats = split.features(ids)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(feats, unmasked, atol=1e-4)  # the mask really is applied


def test_hf_bert_without_padding() -> None:
    model = _build(tf.BertModel, _bert_config("sdpa"))
    ids = torch.randint(5, 100, (3, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, 0]
    torch.testing.assert_close(split_model(model).features(ids), ref, atol=1e-5, rtol=1e-5)


def test_hf_bert_for_sequence_classification_head() -> None:
    model = _build(tf.BertForSequenceClassification, _bert_config("eager"))
    split = split_model(model)
    assert split.head is not None and split.head.classifier is model.classifier
    ids = _tokens()
    mask = (ids != 0).long()
    with torch.no_grad():
        ref = model.bert(ids, attention_mask=mask).last_hidden_state[:, 0]
        logits = model(ids, attention_mask=mask).logits
    feats = split.features(ids)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split.head(feats), logits, atol=1e-5, rtol=1e-5)


def test_hf_model_without_a_classifier_head_gives_backbone_features() -> None:
    model = _build(tf.BertForMaskedLM, _bert_config("eager"))
    split = split_model(model)
    assert split.kind == "hf-bert" and split.head is None  # the MLM head is not a Linear classifier
    ids = _tokens()
    with torch.no_grad():
        ref = model.bert(ids, attention_mask=(ids != 0).long()).last_hidden_state[:, 0]
    torch.testing.assert_close(split.features(ids), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- declared forms


class _Declared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3)
        self.body = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self._features(x))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(torch.relu(self.stem(x)))).mean((2, 3))

    def mm_blocks(self) -> tuple[list[nn.Module], nn.Module | None]:
        pool = _MeanPool()
        return [nn.Sequential(self.stem, nn.ReLU()), nn.Sequential(self.body, nn.ReLU(), pool)], self.fc


class _MeanPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def test_declared_mm_blocks() -> None:
    torch.manual_seed(0)
    model = _Declared()
    split = split_model(model)
    assert split.kind == "declared" and len(split.blocks) == 2 and split.head is model.fc
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(split.features(x), model._features(x))
        torch.testing.assert_close(split.head(split.features(x)), model(x))


def test_blocks_wrapper() -> None:
    torch.manual_seed(0)
    blocks = [nn.Linear(5, 7), nn.Sequential(nn.Tanh(), nn.Linear(7, 3))]
    head = nn.Linear(3, 2)
    model = Blocks(blocks, head)
    split = split_model(model)
    assert split.kind == "declared" and [b.module for b in split.blocks] == blocks and split.head is head
    x = torch.randn(4, 5)
    with torch.no_grad():
        torch.testing.assert_close(split.features(x), blocks[1](blocks[0](x)))
        torch.testing.assert_close(split.head(split.features(x)), model(x))
    assert split_model(Blocks(blocks)).head is None
    with pytest.raises(SearchError):
        Blocks([])


def test_bad_mm_blocks_is_a_search_error() -> None:
    class Bad(nn.Module):
        def mm_blocks(self):
            return [1, 2]

    with pytest.raises(SearchError, match="Bad"):
        split_model(Bad())


def test_unsplittable_model() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + x if x.sum() > 0 else x

    with pytest.raises(SearchError, match=r"cannot split Custom into blocks.*mm_blocks\(\).*Blocks"):
        split_model(Custom())
    with pytest.raises(SearchError):
        split_model("not a model")  # type: ignore[arg-type]


def test_unknown_call_tag() -> None:
    with pytest.raises(SearchError):
        Block(nn.ReLU(), "weird")


# ---------------------------------------------------------------- output sizes


def _cases() -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return [
        ("mlp", _nested_mlp(), torch.randn(3, 12)),
        ("cnn-half", nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.Flatten(),
                                   nn.Linear(6 * 6 * 6, 2)).half(), torch.randn(3, 3, 16, 16).half()),
        ("resnet", _build(tf.ResNetForImageClassification, _resnet_config("bottleneck")), _images()),
        ("vit", _build(tf.ViTModel, _vit_config()), _images()),
        ("bert", _build(tf.BertModel, _bert_config("eager")), _tokens()),
    ]


@pytest.mark.parametrize("case", range(5))
def test_output_sizes_are_actual_bytes_per_item(case: int) -> None:
    name, model, sample = _cases()[case]
    split = split_model(model)
    outs = _run_blocks(split, sample)
    expected = [o.numel() * o.element_size() // sample.shape[0] for o in outs]
    assert output_sizes(split, sample) == expected, name
    assert len(expected) == len(split.blocks)


def test_hf_subclass_is_split_like_its_base() -> None:
    class MyViT(tf.ViTModel):
        pass

    model = _build(MyViT, _vit_config())
    split = split_model(model)
    x = _images()
    with torch.no_grad():
        ref = model(x).last_hidden_state[:, 0]
    assert split.kind == "hf-vit"
    torch.testing.assert_close(split.features(x), ref, atol=1e-5, rtol=1e-5)
