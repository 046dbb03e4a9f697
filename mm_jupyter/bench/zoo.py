"""The model zoo: Hugging Face architectures at tiny configs (random weights, built offline from
code) and hand-built modules with timm's state patterns (timm needs torchvision, which does not
install with the CPU torch; :mod:`mm_jupyter.bench._timm_patterns`).

Every entry builds one model from a seed and makes the batch it runs on, so a fresh process can
rebuild the same models. Used by ``python -m mm_jupyter.bench zoo`` (save speed), the zoo test suite
(tests/hf_zoo.py: saved, recovered, searched) and ``scripts/zoo_table.py``. Importing it needs
transformers only when an entry is built.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

SIDE = 32  # image side of the vision models
TOKENS = 12  # sequence length of the text models
AUDIO = 1600  # samples of the audio models (wav2vec2's feature encoder needs at least 400)


@dataclass(frozen=True)
class Entry:
    """One architecture: its domain, model class and config class (names in ``transformers``, or
    ``module:name`` below it), config keywords, and what the model takes."""

    domain: str  # "text" | "vision" | "audio"
    model: str
    config: str  # "" for a hand-built module (built without arguments)
    kwargs: dict[str, Any] = field(default_factory=dict)
    side: int = SIDE  # vision: image side
    features: tuple[int, int] | None = None  # audio spectrogram input (mel bins, frames) instead of a waveform


def _resolve(name: str) -> Any:
    import importlib

    import transformers

    if ":" in name:
        module, attr = name.split(":")
        return getattr(importlib.import_module(module), attr)
    return getattr(transformers, name)


_BERTISH = dict(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=40)
_DECODER = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_VIT = dict(image_size=SIDE, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32)
_W2V = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
            conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
            vocab_size=20)

#: name -> entry; ordered text, vision, audio
ZOO: dict[str, Entry] = {
    # ------------------------------------------------------------------ text: bidirectional encoders
    "bert": Entry("text", "BertModel", "BertConfig", _BERTISH),
    "bert-classifier": Entry("text", "BertForSequenceClassification", "BertConfig", {**_BERTISH, "num_labels": 3}),
    "roberta": Entry("text", "RobertaModel", "RobertaConfig", {**_BERTISH, "pad_token_id": 1}),
    "xlm-roberta": Entry("text", "XLMRobertaModel", "XLMRobertaConfig", {**_BERTISH, "pad_token_id": 1}),
    "distilbert": Entry("text", "DistilBertModel", "DistilBertConfig",
                        dict(vocab_size=100, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=40)),
    "albert": Entry("text", "AlbertModel", "AlbertConfig", {**_BERTISH, "embedding_size": 16, "num_hidden_layers": 3}),
    "albert-factorized": Entry("text", "AlbertModel", "AlbertConfig",
                               {**_BERTISH, "embedding_size": 8, "num_hidden_layers": 3}),
    "electra": Entry("text", "ElectraModel", "ElectraConfig", {**_BERTISH, "embedding_size": 8}),
    "deberta": Entry("text", "DebertaModel", "DebertaConfig", {**_BERTISH, "relative_attention": True}),
    "deberta-v2": Entry("text", "DebertaV2Model", "DebertaV2Config", {**_BERTISH, "relative_attention": True}),
    "mpnet": Entry("text", "MPNetModel", "MPNetConfig", {**_BERTISH, "pad_token_id": 1}),
    "convbert": Entry("text", "ConvBertModel", "ConvBertConfig", {**_BERTISH, "embedding_size": 16}),
    "squeezebert": Entry("text", "SqueezeBertModel", "SqueezeBertConfig",
                         {**_BERTISH, "embedding_size": 16, "q_groups": 2, "k_groups": 2, "v_groups": 2,
                          "post_attention_groups": 2, "intermediate_groups": 2, "output_groups": 2}),
    "ernie": Entry("text", "ErnieModel", "ErnieConfig", _BERTISH),
    "roformer": Entry("text", "RoFormerModel", "RoFormerConfig", {**_BERTISH, "embedding_size": 16}),
    "megatron-bert": Entry("text", "MegatronBertModel", "MegatronBertConfig", _BERTISH),
    "mobilebert": Entry("text", "MobileBertModel", "MobileBertConfig",
                        {**_BERTISH, "embedding_size": 8, "intra_bottleneck_size": 8, "num_feedforward_networks": 1,
                         "true_hidden_size": 8}),
    "data2vec-text": Entry("text", "Data2VecTextModel", "Data2VecTextConfig", {**_BERTISH, "pad_token_id": 1}),
    "modernbert": Entry("text", "ModernBertModel", "ModernBertConfig",
                        dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                             num_attention_heads=2, max_position_embeddings=64, pad_token_id=0,
                             global_attn_every_n_layers=2, local_attention=4)),
    "nystromformer": Entry("text", "NystromformerModel", "NystromformerConfig",
                           {**_BERTISH, "num_landmarks": TOKENS, "segment_means_seq_len": TOKENS}),
    "xlm": Entry("text", "XLMModel", "XLMConfig",
                 dict(vocab_size=100, emb_dim=16, n_layers=2, n_heads=2, max_position_embeddings=40, pad_index=0)),
    "t5-encoder": Entry("text", "T5EncoderModel", "T5Config",
                        dict(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=3, num_heads=2, pad_token_id=0)),
    "mt5-encoder": Entry("text", "MT5EncoderModel", "MT5Config",
                         dict(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=3, num_heads=2, pad_token_id=0)),
    "umt5-encoder": Entry("text", "UMT5EncoderModel", "UMT5Config",
                          dict(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=3, num_heads=2, pad_token_id=0)),
    "bart-encoder": Entry("text", "transformers.models.bart.modeling_bart:BartEncoder", "BartConfig",
                          dict(vocab_size=100, d_model=16, encoder_layers=2, decoder_layers=2,
                               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                               decoder_ffn_dim=32, max_position_embeddings=40, pad_token_id=1, scale_embedding=True)),
    # ------------------------------------------------------------------ text: causal decoders
    "gpt2": Entry("text", "GPT2Model", "GPT2Config",
                  dict(vocab_size=100, n_embd=16, n_layer=2, n_head=2, n_positions=64, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)),
    "gpt2-classifier": Entry("text", "GPT2ForSequenceClassification", "GPT2Config",
                             dict(vocab_size=100, n_embd=16, n_layer=2, n_head=2, n_positions=64, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, num_labels=3)),
    "gpt-neo": Entry("text", "GPTNeoModel", "GPTNeoConfig",
                     dict(vocab_size=100, hidden_size=16, num_layers=2, num_heads=2,
                          attention_types=[[["global", "local"], 1]], window_size=4, max_position_embeddings=64,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gpt-j": Entry("text", "GPTJModel", "GPTJConfig",
                   dict(vocab_size=100, n_embd=16, n_layer=2, n_head=2, rotary_dim=4, n_positions=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)),
    "gpt-neox": Entry("text", "GPTNeoXModel", "GPTNeoXConfig", {**_DECODER, "rotary_pct": 0.5}),
    "llama": Entry("text", "LlamaModel", "LlamaConfig", {**_DECODER, "num_key_value_heads": 1}),
    "llama-classifier": Entry("text", "LlamaForSequenceClassification", "LlamaConfig",
                              {**_DECODER, "num_key_value_heads": 1, "num_labels": 3}),
    "mistral": Entry("text", "MistralModel", "MistralConfig", {**_DECODER, "num_key_value_heads": 1,
                                                              "sliding_window": 4}),
    "mixtral": Entry("text", "MixtralModel", "MixtralConfig", {**_DECODER, "num_key_value_heads": 1,
                                                              "num_local_experts": 3, "num_experts_per_tok": 2}),
    "qwen2": Entry("text", "Qwen2Model", "Qwen2Config", {**_DECODER, "num_key_value_heads": 1}),
    "qwen3": Entry("text", "Qwen3Model", "Qwen3Config", {**_DECODER, "num_key_value_heads": 1, "head_dim": 8}),
    "gemma": Entry("text", "GemmaModel", "GemmaConfig", {**_DECODER, "num_key_value_heads": 1, "head_dim": 8}),
    "gemma2": Entry("text", "Gemma2Model", "Gemma2Config", {**_DECODER, "num_key_value_heads": 1, "head_dim": 8,
                                                            "sliding_window": 4}),
    "phi": Entry("text", "PhiModel", "PhiConfig", {**_DECODER, "partial_rotary_factor": 0.5}),
    "phi3": Entry("text", "Phi3Model", "Phi3Config", {**_DECODER, "num_key_value_heads": 1}),
    "falcon": Entry("text", "FalconModel", "FalconConfig",
                    dict(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "falcon-alibi": Entry("text", "FalconModel", "FalconConfig",
                          dict(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, alibi=True,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "bloom": Entry("text", "BloomModel", "BloomConfig",
                   dict(vocab_size=100, hidden_size=16, n_layer=2, n_head=2, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2)),
    "opt": Entry("text", "OPTModel", "OPTConfig",
                 dict(vocab_size=100, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                      max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)),
    "codegen": Entry("text", "CodeGenModel", "CodeGenConfig",
                     dict(vocab_size=100, n_embd=16, n_layer=2, n_head=2, rotary_dim=4, n_positions=64, n_ctx=64,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "stablelm": Entry("text", "StableLmModel", "StableLmConfig", {**_DECODER, "num_key_value_heads": 1}),
    "olmo": Entry("text", "OlmoModel", "OlmoConfig", {**_DECODER, "num_key_value_heads": 1}),
    "starcoder2": Entry("text", "Starcoder2Model", "Starcoder2Config", {**_DECODER, "num_key_value_heads": 1}),
    "gpt-bigcode": Entry("text", "GPTBigCodeModel", "GPTBigCodeConfig",
                         dict(vocab_size=100, n_embd=16, n_layer=2, n_head=2, n_positions=64, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2)),
    "biogpt": Entry("text", "BioGptModel", "BioGptConfig", {**_BERTISH, "max_position_embeddings": 64,
                                                           "pad_token_id": 1}),
    "xglm": Entry("text", "XGLMModel", "XGLMConfig",
                  dict(vocab_size=100, d_model=16, num_layers=2, attention_heads=2, ffn_dim=32,
                       max_position_embeddings=64, pad_token_id=1)),
    "cohere": Entry("text", "CohereModel", "CohereConfig", {**_DECODER, "num_key_value_heads": 1}),
    "granite": Entry("text", "GraniteModel", "GraniteConfig", {**_DECODER, "num_key_value_heads": 1,
                                                              "embedding_multiplier": 2.0}),
    # ------------------------------------------------------------------ vision
    "vit": Entry("vision", "ViTModel", "ViTConfig", _VIT),
    "vit-classifier": Entry("vision", "ViTForImageClassification", "ViTConfig", {**_VIT, "num_labels": 3}),
    "deit": Entry("vision", "DeiTModel", "DeiTConfig", _VIT),
    "beit": Entry("vision", "BeitModel", "BeitConfig", {**_VIT, "use_relative_position_bias": True}),
    "data2vec-vision": Entry("vision", "Data2VecVisionModel", "Data2VecVisionConfig",
                             {**_VIT, "use_relative_position_bias": True}),
    "dinov2": Entry("vision", "Dinov2Model", "Dinov2Config",
                    dict(image_size=SIDE, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         mlp_ratio=2)),
    "dinov2-classifier": Entry("vision", "Dinov2ForImageClassification", "Dinov2Config",
                               dict(image_size=SIDE, patch_size=8, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, mlp_ratio=2, num_labels=3)),
    "dinov2-registers": Entry("vision", "Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                              dict(image_size=SIDE, patch_size=8, hidden_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, mlp_ratio=2, num_register_tokens=2)),
    "vit-msn": Entry("vision", "ViTMSNModel", "ViTMSNConfig", _VIT),
    "ijepa": Entry("vision", "IJepaModel", "IJepaConfig", _VIT),
    "siglip-vision": Entry("vision", "SiglipVisionModel", "SiglipVisionConfig", _VIT),
    "clip-vision": Entry("vision", "CLIPVisionModel", "CLIPVisionConfig", _VIT),
    "swin": Entry("vision", "SwinModel", "SwinConfig",
                  dict(image_size=SIDE, patch_size=4, embed_dim=8, depths=[1, 2], num_heads=[1, 2], window_size=2)),
    "swinv2": Entry("vision", "Swinv2Model", "Swinv2Config",
                    dict(image_size=SIDE, patch_size=4, embed_dim=8, depths=[1, 2], num_heads=[1, 2], window_size=2)),
    "convnext": Entry("vision", "ConvNextModel", "ConvNextConfig", dict(hidden_sizes=[8, 16], depths=[1, 2],
                                                                        num_stages=2)),
    "convnextv2": Entry("vision", "ConvNextV2Model", "ConvNextV2Config", dict(hidden_sizes=[8, 16], depths=[1, 2],
                                                                              num_stages=2)),
    "resnet": Entry("vision", "ResNetModel", "ResNetConfig", dict(embedding_size=8, hidden_sizes=[8, 16],
                                                                  depths=[1, 2])),
    "resnet-classifier": Entry("vision", "ResNetForImageClassification", "ResNetConfig",
                               dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], num_labels=3)),
    "regnet": Entry("vision", "RegNetModel", "RegNetConfig", dict(embedding_size=8, hidden_sizes=[8, 16],
                                                                  depths=[1, 2], groups_width=8)),
    "mobilenet-v1": Entry("vision", "MobileNetV1Model", "MobileNetV1Config", dict(depth_multiplier=0.25,
                                                                                  image_size=SIDE)),
    "mobilenet-v2": Entry("vision", "MobileNetV2Model", "MobileNetV2Config",
                          dict(depth_multiplier=0.25, image_size=SIDE, finegrained_output=False)),
    "efficientnet": Entry("vision", "EfficientNetModel", "EfficientNetConfig",
                          dict(image_size=SIDE, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128)),
    "levit": Entry("vision", "LevitModel", "LevitConfig",
                   dict(image_size=SIDE, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3], depths=[1, 1, 1],
                        key_dim=[8, 8, 8])),
    "poolformer": Entry("vision", "PoolFormerModel", "PoolFormerConfig",
                        dict(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_encoder_blocks=4), side=64),
    "cvt": Entry("vision", "CvtModel", "CvtConfig",
                 dict(embed_dim=[8, 16, 16], num_heads=[1, 2, 2], depth=[1, 2, 3])),
    "bit": Entry("vision", "BitModel", "BitConfig", dict(embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1],
                                                         num_groups=8)),
    "focalnet": Entry("vision", "FocalNetModel", "FocalNetConfig",
                      dict(image_size=SIDE, patch_size=4, embed_dim=8, depths=[1, 1], focal_levels=[2, 2])),
    "mobilevit": Entry("vision", "MobileViTModel", "MobileViTConfig",
                       dict(image_size=SIDE, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 16, 16, 16, 32])),
    "pvt": Entry("vision", "PvtModel", "PvtConfig",
                 dict(image_size=SIDE, hidden_sizes=[8, 16], depths=[1, 1], num_encoder_blocks=2,
                      sequence_reduction_ratios=[2, 1], num_attention_heads=[1, 2], patch_sizes=[4, 2],
                      strides=[4, 2], mlp_ratios=[2, 2])),
    "pvt-v2": Entry("vision", "PvtV2Model", "PvtV2Config",
                    dict(image_size=SIDE, hidden_sizes=[8, 16], depths=[1, 1], num_encoder_blocks=2,
                         sr_ratios=[2, 1], num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2],
                         mlp_ratios=[2, 2])),
    "segformer": Entry("vision", "SegformerModel", "SegformerConfig",
                       dict(hidden_sizes=[8, 16], depths=[1, 1], num_encoder_blocks=2, sr_ratios=[2, 1],
                            num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2])),
    "hiera": Entry("vision", "HieraModel", "HieraConfig",
                   dict(image_size=[SIDE, SIDE], patch_size=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1],
                        embed_dim=8, depths=[1, 1], num_heads=[1, 2], query_stride=[2, 2], num_query_pool=1,
                        masked_unit_size=[4, 4], masked_unit_attention=[True, False])),
    # ------------------------------------------------------------------ timm's state patterns, hand-built
    "timm-enum-attribute": Entry("vision", "mm_jupyter.bench._timm_patterns:EnumViT", ""),
    "timm-tensor-cache": Entry("vision", "mm_jupyter.bench._timm_patterns:CachedLeViT", ""),
    # ------------------------------------------------------------------ audio
    "wav2vec2": Entry("audio", "Wav2Vec2Model", "Wav2Vec2Config", _W2V),
    "hubert": Entry("audio", "HubertModel", "HubertConfig", _W2V),
    "wavlm": Entry("audio", "WavLMModel", "WavLMConfig", {**_W2V, "num_buckets": 16, "max_bucket_distance": 32}),
    "data2vec-audio": Entry("audio", "Data2VecAudioModel", "Data2VecAudioConfig",
                            {**_W2V, "num_conv_pos_embeddings": 4, "conv_pos_kernel_size": 4}),
    "sew": Entry("audio", "SEWModel", "SEWConfig", {**_W2V, "squeeze_factor": 2}),
    "unispeech": Entry("audio", "UniSpeechModel", "UniSpeechConfig", _W2V),
    "unispeech-sat": Entry("audio", "UniSpeechSatModel", "UniSpeechSatConfig", _W2V),
    "wav2vec2-conformer": Entry("audio", "Wav2Vec2ConformerModel", "Wav2Vec2ConformerConfig",
                                {**_W2V, "conv_depthwise_kernel_size": 3}),
    "whisper-encoder": Entry("audio", "transformers.models.whisper.modeling_whisper:WhisperEncoder", "WhisperConfig",
                             dict(vocab_size=100, d_model=16, encoder_layers=2, encoder_attention_heads=2,
                                  encoder_ffn_dim=32, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32,
                                  num_mel_bins=8, max_source_positions=16), features=(8, 32)),
    "audio-spectrogram-transformer": Entry("audio", "ASTModel", "ASTConfig",
                                           dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=32, patch_size=4, frequency_stride=4, time_stride=4,
                                                max_length=16, num_mel_bins=16), features=(16, 16)),
}

def config(name: str) -> Any:
    """A fresh config of entry ``name`` (constructors may edit the config they are given)."""
    entry = ZOO[name]
    return _resolve(entry.config)(**copy.deepcopy(entry.kwargs)) if entry.config else None


def build(name: str, seed: int) -> nn.Module:
    """Model ``seed`` of entry ``name``: random weights from the seed, in eval mode, after one eval
    forward (as a user's model has run: derived caches are filled)."""
    torch.manual_seed(seed)
    entry = ZOO[name]
    model: nn.Module = (_resolve(entry.model)(config(name)) if entry.config else _resolve(entry.model)()).eval()
    if not entry.config:
        with torch.no_grad():
            model(inputs(name, 2))
    return model


def inputs(name: str, n: int = 4, seed: int = 0) -> torch.Tensor:
    """``n`` items the model takes: token ids right-padded to different lengths, images, waveforms
    or spectrogram features."""
    entry = ZOO[name]
    gen = torch.Generator().manual_seed(seed)
    if entry.domain == "text":
        ids = torch.randint(5, 100, (n, TOKENS), generator=gen)
        pad_id = pad(name)
        if pad_id is not None:
            for i in range(n):
                ids[i, TOKENS - (i % 4) * 2:] = pad_id
        return ids
    if entry.domain == "vision":
        return torch.randn(n, 3, entry.side, entry.side, generator=gen)
    if entry.features is not None:
        return torch.randn(n, *entry.features, generator=gen)
    return torch.randn(n, AUDIO, generator=gen)


def forward(model: nn.Module, name: str, x: torch.Tensor) -> Any:
    """The model's own forward on ``x`` (text models with the padding mask)."""
    pad_id = pad(name) if ZOO[name].domain == "text" else None
    if pad_id is not None:
        return model(x, attention_mask=torch.ne(x, pad_id).long())
    return model(x)


@functools.lru_cache(maxsize=None)
def pad(name: str) -> int | None:
    """The pad id of a text entry's config: rows are right-padded with it and masked where it is."""
    found = getattr(config(name), "pad_token_id", None)
    return found if isinstance(found, int) else None


def derived(name: str, count: int = 3) -> dict[str, nn.Module]:
    """A base and ``count - 1`` copies whose last one or two parameterised blocks are redrawn
    (candidates that share a prefix, as fine-tunes of one base do)."""
    from ..modelsearch.splitting import split_model
    from .synthetic import parameterised, reinitialise

    base = build(name, 0)
    models: dict[str, nn.Module] = {"base": base}
    for i in range(1, count):
        model = copy.deepcopy(base)
        split = split_model(model, inputs(name, 8, seed=1))
        torch.manual_seed(100 + i)
        for j in parameterised(split)[-min(i, 2):]:
            reinitialise(split.blocks[j].module)
        models[f"d{i}"] = model.eval()
    return models


def updated(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with its last parameter tensor (in state-dict order) redrawn: the next
    version of a set, stored as an update."""
    out = copy.deepcopy(model)
    name, last = [(k, v) for k, v in out.state_dict(keep_vars=True).items() if v.is_floating_point()][-1]
    with torch.no_grad():
        last.copy_(torch.randn(last.shape, generator=torch.Generator().manual_seed(seed)).to(last.dtype))
    return out


def labels(n: int, classes: int = 3) -> torch.Tensor:
    return torch.arange(n) % classes
