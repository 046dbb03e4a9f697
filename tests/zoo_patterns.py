"""Hand-built modules with the kinds of state zoo models carry that a plain state dict does not
(timm itself needs torchvision, which does not install with this CPU torch, so its patterns are
imitated here): an enum attribute (timm's ``patch_embed.output_fmt``), a dict of tensors a module
fills during an eval forward (timm's and Hugging Face's LeViT ``attention_bias_cache``), plain
tensor attributes, and a Hugging Face model whose constructor edits its config (``LevitModel``).

Importable by the tests' fresh processes (tests/ is on their PYTHONPATH).
"""
from __future__ import annotations

import hashlib
import itertools
from enum import Enum
from typing import Any, Callable

import torch
from torch import nn


class Format(str, Enum):
    """As timm.layers.format.Format: a str enum a patch embedding keeps as its output format."""

    NCHW = "NCHW"
    NHWC = "NHWC"
    NLC = "NLC"


class PatchEmbed(nn.Module):
    def __init__(self, dim: int = 8, patch: int = 4, output_fmt: Format = Format.NLC) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.output_fmt = Format(output_fmt)
        self.formats = (Format.NCHW, self.output_fmt)  # enum members inside a container too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if self.output_fmt == Format.NHWC:
            return x.permute(0, 2, 3, 1)
        if self.output_fmt == Format.NLC:
            return x.flatten(2).transpose(1, 2)
        return x


class TinyViT(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x + self.mlp(self.norm(x))
        return self.head(x.mean(1))


class CachedBiasAttention(nn.Module):
    """LeViT's attention: a parameter of relative-position biases, gathered by index on every
    training forward and cached per device during eval forwards (``train()`` clears the cache)."""

    def __init__(self, dim: int = 8, heads: int = 2, resolution: int = 3) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        points = list(itertools.product(range(resolution), range(resolution)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(heads, len(offsets)))
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs).view(len(points), len(points)),
                             persistent=False)
        self.attention_bias_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def train(self, mode: bool = True) -> "CachedBiasAttention":
        super().train(mode)
        if mode and self.attention_bias_cache:
            self.attention_bias_cache = {}
        return self

    def get_attention_biases(self, device: torch.device) -> torch.Tensor:
        if self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.get_attention_biases(x.device)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class LeViTLike(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(dim, patch=4)
        self.blocks = nn.Sequential(CachedBiasAttention(dim), CachedBiasAttention(dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.patch_embed(x)).mean(1))


class TensorAttributes(nn.Module):
    """Plain tensors a module keeps outside its state dict: one, a list of them, a dict of them."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(4, 4)
        self.temperature = torch.rand((), generator=g) + 0.5
        self.anchors = [torch.randn(4, generator=g), torch.randn(4, generator=g).double()]
        self.table = {"shift": torch.randn(4, generator=g), "mask": torch.rand(4, generator=g) > 0.5}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x) / self.temperature + self.anchors[0] + self.anchors[1].float()
        return torch.where(self.table["mask"], y, y + self.table["shift"])


def levit_config() -> Any:
    """The issue's reproduction: LevitModel's constructor appends to ``config.down_ops``."""
    import transformers

    return transformers.LevitConfig(image_size=32, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3],
                                    depths=[1, 1, 1], key_dim=[8, 8, 8])


def _levit() -> nn.Module:
    import transformers

    return transformers.LevitModel(levit_config())


def _images(side: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.linspace(-2, 2, 2 * 3 * side * side).reshape(2, 3, side, side)


#: name -> (builder of one model given its seed, input); every model is run once in eval mode
#: before it is saved, so caches filled by eval forwards are filled (with per-model values)
PATTERNS: dict[str, tuple[Callable[[int], nn.Module], Callable[[], torch.Tensor]]] = {
    "enum-vit": (lambda seed: TinyViT(), _images(8)),
    "cache-levit": (lambda seed: LeViTLike(), _images(12)),
    "tensor-attributes": (lambda seed: TensorAttributes(seed), lambda: torch.linspace(-1, 1, 8).reshape(2, 4)),
    "hf-levit-config-edit": (lambda seed: _levit(), _images(32)),
}


def build(name: str, seed: int) -> nn.Module:
    """Model ``seed`` of ``name``: seeded parameters, one eval forward (fills eval caches), eval mode."""
    torch.manual_seed(seed)
    model = PATTERNS[name][0](seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + p.numel())) * 0.2)
    model.eval()
    outputs(model, name)
    return model


def outputs(model: nn.Module, name: str) -> list[str]:
    """Digests of what ``model`` returns on its input (one thread: bit-reproducible)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out: Any = model(PATTERNS[name][1]())
    finally:
        torch.set_num_threads(threads)
    found = [out] if isinstance(out, torch.Tensor) else [v for v in out.to_tuple() if isinstance(v, torch.Tensor)]
    return [digest(t) for t in found]


def digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + raw).hexdigest()


def full_state(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Digests of the model's state dict and of the tensors it holds in plain attributes."""
    from mm_jupyter.store.structure import module_state

    return {k: digest(t) for k, t in module_state(model, keys).items()}
