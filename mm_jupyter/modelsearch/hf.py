"""Blocks of Hugging Face models by one generic rule, found by introspection (no table per model).

A transformers backbone (``model.base_model``) is a stem, a ``ModuleList`` of layers or stages
(held directly or by an encoder child), and a tail. Their forward functions are not traceable
(model outputs, decorators, mask helpers), but their structure is regular:

* **stem**: the backbone's children before the layer list — one embeddings module (its output, or
  the first element of a tuple), or token + position ``nn.Embedding`` tables (GPT-2).
* **layers**: every element of the list; a stage whose ``forward`` only chains its children (checked
  by tracing it, ``traced.chain``) is expanded into them (ResNet, ConvNeXt, RegNet stages). How a
  layer is called follows from its signature: ``attention_mask`` gets the batch's prepared mask
  (causal when an attention module says ``is_causal``), ``input_dimensions`` the token grid (Swin).
* **tail**: the encoder's children after the list, then the backbone's after the encoder. Feature
  maps (layers with ``Conv2d``) are reduced by the tail's pooling module (or a global mean), with
  convolutions before and layer norms after it; sequences are normalised by the tail's norms and
  reduced by its ``AdaptiveAvgPool1d`` (Swin), or the last token (causal models) or the first
  token (CLS). A parameterised pooler (BERT, ViT) is not a feature step; a classification model
  applies it in its head.
* **head** of a task model: its one parameterised non-backbone child when that is a Linear
  classifier (after the unused pooler, if any), so ``head(features)`` equals the logits.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SearchError
from .blocks import Block, ClsToken, Split, has_state
from .traced import chain

_POOL2D = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)


class GlobalMean(nn.Module):
    """Mean over the spatial axes of a feature map, ``(N, C, H, W) -> (N, C)``."""

    def forward(self, h: Tensor) -> Tensor:
        return h.mean([-2, -1])


class TokenPool(nn.Module):
    """A 1-d pooling module over the tokens of a sequence, ``(N, L, C) -> (N, C)``."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, h: Tensor) -> Tensor:
        return torch.flatten(self.pool(h.transpose(1, 2)), 1)


class TokenPositionStem(nn.Module):
    """Token embeddings plus position embeddings of ``0..L-1``, then parameter-free steps (dropout)."""

    def __init__(self, token: nn.Embedding, positions: list[nn.Embedding], rest: list[nn.Module]) -> None:
        super().__init__()
        self.token = token
        self.positions = nn.ModuleList(positions)
        self.rest = nn.ModuleList(rest)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.token(ids)
        where = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        for table in self.positions:
            h = h + table(where)
        for step in self.rest:
            h = step(h)
        return h


class PooledHead(nn.Module):
    """A classification head that reads the backbone's pooler output (BERT): the pooler takes a
    sequence and reads its first token, so it is given the CLS features as a one-token sequence."""

    def __init__(self, pooler: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pooler = pooler
        self.classifier = classifier

    def forward(self, cls: Tensor) -> Tensor:
        return self.classifier(self.pooler(cls.unsqueeze(1)))


class _TextContext:
    """Per-batch context from raw token ids, prepared as the backbone prepares it: the attention
    mask (pad id -> masked) and, for last-token features, each row's last non-pad position."""

    def __init__(self, backbone: nn.Module, causal: bool, masked: bool) -> None:
        self.backbone = backbone
        self.causal = causal
        self.masked = masked

    def __call__(self, raw: Tensor) -> dict[str, Tensor]:
        config: Any = self.backbone.config  # torch types module attributes as Tensor | Module
        pad = config.pad_token_id
        keep = (raw != pad).long() if pad is not None else torch.ones_like(raw)
        ctx: dict[str, Tensor] = {}
        if self.causal and pad is not None:
            ctx["last_index"] = (torch.arange(raw.shape[1], device=raw.device) * keep).argmax(-1)
        if self.masked:
            prepared = self._mask(config, raw, keep)
            if prepared is not None and not isinstance(prepared, Tensor):
                raise SearchError(f"unsupported attention implementation {config._attn_implementation!r} for blocks "
                                  f"of {type(self.backbone).__name__}")
            if prepared is not None:
                ctx["attention_mask"] = prepared
        return ctx

    def _mask(self, config: Any, raw: Tensor, keep: Tensor) -> Any:
        try:
            from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
        except ImportError:  # transformers 4.x
            if self.causal:
                raise SearchError("blocks of causal language models need transformers >= 4.53") from None
            return self.backbone.get_extended_attention_mask(keep, raw.shape)  # type: ignore[operator]
        dtype = next(self.backbone.parameters()).dtype
        shape_only = torch.zeros((1, 1, 1), dtype=dtype, device=raw.device).expand(raw.shape[0], raw.shape[1], 1)
        if self.causal:
            where = torch.arange(raw.shape[1], device=raw.device).unsqueeze(0)
            return create_causal_mask(config=config, inputs_embeds=shape_only, attention_mask=keep, cache=None,
                                      position_ids=where)
        return create_bidirectional_mask(config=config, inputs_embeds=shape_only, attention_mask=keep)


class _ImageContext:
    """The token grid of an image model whose layers take ``input_dimensions`` (Swin)."""

    def __init__(self, patch: Any) -> None:
        self.patch = (patch, patch) if isinstance(patch, int) else tuple(patch)

    def __call__(self, raw: Tensor) -> dict[str, Tensor]:
        h, w = raw.shape[-2:]
        grid = [-(-h // self.patch[0]), -(-w // self.patch[1])]
        return {"grid": torch.tensor(grid)}


def _layer_list(child: nn.Module) -> tuple[nn.ModuleList | nn.Sequential, list[nn.Module]] | None:
    """``child`` itself when it is a list of layers, or a ``ModuleList`` it holds (and the
    children it holds after that list)."""
    if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) and has_state(child):
        return child, []
    kids = list(child.children())
    for i, sub in enumerate(kids):
        if isinstance(sub, nn.ModuleList) and len(sub) and has_state(sub):
            return sub, kids[i + 1:]
    return None


def _norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or name.endswith(("LayerNorm", "RMSNorm"))


def _call(module: nn.Module) -> str:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "hf-layer"
    if "input_dimensions" in params:
        return "hf-grid-layer"
    return "hf-masked-layer" if "attention_mask" in params else "hf-layer"


def _stem(mods: list[nn.Module]) -> nn.Module | None:
    if len(mods) == 1:
        return mods[0]
    tables = [m for m in mods if isinstance(m, nn.Embedding)]
    rest = [m for m in mods if not isinstance(m, nn.Embedding)]
    if not tables or any(has_state(m) for m in rest) or mods[: len(tables)] != tables:
        return None
    return TokenPositionStem(tables[0], tables[1:], rest)


def _spatial_tail(tail: list[nn.Module]) -> nn.Module | None:
    before: list[nn.Module] = []
    after: list[nn.Module] = []
    pool: nn.Module | None = None
    for t in tail:
        if isinstance(t, _POOL2D) and pool is None:
            pool = t
        elif _norm(t):
            after.append(t)  # a layer norm over channels needs pooled features (ConvNeXt)
        elif pool is None:
            before.append(t)  # convolutions, batch norms, activations on the feature map
        else:
            return None
    return nn.Sequential(*before, pool if pool is not None else GlobalMean(), nn.Flatten(1), *after)


def _sequence_tail(tail: list[nn.Module], causal: bool) -> tuple[Block, nn.Module | None] | None:
    norms: list[nn.Module] = []
    unused: nn.Module | None = None
    for t in tail:
        if isinstance(t, nn.AdaptiveAvgPool1d):
            return Block(nn.Sequential(*norms, TokenPool(t))), unused
        if _norm(t):
            norms.append(t)
        elif has_state(t) and unused is None:
            unused = t  # a dense pooler: head material, not a feature step
        elif has_state(t):
            return None
    if causal:
        return Block(nn.Sequential(*norms), "hf-last-token"), unused
    return Block(nn.Sequential(*norms, ClsToken()) if norms else ClsToken()), unused


def _linear_like(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Sequential) and len(module) > 0 and isinstance(module[-1], nn.Linear)
            and not any(has_state(m) for m in list(module)[:-1]))


def _head(model: nn.Module, backbone: nn.Module, pooler: nn.Module | None) -> nn.Module | None:
    if model is backbone:
        return None
    others = [c for c in model.children() if c is not backbone]
    stateful = [c for c in others if has_state(c)]
    if len(stateful) != 1 or not _linear_like(stateful[0]):
        return None
    if any(c is not stateful[0] and not isinstance(c, (nn.Dropout, nn.Identity)) for c in others):
        return None
    return stateful[0] if pooler is None else PooledHead(pooler, stateful[0])


def split_hf(model: nn.Module) -> Split | None:
    """The generic rule (module docstring); None when ``model`` is not a transformers model or
    has no stem / layer list / tail this rule understands."""
    import transformers as tf

    if not isinstance(model, tf.PreTrainedModel):
        return None
    backbone = model.base_model
    children = list(backbone.children())
    body = next(((i, found) for i, c in enumerate(children) if (found := _layer_list(c)) is not None), None)
    if body is None or body[0] == 0:
        return None
    at, (layers, trailing) = body
    stem = _stem(children[:at])
    if stem is None:
        return None
    blocks = [Block(stem, "hf-layer")]
    for element in layers:
        units = chain(element) if any(isinstance(c, (nn.ModuleList, nn.Sequential)) for c in element.children()) \
            else None
        blocks += [Block(u, _call(u)) for u in (units or [element])]
    tail = trailing + children[at + 1:]
    causal = False
    pooler = None
    if any(isinstance(m, nn.Conv2d) for m in layers[-1].modules()):
        final = _spatial_tail(tail)
        if final is None:
            return None
        blocks.append(Block(final))
    else:
        causal = any(vars(m).get("is_causal") is True for m in layers[0].modules())
        sequence = _sequence_tail(tail, causal)
        if sequence is None:
            return None
        final_block, pooler = sequence
        blocks.append(final_block)
    calls = {b.call for b in blocks}
    config: Any = backbone.config  # torch types module attributes as Tensor | Module
    if getattr(model, "main_input_name", "") == "input_ids":
        context: Any = _TextContext(backbone, causal, "hf-masked-layer" in calls)
    elif "hf-grid-layer" in calls:
        context = _ImageContext(config.patch_size)
    else:
        context = None
    split = Split(blocks, _head(model, backbone, pooler), f"hf-{config.model_type}")
    if context is not None:
        split.context = context
    return split


__all__ = ["GlobalMean", "PooledHead", "TokenPool", "TokenPositionStem", "split_hf"]
