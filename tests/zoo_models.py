"""A zoo of module kinds a user saves without telling the store how to build them.

Importable (tests/ is on the subprocesses' PYTHONPATH): every entry of ``ZOO`` builds one model
with seeded content and has an ``inputs`` function giving the batch the model is run on, so a fresh
process can compare its recovered models' outputs with the originals'.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


def swish(x: torch.Tensor) -> torch.Tensor:
    """A module-level activation of this (non allow-listed) module: see ``allow_functions``."""
    return x * torch.sigmoid(x)


class ListNet(nn.Module):
    """A ModuleList walked in forward, with constructor arguments."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4 if i == 0 else width, width) for i in range(depth)])
        self.act = F.gelu
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.act(layer(x))
        return self.head(x)


class DictNet(nn.Module):
    """ModuleDict, ParameterList and ParameterDict."""

    def __init__(self, keys: tuple[str, ...] = ("a", "b")) -> None:
        super().__init__()
        self.keys = keys
        self.branches = nn.ModuleDict({k: nn.Linear(4, 4) for k in keys})
        self.scales = nn.ParameterList([nn.Parameter(torch.ones(4)) for _ in keys])
        self.shift = nn.ParameterDict({k: nn.Parameter(torch.zeros(4)) for k in keys})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i, k in enumerate(self.keys):
            out = out + self.branches[k](x) * self.scales[i] + self.shift[k]
        return out


class Residual(nn.Module):
    def __init__(self, width: int, norm: str = "layer") -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width) if norm == "layer" else nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.norm(self.fc(x)))


class ResNetLike(nn.Module):
    """Nested custom classes: a stem, residual blocks in a ModuleList, optional dropout slot."""

    def __init__(self, width: int = 8, blocks: int = 2, norm: str = "layer") -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(4, width), nn.ReLU())
        self.blocks = nn.ModuleList([Residual(width, norm) for _ in range(blocks)])
        self.register_module("dropout", None)  # an empty submodule slot
        self.skip = nn.Identity()
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.skip(self.stem(x))
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class NoneSlots(nn.Module):
    """A None parameter slot, a None buffer slot, a non-persistent buffer and a plain tensor attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, 4))
        self.register_parameter("bias", None)
        self.register_buffer("mask", None)
        self.register_buffer("offsets", torch.arange(3, dtype=torch.float32) * 0.25, persistent=False)
        self.temperature = torch.tensor([0.5, 2.0])
        self.mode = ("scaled", 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight.t() + self.offsets) * self.temperature[0] * self.mode[1]


class Tied(nn.Module):
    """An embedding tied to its decoder, and two layers sharing one module."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        shared = nn.Linear(6, 6)
        self.first = shared
        self.second = shared
        self.dec = nn.Linear(6, 11, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.dec(self.second(torch.tanh(self.first(self.norm(self.emb(idx))))))


class WithSwish(nn.Module):
    """Uses a function of a module that is not on the import allow-list."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class Seq2Seq(nn.Module):
    """Wraps modules whose forward takes two inputs (decoder layer, full Transformer, attention)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "decoder":
            self.core = nn.TransformerDecoderLayer(16, 2, 24, dropout=0.0, batch_first=True, norm_first=True)
        elif kind == "transformer":
            self.core = nn.Transformer(16, 2, 1, 1, 24, dropout=0.0, batch_first=True)
        else:
            self.core = nn.MultiheadAttention(16, 4, batch_first=True, kdim=8, vdim=8, add_bias_kv=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, :5], x[:, 5:]
        if self.kind == "attention":
            return self.core(a, b[..., :8], b[..., 8:], need_weights=False)[0]
        return self.core(a, b)


class HFWrapper(nn.Module):
    """A Hugging Face BERT inside a user's class: the structural record holds its config."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                         vocab_size=50, max_position_embeddings=16)
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.head = nn.Linear(16, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(input_ids=ids).last_hidden_state[:, 0])


def _hf(kind: str) -> nn.Module:
    import transformers as tf

    if kind == "bert":
        return tf.BertModel(tf.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=20, vocab_size=50, max_position_embeddings=16))
    if kind == "gpt2":
        return tf.GPT2Model(tf.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    return tf.ResNetModel(tf.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))


def _ints(shape: tuple[int, ...], high: int) -> Callable[[], torch.Tensor]:
    return lambda: (torch.arange(int(torch.tensor(shape).prod())).reshape(shape) * 7 + 3) % (high - 1) + 1


def _floats(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.linspace(-2, 2, int(torch.tensor(shape).prod())).reshape(shape)


#: name -> (builder, input); each builder makes one model (content seeded by the caller)
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "linear": (lambda: nn.Linear(4, 2), _floats(3, 4)),
    "sequential": (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2)), _floats(3, 4)),
    "nested-sequential": (lambda: nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Tanh()),
                                                nn.Sequential(nn.Linear(4, 2), nn.LogSoftmax(dim=-1))), _floats(3, 4)),
    "modulelist-ctor-args": (lambda: ListNet(width=12, depth=3), _floats(3, 4)),
    "moduledict-parameterlist": (lambda: DictNet(("a", "b", "c")), _floats(3, 4)),
    "rnn": (lambda: nn.RNN(5, 7, num_layers=2, nonlinearity="relu"), _floats(4, 2, 5)),
    "gru-bidirectional": (lambda: nn.GRU(5, 6, bidirectional=True, batch_first=True), _floats(2, 4, 5)),
    "lstm": (lambda: nn.LSTM(6, 8, num_layers=2), _floats(5, 3, 6)),
    "lstm-proj": (lambda: nn.LSTM(6, 8, proj_size=4, batch_first=True), _floats(3, 5, 6)),
    "transformer-encoder": (lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, activation="gelu"), 2,
        norm=nn.LayerNorm(16), enable_nested_tensor=False), _floats(2, 5, 16)),
    "transformer-decoder-layer": (lambda: Seq2Seq("decoder"), _floats(2, 9, 16)),
    "transformer": (lambda: Seq2Seq("transformer"), _floats(2, 9, 16)),
    "multihead-attention": (lambda: Seq2Seq("attention"), _floats(2, 9, 16)),
    "conv-batchnorm": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)),
                       _floats(2, 3, 8, 8)),
    "conv1d-groupnorm": (lambda: nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding="valid"), nn.GroupNorm(2, 4),
                                               nn.SiLU(), nn.AdaptiveAvgPool1d(1)), _floats(2, 2, 9)),
    "convtranspose-instancenorm": (lambda: nn.Sequential(
        nn.ConvTranspose2d(2, 4, 2, stride=2), nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        nn.Upsample(scale_factor=2, mode="nearest"), nn.PixelShuffle(2)), _floats(2, 2, 3, 3)),
    "embedding-layernorm": (lambda: nn.Sequential(nn.Embedding(10, 6, max_norm=None), nn.LayerNorm(6),
                                                  nn.Linear(6, 3)), _ints((2, 5), 10)),
    "embeddingbag": (lambda: nn.EmbeddingBag(10, 4, mode="mean"), _ints((3, 4), 10)),
    "tied-and-shared": (Tied, _ints((2, 5), 11)),
    "none-slots-nonpersistent": (NoneSlots, _floats(2, 4)),
    "resnet-like-nested": (lambda: ResNetLike(width=8, blocks=3), _floats(3, 4)),
    "resnet-like-batchnorm": (lambda: ResNetLike(width=6, blocks=2, norm="batch"), _floats(3, 4)),
    "float64": (lambda: nn.Sequential(nn.Linear(4, 4), nn.GELU(approximate="tanh")).to(torch.float64),
                lambda: _floats(3, 4)().double()),
    "prelu-softplus": (lambda: nn.Sequential(nn.Linear(4, 3), nn.PReLU(3), nn.Softplus(beta=2.0, threshold=10.0)),
                       _floats(3, 4)),
    "hf-wrapped-bert": (HFWrapper, _ints((2, 6), 50)),
    "hf-bert": (lambda: _hf("bert"), _ints((2, 6), 50)),
    "hf-gpt2": (lambda: _hf("gpt2"), _ints((2, 6), 50)),
    "hf-resnet": (lambda: _hf("resnet"), _floats(2, 3, 16, 16)),
}


def build(name: str, seed: int) -> nn.Module:
    """Model ``seed`` of zoo entry ``name``: built, then every state tensor filled from the seed, in eval mode."""
    from store_models import fill_

    torch.manual_seed(seed)
    model = ZOO[name][0]()
    fill_(model, seed)
    return model.eval()


def outputs(model: nn.Module, name: str) -> list[str]:
    """Digests of every tensor ``model`` returns on its zoo input (one thread: bit-reproducible)."""
    return output_digests(model, ZOO[name][1](), name)


def output_digests(model: Callable[[Any], Any], x: Any, name: str) -> list[str]:
    """Digests of every tensor ``model(x)`` returns (tuples, dicts and model outputs walked), on one
    thread so that a fresh process computes the same bytes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out: Any = model(x)
    finally:
        torch.set_num_threads(threads)
    found: list[torch.Tensor] = []

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, (tuple, list)):
            for v in x:
                walk(v)
        elif isinstance(x, dict) or hasattr(x, "to_tuple"):
            for v in (x.to_tuple() if hasattr(x, "to_tuple") else x.values()):
                walk(v)

    walk(out)
    if not found:
        raise AssertionError(f"{name} returned no tensor")
    return [hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + t.contiguous().view(torch.uint8).numpy().tobytes())
            .hexdigest() for t in found]
