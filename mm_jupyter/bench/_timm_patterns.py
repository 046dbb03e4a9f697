"""Hand-built modules with the state patterns of timm's vision models (timm needs torchvision, which
does not install with this CPU torch): an enum attribute (ViT, DeiT, Swin, Mixer, ... keep
``patch_embed.output_fmt``) and a dict of tensors an eval forward fills (LeViT, EfficientViT-M,
EfficientFormer-V2 keep ``attention_bias_cache``). Importable by a fresh process; built with random
weights, no arguments.

The module is private on purpose: :mod:`mm_jupyter` is an allowed package of the trust gate, its
private modules are not, so a process recovers these classes only after importing this module
itself, as the user of a class of their own has it (the zoo's fresh processes do).
"""
from __future__ import annotations

import enum

import torch
from torch import nn


class Format(str, enum.Enum):
    """timm's ``Format``: the layout a patch embedding returns."""

    NCHW = "NCHW"
    NHWC = "NHWC"


class PatchEmbed(nn.Module):
    def __init__(self, channels: int = 16, patch: int = 8, output_fmt: Format = Format.NHWC) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, channels, patch, patch)
        self.output_fmt = output_fmt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return x.permute(0, 2, 3, 1) if self.output_fmt == Format.NHWC else x


class EnumViT(nn.Module):
    """A ViT-like model whose patch embedding holds an enum member."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.blocks = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU())
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(1, 2)
        out: torch.Tensor = self.head(self.norm(self.blocks(tokens)).mean(1))
        return out


class CachedBiasAttention(nn.Module):
    """LeViT's attention: learned biases gathered per head pair, cached per device in eval."""

    attention_bias_idxs: torch.Tensor

    def __init__(self, dim: int = 16, heads: int = 2, tokens: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.randn(heads, tokens) * 0.1)
        where = torch.arange(tokens)
        self.register_buffer("attention_bias_idxs", (where[:, None] - where[None, :]).abs(), persistent=False)
        self.attention_bias_cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> "CachedBiasAttention":
        super().train(mode)
        if mode:
            self.attention_bias_cache = {}  # as timm: trained biases invalidate the cache
        return self

    def biases(self, device: torch.device) -> torch.Tensor:
        if self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (dim // self.heads) ** -0.5 + self.biases(x.device)
        out: torch.Tensor = x + self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(n, length, dim))
        return out


class CachedLeViT(nn.Module):
    """A LeViT-like model: the attention's bias cache is filled by its first eval forward."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 16, 8, 8)
        self.attn = CachedBiasAttention()
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        out: torch.Tensor = self.head(self.attn(tokens).mean(1))
        return out
