"""Blocks of Hugging Face models by one generic rule, observed on a probe batch (no table per model).

A transformers backbone (``model.base_model``) is a stem, a ``ModuleList`` of layers or stages (held
directly or by an encoder child), and a tail. Their forward functions are not traceable (model
outputs, decorators, mask helpers), so the rule *watches* the model's own forward on a probe batch
(forward hooks on the backbone's and the encoder's children and on every layer) and builds the
blocks from what it saw:

* **stem**: the modules called before the first layer, chained (an embeddings module; ALBERT's
  embeddings and ``embedding_hidden_mapping_in``), or token + position tables summed and then the
  other modules (GPT-2; BART's scaled tokens, learned positions and ``layernorm_embedding``), or
  the backbone's own forward up to its first layer on a shell holding only those modules
  (``ForwardPrefix``: OPT's positions counted from the mask, Granite's multiplier) — whichever gives
  exactly what the model feeds its first layer. Rotary-embedding modules are not blocks: they make
  batch context.
* **layers**: one block per layer *call*, in call order, so a layer group that ALBERT shares across
  its depth is the same block run ``num_hidden_layers`` times (one block id, stored and hashed
  once); nested and interleaved lists (PoolFormer's patch embeddings and stages) in call order. A
  stage whose ``forward`` only chains its children (``traced.chain``) is expanded into them (ResNet,
  ConvNeXt, RegNet). Every tensor the model passes a layer besides the hidden states must equal a
  batch-context entry on the probe, computed from the raw batch with the model's own pieces: the
  padding mask prepared by transformers' mask helpers (bidirectional, causal, sliding-window,
  bidirectional sliding-window), position ids (also counted from the mask) and cache positions,
  rotary ``(cos, sin)`` from the model's rotary module (per layer type), ALiBi biases from the
  model's ``build_alibi_tensor``, the token grid (Swin); plain constants the model passes (BEiT's
  patch grid) are kept. T5's relative position bias, which its first layer computes and hands on, is
  computed in every later block by that layer's attention (so the block owns that table). What the
  backbone computes before its layers and passes each of them alike (Falcon's mask with ALiBi folded
  in, DeBERTa's relative positions and embeddings, MPNet's relative bias, RoFormer's sinusoidal
  positions) is batch context computed by the forward-prefix stem (``prefix.<name>``): the stem
  block then owns every module and the config that computation reads — with the layer holder's
  children read as weights (DeBERTa's ``rel_embeddings``) — so a candidate whose context would
  differ shares no block. A stage whose tokens the model turns into the next stage's feature map
  returns that map (``SequenceToMap``: the grid the stage returns, PVT-v2, or was given, PVT); a
  last layer with another output that is exactly what the classifier consumes returns that one
  (``PickOutput``: CvT's class token). A layer given a tensor nothing reproduces has no block view.
* **tail and features**: the features are what the model's classifier consumes (``Reference``): for
  a task model the input of its first parameterised layer outside the backbone, after the model's
  own pooling when that layer is the head's only one (made the identity: a causal model's sequence
  classifier keeps the last non-pad token); for a backbone the same from its family's
  ``...For{Image,Sequence,Audio}Classification`` (built on the meta device around this backbone);
  else the backbone's output. The feature step is the first of a few reductions (after the tail's
  norms) that matches it: a 1-d pooling module (Swin), the last non-pad token, the first token, first
  token + mean of the others (DINOv2), the mean token, a parameterised pooler over the whole
  sequence (BEiT); a parameterised pooler after a token pick (BERT, ALBERT) is head material, not a
  feature step. Feature maps go through the tail in call order, with a global mean where the model
  takes one (ConvNeXt), and stay whole when the classifier reads the map (PoolFormer).
* **head** of a task model: its one parameterised non-backbone child when that is a Linear
  classifier (after the pooler, if any), so ``head(features)`` equals the logits.

What was observed is kept as a :class:`Recipe` (module paths and choices), so a verified split is
rebuilt for the next model of the same architecture without running it.
"""
from __future__ import annotations

import copy
import inspect
import json
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ProbeMismatch, SearchError
from .blocks import Block, ClsToken, Split, eval_mode, has_state
from .probes import differs, hidden_argument
from .traced import chain

_POSITIONS = ("position_ids", "cache_position")


class GlobalMean(nn.Module):
    """Mean over the spatial axes of a feature map, ``(N, C, H, W) -> (N, C)``."""

    def forward(self, h: Tensor) -> Tensor:
        return h.mean([-2, -1])


class MeanToken(nn.Module):
    """The mean over all tokens of a sequence, ``(N, L, C) -> (N, C)``."""

    def forward(self, h: Tensor) -> Tensor:
        return h.mean(1)


class ClsAndMean(nn.Module):
    """The first token next to the mean of the tokens from ``start`` on (DINOv2's classifier input;
    ``start`` skips register tokens)."""

    def __init__(self, start: int = 1) -> None:
        super().__init__()
        self.start = start

    def forward(self, h: Tensor) -> Tensor:
        return torch.cat([h[:, 0], h[:, self.start:].mean(1)], dim=1)


class TokenPool(nn.Module):
    """A 1-d pooling module over the tokens of a sequence, ``(N, L, C) -> (N, C)``."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, h: Tensor) -> Tensor:
        return torch.flatten(self.pool(h.transpose(1, 2)), 1)


class Chain(nn.Module):
    """Modules applied one after another, each to the previous output (the first element of a
    tuple or model output)."""

    def __init__(self, steps: list[nn.Module]) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)

    def forward(self, h: Tensor) -> Tensor:
        for step in self.steps:
            h = _first(step(h))
        return h


class TokenPositionStem(nn.Module):
    """Token embeddings plus position embeddings of ``0..L-1``, then the other stem steps (dropout,
    an embedding layer norm)."""

    def __init__(self, token: nn.Embedding, positions: list[nn.Embedding], rest: list[nn.Module]) -> None:
        super().__init__()
        self.token = token
        self.positions = nn.ModuleList(positions)
        self.rest = nn.ModuleList(rest)

    def forward(self, ids: Tensor) -> Tensor:
        h: Tensor = self.token(ids)
        where = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        for table in self.positions:
            h = h + table(where)
        for step in self.rest:
            h = _first(step(h))
        return h


class PoolerChain(nn.Module):
    """A parameterised pooler applied to first-token features: steps that read a whole sequence
    (BERT's pooler picks its first token itself) get the features as a one-token sequence."""

    def __init__(self, steps: list[nn.Module], sequence: list[bool]) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.sequence = tuple(sequence)

    def forward(self, h: Tensor) -> Tensor:
        for step, whole in zip(self.steps, self.sequence):
            h = _first(step(h.unsqueeze(1) if whole else h))
        return h


class PooledHead(nn.Module):
    """A classification head that reads the backbone's pooler output (BERT, ALBERT)."""

    def __init__(self, pooler: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pooler = pooler
        self.classifier = classifier

    def forward(self, cls: Tensor) -> Tensor:
        out: Tensor = self.classifier(self.pooler(cls))
        return out


class RelativeBiasLayer(nn.Module):
    """A layer given the relative position bias that an earlier layer's attention computes (T5):
    the block computes it with that attention (owning its table) for the sequence at hand."""

    def __init__(self, layer: nn.Module, source: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.source = source

    def forward(self, h: Tensor, **inputs: Any) -> Any:
        length = h.shape[1]
        bias = self.source.compute_bias(length, length, device=h.device)  # type: ignore[operator]
        return self.layer(h, position_bias=bias, **inputs)


class SequenceToMap(nn.Module):
    """A stage whose model turns the tokens it returns into the feature map the next stage takes:
    the block returns that map. The grid is the one the stage returns, ``(outputs, height, width)``
    (PVT-v2), or, ``given``, the ``height`` and ``width`` the stage was given (PVT)."""

    def __init__(self, layer: nn.Module, given: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.given = given

    def forward(self, h: Tensor, **inputs: Any) -> Tensor:
        out = self.layer(h, **inputs)
        found = _as_map((out, inputs.get("height"), inputs.get("width")) if self.given else out)
        if found is None:
            raise SearchError(f"{type(self.layer).__name__} returned no token sequence of its grid")
        return found


class PickOutput(nn.Module):
    """The last layer's output at ``index`` (CvT: its class token, which the classifier reads)."""

    def __init__(self, layer: nn.Module, index: int) -> None:
        super().__init__()
        self.layer = layer
        self.index = index

    def forward(self, h: Tensor, **inputs: Any) -> Tensor:
        out: Tensor = self.layer(h, **inputs)[self.index]
        return out


def _as_map(out: Any) -> Tensor | None:
    """``(outputs, height, width)`` of a stage as the ``(N, C, height, width)`` map of its tokens;
    None when ``out`` is not of that form."""
    if not (isinstance(out, tuple) and len(out) == 3 and all(isinstance(v, int) for v in out[1:])):
        return None
    tokens = _first(out[0])
    if not isinstance(tokens, Tensor) or tokens.dim() != 3 or tokens.shape[1] != out[1] * out[2]:
        return None
    return tokens.reshape(tokens.shape[0], out[1], out[2], -1).permute(0, 3, 1, 2).contiguous()


def _first(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    return out


# --------------------------------------------------------------------------------------------
# Batch context


def _keep(config: Any, raw: Tensor) -> Tensor | None:
    pad = getattr(config, "pad_token_id", None)
    return (raw != pad).long() if isinstance(pad, int) else None


def text_forward(model: nn.Module, raw: Tensor) -> Any:
    """A text model's own forward on token ids, with the padding mask (pad id -> masked)."""
    keep = _keep(model.config, raw)
    return model(raw) if keep is None else model(raw, attention_mask=keep)


#: the context entries a layer input can be matched to (``Context``)
ENTRIES = ("attention_mask", "attention_mask.causal", "attention_mask.sliding", "attention_mask.bisliding",
           "position_ids", "position_ids.padded", "cache_position", "alibi")


class Context:
    """Per-batch context from the raw batch, prepared with the backbone's own pieces (entries by
    name; ``recipe.needs`` says which): the padding mask as transformers' mask helpers prepare it
    (``attention_mask`` bidirectional, ``.causal``, ``.sliding`` causal window, ``.bisliding``
    bidirectional window), ``position_ids`` (``0..L-1``; ``.padded``: counting non-pad tokens
    only), ``cache_position``, ``rope{i}.0/.1`` (the ``i``-th rotary module's cos and sin;
    ``rope{i}:{layer type}`` for one that serves several layer types), ``alibi`` (the model's ``build_alibi_tensor``),
    ``last_index`` (each row's last non-pad token), ``grid`` (an image's token grid) and
    ``prefix.{name}`` (what the backbone's own forward passes its first layer as ``name``, computed
    by the forward-prefix stem block, which owns every module and the config it reads: Falcon's
    mask with ALiBi folded in, DeBERTa's relative positions and embeddings, MPNet's relative bias,
    RoFormer's sinusoidal positions — the same for every layer)."""

    def __init__(self, backbone: nn.Module, needs: tuple[str, ...], rotary: list[nn.Module],
                 prefix: ForwardPrefix | None = None, first: nn.Module | None = None) -> None:
        self.backbone = backbone
        self.needs = needs
        self.rotary = rotary
        self.prefix = prefix
        self.first = first

    def __call__(self, raw: Tensor) -> dict[str, Tensor]:
        config: Any = self.backbone.config
        out: dict[str, Tensor] = {}
        wanted = [n for n in self.needs if n.startswith("prefix.")]
        if wanted:
            if self.prefix is None or self.first is None:
                raise SearchError("a layer input computed by the backbone's forward needs the forward-prefix stem")
            found = self.prefix.layer_inputs(raw, self.first)
            for name in wanted:
                value = found.get(name[len("prefix."):])
                if isinstance(value, Tensor):
                    out[name] = value
                elif isinstance(value, tuple):
                    out.update({f"{name}.{i}": v for i, v in enumerate(value)})
        if "grid" in self.needs:
            patch = config.patch_size
            ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
            h, w = raw.shape[-2:]
            out["grid"] = torch.tensor([-(-h // ph), -(-w // pw)])
        if raw.dtype not in (torch.long, torch.int):
            return out
        keep = _keep(config, raw)
        length = raw.shape[1]
        where = torch.arange(length, device=raw.device)
        if "last_index" in self.needs and keep is not None:
            out["last_index"] = (where * keep).argmax(-1)
        if "position_ids" in self.needs:
            out["position_ids"] = where.unsqueeze(0)
        if "position_ids.padded" in self.needs:
            ones = keep if keep is not None else torch.ones_like(raw)
            out["position_ids.padded"] = (torch.cumsum(ones, dim=1) * ones - 1).long()
        if "cache_position" in self.needs:
            out["cache_position"] = where
        dtype = next(self.backbone.parameters()).dtype
        like = torch.zeros((1, 1, 1), dtype=dtype, device=raw.device)
        for name in self.needs:
            if name.startswith("rope"):
                index, _, layer_type = name[4:].partition(":")
                rotary = self.rotary[int(index)]
                cos, sin = rotary(like, where.unsqueeze(0), layer_type) if layer_type else rotary(like,
                                                                                                  where.unsqueeze(0))
                out[f"{name}.0"], out[f"{name}.1"] = cos, sin
        for name in ("attention_mask", "attention_mask.causal", "attention_mask.sliding", "attention_mask.bisliding"):
            if name in self.needs:
                mask = self._mask(config, raw, keep, dtype, name.rpartition(".")[2])
                if mask is not None and not isinstance(mask, Tensor):
                    raise SearchError(f"unsupported attention implementation {config._attn_implementation!r} for "
                                      f"blocks of {type(self.backbone).__name__}")
                if mask is not None:
                    out[name] = mask
        if "alibi" in self.needs:
            out["alibi"] = self._alibi(config, keep if keep is not None else torch.ones_like(raw), dtype)
        return out

    def _mask(self, config: Any, raw: Tensor, keep: Tensor | None, dtype: torch.dtype, kind: str) -> Any:
        try:
            from transformers import masking_utils as mu
        except ImportError:  # transformers 4.x
            if kind != "attention_mask":
                raise SearchError("blocks of causal language models need transformers >= 4.53") from None
            ones = keep if keep is not None else torch.ones_like(raw)
            return self.backbone.get_extended_attention_mask(ones, raw.shape)  # type: ignore[operator]
        shape_only = torch.zeros((1, 1, 1), dtype=dtype, device=raw.device).expand(raw.shape[0], raw.shape[1], 1)
        if kind == "attention_mask":
            return mu.create_bidirectional_mask(config=config, inputs_embeds=shape_only, attention_mask=keep)
        if kind == "bisliding":
            return mu.create_bidirectional_sliding_window_mask(config=config, inputs_embeds=shape_only,
                                                               attention_mask=keep)
        where = torch.arange(raw.shape[1], device=raw.device).unsqueeze(0)
        make = mu.create_sliding_window_causal_mask if kind == "sliding" else mu.create_causal_mask
        return make(config=config, inputs_embeds=shape_only, attention_mask=keep, cache=None, position_ids=where)

    def _alibi(self, config: Any, keep: Tensor, dtype: torch.dtype) -> Tensor:
        build = getattr(self.backbone, "build_alibi_tensor", None) or getattr(
            sys.modules[type(self.backbone).__module__], "build_alibi_tensor", None)
        if build is None:
            raise SearchError(f"{type(self.backbone).__name__} has no build_alibi_tensor")
        heads = getattr(config, "n_head", None) or config.num_attention_heads
        alibi: Tensor = build(keep, heads, dtype)
        return alibi


# --------------------------------------------------------------------------------------------
# The stem as the backbone's own forward up to its first layer


class _Reached(Exception):
    def __init__(self, value: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> None:
        super().__init__("reached the first layer")
        self.value = value
        self.args_ = args
        self.kwargs = kwargs or {}


class _Stop(nn.Module):
    """Stands in for a layer in a backbone shell: the first call ends the shell's forward with the
    hidden states it was given. Keeps the layer's scalar attributes (a forward may read
    ``layer.attention_type`` before calling it)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        for key, value in vars(layer).items():
            if not key.startswith("_") and key != "training" and isinstance(value, (bool, int, float, str)):
                setattr(self, key, value)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise _Reached(hidden_argument(args, kwargs), args, kwargs)


_FRESH = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_forward_hooks",
                    "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                    "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
                    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"})


def _shell(module: nn.Module, keep: set[int], layers: nn.Module) -> nn.Module:
    """A module of ``module``'s class sharing its attributes, parameters and buffers, holding only
    the children in ``keep`` (by id), shells of the children that lead to them or to ``layers``,
    and ``layers`` replaced by stops. No constructor runs."""
    shell = object.__new__(type(module))
    nn.Module.__init__(shell)
    for key, value in vars(module).items():
        if key not in _FRESH:
            shell.__dict__[key] = value
    shell._parameters.update(module._parameters)
    shell._buffers.update(module._buffers)
    shell._non_persistent_buffers_set.update(module._non_persistent_buffers_set)
    for name, child in module._modules.items():
        if child is None:
            continue
        if child is layers:
            shell._modules[name] = nn.ModuleList([_Stop(layer) for layer in layers.children()])
        elif id(child) in keep:
            shell._modules[name] = child
        elif any(id(m) in keep or m is layers for m in child.modules()):
            shell._modules[name] = _shell(child, keep, layers)
    return shell


class ForwardPrefix(nn.Module):
    """The backbone's own forward up to its first layer (what it does before any layer that no
    module shows: a scale, positions counted from the padding mask, a mask applied to the
    embeddings) on a shell of the backbone that holds only the modules that run before it. The
    config is part of the block id (``config``), as it steers that code."""

    def __init__(self, backbone: nn.Module, keep: list[nn.Module], layers: nn.Module, text: bool) -> None:
        super().__init__()
        self.shell = _shell(backbone, {id(m) for m in keep}, layers)
        self.text = text
        config: Any = backbone.config
        self.config = config.to_json_string()

    def forward(self, raw: Tensor) -> Tensor:
        return self.reach(raw).value  # type: ignore[no-any-return]

    def reach(self, raw: Tensor) -> _Reached:
        """The backbone's forward stopped at its first layer's call (hidden states and arguments)."""
        try:
            if self.text:
                text_forward(self.shell, raw)
            else:
                self.shell(raw)
        except _Reached as reached:
            if not isinstance(reached.value, Tensor):
                raise SearchError("the backbone's forward gave its first layer no hidden-state tensor") from None
            return reached
        raise SearchError("the backbone's forward did not reach its first layer")

    def layer_inputs(self, raw: Tensor, layer: nn.Module) -> dict[str, Any]:
        """What the backbone's forward passes its first layer besides the hidden states, by the
        parameter names of ``layer`` (the real first layer): batch context that the model computes
        before its layers (a mask with ALiBi folded in, relative positions, a relative bias)."""
        reached = self.reach(raw)
        return _layer_arguments(layer, reached.args_, reached.kwargs)


# --------------------------------------------------------------------------------------------
# Observation


@dataclass
class _Call:
    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None
    path: str = ""


def _observe(model: nn.Module, watched: list[nn.Module], forward: Any, raw: Tensor) -> tuple[list[_Call], Any]:
    """The calls of ``watched`` modules in the order they start, during the model's own forward."""
    calls: list[_Call] = []
    open_calls: dict[int, list[_Call]] = {}
    handles = []

    def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        call = _Call(m, args, dict(kwargs))
        calls.append(call)
        open_calls.setdefault(id(m), []).append(call)

    def post(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        open_calls[id(m)].pop().output = out

    try:
        for m in {id(m): m for m in watched}.values():
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        with torch.no_grad():
            out = forward(model, raw)
    finally:
        for handle in handles:
            handle.remove()
    return calls, out


class _HeadReached(Exception):
    def __init__(self, value: Tensor | None) -> None:
        super().__init__("reached the head")
        self.value = value


class _NotOneLayer(Exception):
    """The head runs a second parameterised layer: its output is not its first layer's input."""


def _pooled_input(model: nn.Module, backbone: nn.Module, forward: Any, raw: Tensor) -> Tensor | None:
    """What ``model``'s head consumes *after the model's own pooling* (a sequence classifier of a
    causal model applies its layer to every token and keeps the last non-pad one): the forward
    with the head's one parameterised layer made the identity, so the model's output is its input,
    pooled as the model pools it. None when the head runs more than one such layer or the output is
    not one vector per item."""
    inside = {id(m) for m in backbone.modules()}
    leaves = [m for m in model.modules() if id(m) not in inside and next(m.parameters(recurse=False), None) is not None]
    if not leaves:
        return None
    called: list[int] = []

    def identity(leaf: nn.Module) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            if called and called[0] != id(leaf):
                raise _NotOneLayer()
            called.append(id(leaf))
            return args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
        return run

    for leaf in leaves:
        leaf.forward = identity(leaf)
    try:
        with torch.no_grad():
            out = _first(forward(model, raw))
    except Exception:  # noqa: BLE001 - not a one-layer head (or it needs its layer's output shape)
        return None
    finally:
        for leaf in leaves:
            del leaf.forward
    if not isinstance(out, Tensor) or out.is_meta or out.dim() != 2 or out.shape[0] != raw.shape[0]:
        return None
    return out


def _head_input(model: nn.Module, backbone: nn.Module, forward: Any, raw: Tensor) -> Tensor | None:
    """What ``model``'s forward feeds its first parameterised layer outside ``backbone`` (None when
    it has none or never calls one); the forward stops there."""
    inside = {id(m) for m in backbone.modules()}
    leaves = [m for m in model.modules() if id(m) not in inside and next(m.parameters(recurse=False), None) is not None]
    if not leaves:
        return None

    def stop(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        value = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        raise _HeadReached(value if isinstance(value, Tensor) else None)

    handles = [m.register_forward_pre_hook(stop, with_kwargs=True) for m in leaves]
    try:
        with torch.no_grad():
            forward(model, raw)
    except _HeadReached as reached:
        return reached.value
    except Exception:  # noqa: BLE001 - no reference from this head
        return None
    finally:
        for handle in handles:
            handle.remove()
    return None


def family_classifier(model: nn.Module) -> type | None:
    """The ``...For{Image,Sequence,Audio}Classification`` class of ``model``'s family, if any."""
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:
        return None
    import transformers as tf

    by_input = {"pixel_values": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
                "input_ids": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                "input_values": "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES"}
    mapping = getattr(auto, by_input.get(getattr(model, "main_input_name", ""), ""), None)
    name = mapping.get(getattr(model.config, "model_type", ""), None) if mapping else None
    if isinstance(name, (tuple, list)):
        name = name[0]
    cls = getattr(tf, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) else None


class Reference:
    """The features ``model``'s classifier consumes on a raw batch (module docstring): a task
    model's own head input (after the model's own pooling, for a one-layer head), its family's for
    a backbone, else the backbone's output."""

    def __init__(self, model: nn.Module, forward: Any) -> None:
        self.model = model
        self.forward = forward

    def __call__(self, raw: Tensor) -> Tensor | None:

        with eval_mode([self.model]):
            return self._reference(raw)

    def _reference(self, raw: Tensor) -> Tensor | None:
        model: Any = self.model
        backbone = model.base_model
        task = model if model is not backbone else _family_model(model)
        if task is not None:
            found = _pooled_input(task, backbone, self.forward, raw)
            if found is None:
                found = _head_input(task, backbone, self.forward, raw)
            if found is not None or task is model:
                return found
        with torch.no_grad():
            out = self.forward(model, raw)
        first = _first(out)
        return first if isinstance(first, Tensor) else None


def _family_model(backbone: nn.Module) -> nn.Module | None:
    """The family's classification model around this very backbone: built on the meta device (its
    head never runs), the backbone swapped in."""
    cls = family_classifier(backbone)
    if cls is None:
        return None
    try:
        with torch.device("meta"):
            task = cls(copy.deepcopy(backbone.config))
        prefix = task.base_model_prefix
        if type(getattr(task, prefix, None)) is not type(backbone):
            return None
        setattr(task, prefix, backbone)
        model: nn.Module = task.eval()
        return model
    except Exception:  # noqa: BLE001 - a family model that does not build has no reference
        return None


# --------------------------------------------------------------------------------------------
# The rule


@dataclass(frozen=True)
class Recipe:
    """A split as observed: module paths (relative to the model) and the choices made."""

    stem: str  # "chain" | "tables" | "prefix"
    stem_paths: tuple[str, ...]  # the modules that run before the first layer
    #: (path, call, inputs, wrapper): a bias source path (T5), "#map"/"#map-given" (PVT-v2/PVT), "#out<i>" or ""
    layers: tuple[tuple[str, str, tuple[str, ...], str], ...]
    spatial: bool
    tail: tuple[str, ...]  # sequence: norms before the reduction; feature map: ``_spatial_steps``
    reduce: str  # "cls" | "last" | "mean" | "cls+mean:<start>" | "pool:<path>" | "tail:<paths>" | "" (map)
    pooler: tuple[tuple[str, bool], ...]  # head material: (path, reads a sequence)
    needs: tuple[str, ...]
    rotary: tuple[str, ...]
    list_path: str  # the first layer list (the prefix stem stops there)


def _layer_list(child: nn.Module) -> nn.Module | None:
    """``child`` itself when it is a list of layers, or the module holding its layer lists."""
    if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) and has_state(child):
        return child
    if any(isinstance(sub, nn.ModuleList) and len(sub) and has_state(sub) for sub in child.children()):
        return child
    return None


def _units(holder: nn.Module) -> list[nn.Module]:
    """The layers of a holder: the elements of its lists, nested lists expanded (PoolFormer's stage
    lists of blocks); the holder itself when it is the list."""
    lists = [holder] if isinstance(holder, (nn.ModuleList, nn.Sequential)) else [
        c for c in holder.children() if isinstance(c, nn.ModuleList) and len(c) and has_state(c)]
    out: list[nn.Module] = []

    def walk(items: nn.Module) -> None:
        for item in items.children():
            if isinstance(item, nn.ModuleList):
                walk(item)
            else:
                out.append(item)

    for found in lists:
        walk(found)
    return out


def _norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or name.endswith(("LayerNorm", "RMSNorm"))


def _rotary(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RotaryEmbedding") or (
        "inv_freq" in module._buffers and not any(True for _ in module.parameters()))


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


def _spatial_steps(tail: list[_Call], whole: bool = False) -> tuple[str, ...]:
    """The tail after the last feature map, in call order, with ``#mean`` where the model reduces
    the map in its forward (ConvNeXt's mean before its layer norm) and ``#flatten`` where a pooled
    ``(N, C, 1, 1)`` map becomes a vector; the result is always flattened, a map still left is
    averaged unless the classifier reads it ``whole`` (PoolFormer's head normalises the map first)."""
    steps: list[str] = []
    shape: tuple[int, ...] | None = None  # the current map's shape (None: still 4-d, size unknown)
    dim = 4
    for c in tail:
        given = _hidden_of(c)
        if dim == 4 and given is not None and given.dim() == 2:
            steps.append("#flatten" if shape is not None and shape[-2:] == (1, 1) else "#mean")
        steps.append(c.path)
        out = _first(c.output)
        if isinstance(out, Tensor):
            dim, shape = out.dim(), tuple(out.shape)
    if dim == 4 and not whole and not (shape is not None and shape[-2:] == (1, 1)):
        steps.append("#mean")
    return (*steps, "#flatten")


def _spatial_tail(steps: list[str], get: Any) -> nn.Module:
    """The feature step of a feature map (``_spatial_steps``)."""
    return nn.Sequential(*[GlobalMean() if p == "#mean" else nn.Flatten(1) if p == "#flatten" else get(p)
                           for p in steps])


def _reducer(name: str, get: Any) -> tuple[nn.Module, str]:
    """The reduction module and block call of a recipe's ``reduce``."""
    if name == "last":
        return nn.Identity(), "hf-last-token"
    if name == "cls":
        return ClsToken(), "plain"
    if name == "mean":
        return MeanToken(), "plain"
    kind, _, arg = name.partition(":")
    if kind == "cls+mean":
        return ClsAndMean(int(arg)), "plain"
    if kind == "tail":
        return Chain([get(p) for p in arg.split(",")]), "plain"
    return TokenPool(get(arg)), "plain"


def _last_token(h: Tensor, ctx: dict[str, Tensor]) -> Tensor:
    last = ctx.get("last_index")
    return h[:, -1] if last is None else h[torch.arange(h.shape[0], device=h.device), last]


class _Reduce:
    """``Split.reduce``: the recipe's token reduction applied to a token-level reference."""

    def __init__(self, module: nn.Module, call: str) -> None:
        self.module = module
        self.call = call

    def __call__(self, h: Tensor, ctx: dict[str, Tensor]) -> Tensor:
        return _last_token(h, ctx) if self.call == "hf-last-token" else self.module(h)


def _text(model: nn.Module) -> bool:
    return getattr(model, "main_input_name", "") == "input_ids"


def _stem(model: nn.Module, kind: str, mods: list[nn.Module], layers: nn.Module) -> nn.Module:
    if kind == "tables":
        tables = [m for m in mods if isinstance(m, nn.Embedding) and not _rotary(m)]
        return TokenPositionStem(tables[0], tables[1:], [m for m in mods[len(tables):] if not _rotary(m)])
    if kind == "prefix":
        return ForwardPrefix(model.base_model, mods, layers, _text(model))  # type: ignore[arg-type]
    plain = [m for m in mods if not _rotary(m)]
    return plain[0] if len(plain) == 1 else Chain(plain)


def build(model: nn.Module, recipe: Recipe) -> Split:
    """The split a recipe describes, on ``model``'s own modules."""
    get = model.get_submodule
    backbone: Any = model.base_model
    blocks = []
    stem = None
    if recipe.stem_paths:
        stem = _stem(model, recipe.stem, [get(p) for p in recipe.stem_paths], get(recipe.list_path))
        blocks.append(Block(stem, "hf-layer"))
    for path, call, inputs, source in recipe.layers:
        layer = get(path)
        if source in ("#map", "#map-given"):
            layer = SequenceToMap(layer, given=source == "#map-given")
        elif source.startswith("#out"):
            layer = PickOutput(layer, int(source[4:]))
        elif source:
            layer = RelativeBiasLayer(layer, get(source))
        blocks.append(Block(layer, call, inputs))
    reduce = None
    if recipe.spatial:
        blocks.append(Block(_spatial_tail(list(recipe.tail), get)))
    else:
        tail = [get(p) for p in recipe.tail]
        module, call = _reducer(recipe.reduce, get)
        if call == "hf-last-token":
            blocks.append(Block(nn.Sequential(*tail), call))
        else:
            blocks.append(Block(nn.Sequential(*tail, module) if tail else module))
        reduce = _Reduce(module, call)
    pooler = PoolerChain([get(p) for p, _ in recipe.pooler], [s for _, s in recipe.pooler]) if recipe.pooler else None
    head = _head(model, backbone, pooler)
    forward = text_forward if _text(model) else _plain
    split = Split(blocks, head, f"hf-{backbone.config.model_type}", forward=forward, reduce=reduce,
                  pooler=pooler if head is None else None, recipe=recipe)
    if recipe.needs:
        prefix = stem if isinstance(stem, ForwardPrefix) else None  # the stem block computes that context
        first = get(recipe.layers[0][0]) if recipe.layers else None
        split.context = Context(backbone, recipe.needs, [get(p) for p in recipe.rotary], prefix, first)
    if head is None:
        split.reference = Reference(model, forward)
    return split


def _plain(model: nn.Module, raw: Tensor) -> Any:
    return model(raw)


def split_hf(model: nn.Module, probe: Tensor | None, recipe: Recipe | None = None) -> Split:
    """The generic rule (module docstring): built from ``recipe``, or observed on ``probe`` (made
    from the config when None); a SearchError saying what the rule does not understand."""
    if recipe is not None:
        return build(model, recipe)

    with eval_mode([model]):  # dropout off, batch-norm statistics untouched
        recipe = _Observer(model, probe if probe is not None else default_probe(model)).recipe()
    return build(model, recipe)


#: layer arguments that change nothing a block computes (caches, what to return)
_IGNORED_ARGS = frozenset({"use_cache", "output_attentions", "output_hidden_states", "return_dict", "cache",
                           "past_key_values", "past_key_value", "layer_past", "head_mask", "layer_head_mask",
                           "encoder_hidden_states", "encoder_attention_mask"})


class _Observer:
    """Works out a model's recipe from one observed forward on the probe."""

    def __init__(self, model: nn.Module, probe: Tensor) -> None:
        self.model = model
        self.probe = probe
        self.name = type(model).__name__
        self.backbone: Any = model.base_model
        self.paths: dict[int, str] = {}
        for path, m in model.named_modules():
            self.paths.setdefault(id(m), path)
        self.forward = text_forward if _text(model) else _plain
        self.causal = False
        self.prefix_found: dict[str, Any] | None = None  # what a forward-prefix stem passes the first layer

    def fail(self, why: str) -> SearchError:
        return SearchError(f"the Hugging Face rule cannot split {self.name}: {why}")

    def path(self, module: nn.Module) -> str:
        if id(module) not in self.paths:
            raise self.fail(f"{type(module).__name__} is not a submodule of the model")
        return self.paths[id(module)]

    def recipe(self) -> Recipe:
        backbone = self.backbone
        children = list(backbone.children())
        holder = next((found for c in children if (found := _layer_list(c)) is not None), None)
        if holder is None:
            raise self.fail("no list of layers found")
        units = _units(holder)
        first_list = holder if isinstance(holder, (nn.ModuleList, nn.Sequential)) else next(
            c for c in holder.children() if isinstance(c, nn.ModuleList) and len(c) and has_state(c))
        lists = {id(m) for m in holder.modules() if isinstance(m, nn.ModuleList)}
        containers = {id(backbone), id(holder)} | lists
        watched = list(children) + (list(holder.children()) if holder is not first_list else []) + units
        try:
            calls, output = _observe(self.model, watched, self.forward, self.probe)
        except Exception as e:  # noqa: BLE001 - the data does not fit the model itself
            lines = str(e).strip().splitlines()
            raise ProbeMismatch(f"the model's own forward raised {type(e).__name__}: {lines[0] if lines else ''}"
                                ) from None
        in_layers = {id(m) for m in units}
        calls = [c for c in calls if id(c.module) not in containers]
        at = [i for i, c in enumerate(calls) if id(c.module) in in_layers]
        if not at:
            raise self.fail("its forward calls none of its layers (or calls them past their hooks)")
        first, last = at[0], at[-1]
        between = [c for c in calls[first:last + 1] if id(c.module) not in in_layers and not _rotary(c.module)]
        if between:
            raise self.fail(f"{type(between[0].module).__name__} runs between its layers")
        rotary = list({id(c.module): c.module for c in calls if _rotary(c.module)}.values())
        pre = list({id(c.module): c.module for c in calls[:first]}.values())
        layer_calls = calls[first:last + 1]
        self.causal = any(vars(m).get("is_causal") is True for m in units[0].modules())
        self.holder, self.first_list, self.pre = holder, first_list, pre
        self.unit_ids, self.witness, self.first_layer = in_layers, _hidden_of(layer_calls[0]), layer_calls[0].module
        if pre:
            stem, stem_mods = self._stem(pre, self.witness, first_list)
        else:  # the first layer takes the raw input (hierarchical vision models: patch embeddings)
            stem, stem_mods = "chain", []
        entries = self._entries(rotary)
        used: set[str] = set()
        takes = [_hidden_of(c) for c in layer_calls[1:]] + [_first(output)]  # what follows each layer call
        layer_recipe = [spec for call, after in zip(layer_calls, takes)
                        for spec in self._layer(call, entries, used, layer_calls[0], after)]
        if any(entry.endswith(("=attention_mask.causal", "=attention_mask.sliding")) for spec in layer_recipe
               for entry in spec[2]):
            self.causal = True  # the model gives its layers a causal mask
        if any("=prefix." in entry for spec in layer_recipe for entry in spec[2]) and stem != "prefix":
            # the context those inputs come from is computed by the stem block: it must own all it reads
            stem, stem_mods = "prefix", self._prefix_mods() or stem_mods
        tail_calls = [c for c in calls[last + 1:] if not _rotary(c.module)]
        out = _as_map(layer_calls[-1].output) if layer_recipe[-1][3] == "#map" else _first(layer_calls[-1].output)
        if not isinstance(out, Tensor):
            raise self.fail("its last layer returns no tensor")
        picked = self._picked_output(layer_calls[-1]) if not layer_recipe[-1][3] else None
        if picked is not None:  # the classifier reads another output of the last layer (CvT's class token)
            index, out = picked
            layer_recipe[-1] = (*layer_recipe[-1][:3], f"#out{index}")
            tail_calls = []
        needs = {e.split("=", 1)[1] if "=" in e else e for spec in layer_recipe for e in spec[2]}
        needs = {n for n in needs if not n.startswith("#")}
        pooler: tuple[tuple[str, bool], ...] = ()
        spatial = out.dim() == 4
        if spatial:
            for c in tail_calls:
                c.path = self.path(c.module)
            reference = Reference(self.model, self.forward)(self.probe)
            whole = reference is not None and reference.dim() == 4  # the classifier reads the map itself
            reduce, norms = "", _spatial_steps(tail_calls, whole)
        elif out.dim() == 3:
            norms, reduce, pooler = self._features(out, tail_calls)
            if reduce == "last":
                needs.add("last_index")
        else:
            raise self.fail(f"its last layer returns a {out.dim()}-d tensor")
        if any(spec[1] == "hf-grid-layer" for spec in layer_recipe):
            needs.add("grid")
        return Recipe(stem, tuple(self.path(m) for m in stem_mods), tuple(layer_recipe), spatial, tuple(norms),
                      reduce, pooler, tuple(sorted(needs)), tuple(self.path(m) for m in rotary),
                      self.path(first_list))

    # -- stem ---------------------------------------------------------------------------------

    def _stem(self, mods: list[nn.Module], witness: Tensor | None, layers: nn.Module) -> tuple[str, list[nn.Module]]:
        """The first stem form whose output is exactly what the model feeds its first layer."""
        if witness is None:
            raise self.fail("its first layer is called without a hidden-state tensor")
        plain = [m for m in mods if not _rotary(m)]
        tables = [m for m in plain if isinstance(m, nn.Embedding)]
        kinds = ["chain"] if plain else []
        if tables and plain[: len(tables)] == tables:
            kinds.append("tables")
        kinds.append("prefix")
        tried = []
        extra = self._extra()
        for kind, used in [(k, mods) for k in kinds] + ([("prefix", mods + extra)] if extra else []):
            try:
                module = _stem(self.model, kind, used, layers)
                with torch.no_grad():
                    got = _first(module(self.probe))
            except Exception as e:  # noqa: BLE001 - this stem form does not apply
                tried.append(f"{kind}: {type(e).__name__}: {str(e).strip()[:80]}")
                continue
            why = differs(got, witness) if isinstance(got, Tensor) else "no tensor"
            if why is None:
                return kind, used
            tried.append(f"{kind}: {why}")
        names = ", ".join(type(m).__name__ for m in mods)
        raise self.fail(f"no stem of {names} gives what the model feeds its first layer ({'; '.join(tried)})")

    # -- layers -------------------------------------------------------------------------------

    def _entries(self, rotary: list[nn.Module]) -> dict[str, Any]:
        """Every context entry on the probe (entries that fail to build are left out)."""
        types = sorted(set(getattr(self.backbone.config, "layer_types", None) or ()))
        names = ENTRIES + tuple(f"rope{i}" for i in range(len(rotary))) + tuple(
            f"rope{i}:{t}" for i, r in enumerate(rotary) if "layer_type" in inspect.signature(r.forward).parameters
            for t in types)
        found: dict[str, Any] = {}
        for name in names:
            try:
                with torch.no_grad():
                    part = Context(self.backbone, (name,), rotary)(self.probe)
            except Exception:  # noqa: BLE001 - an entry this model cannot have
                continue
            if name.startswith("rope"):
                if f"{name}.0" in part:  # a tuple (cos, sin)
                    found[name] = (part[f"{name}.0"], part[f"{name}.1"])
            else:
                found[name] = part.get(name)
        return found

    def _layer(self, call: _Call, entries: dict[str, Any], used: set[str], first: _Call,
               after: Any) -> list[tuple[str, str, tuple[str, ...], str]]:
        layer = call.module
        try:
            args = _layer_arguments(layer, call.args, call.kwargs)
        except (TypeError, ValueError) as e:
            raise self.fail(f"cannot read the call of {type(layer).__name__}: {e}") from None
        sig = inspect.signature(layer.forward)
        inputs: list[str] = []
        source = ""
        grid = False
        for name, value in args.items():
            if name in _IGNORED_ARGS:
                if name in sig.parameters and sig.parameters[name].default is inspect.Parameter.empty and \
                        _plain_value(value):
                    inputs.append(f"{name}=#{json.dumps(value)}")  # required all the same (PVT-v2's stages)
                continue
            if name == "input_dimensions":
                grid = True
                continue
            if name == "position_bias" and isinstance(value, Tensor):
                source = self._bias_source(call, first)
                if source:
                    continue
            tensors = isinstance(value, Tensor) or (isinstance(value, tuple) and value and all(
                isinstance(v, Tensor) for v in value))
            if not tensors:
                if value is None and name == "attention_mask":
                    pass  # no mask on this batch: matched to an entry that is None here too
                elif _plain_value(value) and (name not in sig.parameters or value != sig.parameters[name].default):
                    inputs.append(f"{name}=#{json.dumps(value)}")  # a constant (an image's patch grid)
                    continue
                else:
                    continue
            entry = self._match(name, value, entries, layer)
            if entry is None:
                shape = tuple(value.shape) if isinstance(value, Tensor) else (
                    "none" if value is None else f"{len(value)} tensors")
                raise self.fail(f"its model gives {type(layer).__name__} `{name}` ({shape}), which no batch context "
                                "reproduces")
            used.add(entry)
            inputs.append(name if entry == name else f"{name}={entry}")
        if isinstance(after, Tensor) and after.dim() == 4:  # the model makes a map of the tokens it returns
            if _as_map(call.output) is not None:  # with their grid (PVT-v2)
                return [(self.path(layer), "hf-layer", tuple(inputs), "#map")]
            if _as_map((call.output, args.get("height"), args.get("width"))) is not None:  # the grid it was given (PVT)
                return [(self.path(layer), "hf-layer", tuple(inputs), "#map-given")]
        if grid:
            if inputs or source:
                raise self.fail(f"{type(layer).__name__} takes a token grid and other inputs")
            return [(self.path(layer), "hf-grid-layer", (), "")]
        if not inputs and not source and any(isinstance(c, (nn.ModuleList, nn.Sequential)) for c in layer.children()):
            units = chain(layer)
            if units:
                return [(self.path(u), "hf-layer", (), "") for u in units]
        return [(self.path(layer), "hf-layer", tuple(inputs), source)]

    def _match(self, name: str, value: Any, entries: dict[str, Any], layer: nn.Module) -> str | None:
        """The context entry equal to what the model passed (ambiguous when both are None on the
        probe: the kind the layer says it is, causal first for causal attention)."""
        if name == "attention_mask":
            kind = getattr(layer, "attention_type", None) or getattr(getattr(layer, "self_attn", None),
                                                                      "attention_type", None)
            masks = ["attention_mask.causal", "attention_mask", "attention_mask.sliding",
                     "attention_mask.bisliding"] if self.causal else [
                "attention_mask", "attention_mask.causal", "attention_mask.bisliding", "attention_mask.sliding"]
            if kind == "sliding_attention":
                masks = [m for m in masks if "sliding" in m] + [m for m in masks if "sliding" not in m]
            order = masks
        elif name == "position_embeddings":
            kind = getattr(layer, "attention_type", None)
            ropes = sorted(k for k in entries if k.startswith("rope"))
            order = [k for k in ropes if kind and k.endswith(f":{kind}")] + ropes
        else:
            order = [name] + [k for k in entries if k != name]
        for entry in order:
            if entry in entries and _same(entries[entry], value):
                return entry
        prefix = self._prefix_inputs()
        if name in prefix and _same(prefix[name], value):
            return f"prefix.{name}"
        return None

    def _prefix_inputs(self) -> dict[str, Any]:
        """What the backbone's forward-prefix stem passes the first layer on the probe ({} when
        no forward-prefix stem reproduces the first layer's hidden states)."""
        if self.prefix_found is None:
            self.prefix_found = {}
            mods = self._prefix_mods()
            if mods is not None:
                stem = ForwardPrefix(self.backbone, mods, self.first_list, _text(self.model))
                with torch.no_grad():
                    self.prefix_found = stem.layer_inputs(self.probe, self.first_layer)
        return self.prefix_found

    def _picked_output(self, call: _Call) -> tuple[int, Tensor] | None:
        """The position and value of a later output of the last layer that is exactly what the
        model's classifier consumes (CvT's last stage returns its map and its class token)."""
        out = call.output
        if not (isinstance(out, tuple) and any(isinstance(v, Tensor) for v in out[1:])):
            return None
        reference = Reference(self.model, self.forward)(self.probe)
        for i, value in enumerate(out[1:], 1):
            if isinstance(reference, Tensor) and isinstance(value, Tensor) and value.shape == reference.shape and \
                    differs(value, reference) is None:
                return i, value
        return None

    def _extra(self) -> list[nn.Module]:
        """The layer holder's children that hold no layers and do not run before them."""
        if self.holder is self.first_list:
            return []
        return [c for c in self.holder.children() if not any(
            m is self.first_list or id(m) in self.unit_ids for m in c.modules()) and all(c is not p for p in self.pre)]

    def _prefix_mods(self) -> list[nn.Module] | None:
        """The modules with which the backbone's forward up to its first layer gives exactly what
        the model feeds it: those called before it, plus, when they are not enough, the layer
        holder's children that hold no layers (DeBERTa's relative embeddings table, read as a
        weight, never called)."""
        extra = self._extra()
        for mods in (self.pre, self.pre + extra) if extra else (self.pre,):
            try:
                with torch.no_grad():
                    got = ForwardPrefix(self.backbone, mods, self.first_list, _text(self.model))(self.probe)
            except Exception:  # noqa: BLE001 - the forward needs something else
                continue
            if self.witness is not None and differs(got, self.witness) is None:
                return mods
        return None

    def _bias_source(self, call: _Call, first: _Call) -> str:
        """The attention of the first layer that computes the relative bias it hands on (T5), or ""."""
        source = next((m for m in first.module.modules() if vars(m).get("has_relative_attention_bias") is True
                       and callable(getattr(m, "compute_bias", None))), None)
        return "" if source is None else self.path(source)  # none: computed before the layers (MPNet)

    # -- features -----------------------------------------------------------------------------

    def _features(self, out: Tensor, tail: list[_Call]) -> tuple[tuple[str, ...], str, tuple[tuple[str, bool], ...]]:
        reference = Reference(self.model, self.forward)(self.probe)
        if reference is None:
            raise self.fail("neither a classifier nor an output shows what its features are")
        norms: list[_Call] = []  # the leading tail steps that keep the sequence's shape (norms, dropout)
        for c in tail:
            o, i = _first(c.output), _hidden_of(c)
            if not (isinstance(o, Tensor) and isinstance(i, Tensor) and o.dim() == 3 and o.shape == i.shape
                    and (_norm(c.module) or not has_state(c.module))):
                break
            norms.append(c)
        rest = tail[len(norms):]
        ctx = Context(self.backbone, ("last_index",), [])(self.probe)
        with torch.no_grad():
            h = out
            for c in norms:
                h = _first(c.module(h))
        reductions = [f"pool:{self.path(c.module)}" for c in rest if isinstance(c.module, nn.AdaptiveAvgPool1d)]
        reductions += ["last", "cls"] if self.causal else ["cls"]
        starts = sorted({1, 1 + int(getattr(self.backbone.config, "num_register_tokens", 0) or 0)})
        reductions += [f"cls+mean:{s}" for s in starts] + ["mean"] + ([] if self.causal else ["last"])
        stateful = [c for c in rest if has_state(c.module)]
        if stateful:  # a parameterised pooler over the whole sequence is the feature step (BEiT)
            reductions.append("tail:" + ",".join(self.path(c.module) for c in rest))
        poolers: list[tuple[tuple[str, bool], ...]] = [()]
        if stateful:  # or head material after a token pick (BERT, ALBERT)
            poolers.append(tuple((self.path(c.module), _first_input_dim(c) == 3) for c in rest
                                 if not isinstance(c.module, nn.AdaptiveAvgPool1d)))
        tried = []
        for reduce in reductions:
            module, call = _reducer(reduce, self.model.get_submodule)
            try:
                with torch.no_grad():
                    feats = _last_token(h, ctx) if call == "hf-last-token" else module(h)
                    want = reference
                    if want.dim() == feats.dim() + 1:
                        want = _last_token(want, ctx) if call == "hf-last-token" else module(want)
            except Exception:  # noqa: BLE001 - not a reduction of these outputs
                continue
            for pooler in poolers if not reduce.startswith("tail:") else [()]:
                got = feats
                if pooler:
                    steps = PoolerChain([self.model.get_submodule(p) for p, _ in pooler], [s for _, s in pooler])
                    try:
                        with torch.no_grad():
                            got = steps(feats)
                    except Exception:  # noqa: BLE001 - not a pooler of these features
                        continue
                if not isinstance(got, Tensor) or len(got) != len(want):
                    continue
                if differs(got.reshape(len(got), -1), want.reshape(len(want), -1)) is None:
                    return tuple(self.path(c.module) for c in norms), reduce, pooler
                tried.append(f"{reduce.split(':')[0]}{' + pooler' if pooler else ''}")
        raise self.fail(f"none of its feature reductions ({', '.join(tried)}) gives what its classifier consumes "
                        f"(shape {tuple(reference.shape)})")


def _layer_arguments(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A layer call's arguments by parameter name, without the first (the hidden states)."""
    sig = inspect.signature(layer.forward)
    bound = sig.bind(*args, **kwargs)
    params = list(sig.parameters)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif name != params[0]:
            out[name] = value
    return out


def _plain_value(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (tuple, list)) and all(_plain_value(v) for v in value)


def _first_input_dim(call: _Call) -> int:
    h = _hidden_of(call)
    return h.dim() if h is not None else 0


def _hidden_of(call: _Call) -> Tensor | None:
    if call.args and isinstance(call.args[0], Tensor):
        return call.args[0]
    value = call.kwargs.get("hidden_states")
    if isinstance(value, Tensor):
        return value
    return next((v for v in call.kwargs.values() if isinstance(v, Tensor)), None)


def _same(ours: Any, theirs: Any) -> bool:
    if ours is None or theirs is None:
        return ours is None and theirs is None
    if isinstance(theirs, tuple):
        return isinstance(ours, tuple) and len(ours) == len(theirs) and all(map(_same, ours, theirs))
    return isinstance(ours, Tensor) and ours.shape == theirs.shape and ours.dtype == theirs.dtype and bool(
        torch.equal(ours, theirs))


# --------------------------------------------------------------------------------------------


def padded_probe(model: nn.Module, probe: Tensor) -> Tensor:
    """``probe`` plus a copy of its first row with the second half padded, for a text model with a
    pad token (whatever padding the data's first rows have, the mask is checked)."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if not _text(model) or not isinstance(pad, int) or probe.dim() != 2 or probe.shape[1] < 2 or \
            probe.dtype not in (torch.long, torch.int):
        return probe
    row = probe[:1].clone()
    row[0, probe.shape[1] // 2:] = pad
    return torch.cat([probe, row])


def default_probe(model: nn.Module) -> Tensor:
    """A small batch made from a Hugging Face model's config (used when no data is at hand):
    token ids with rows padded to different lengths, images at the configured size, or audio."""
    config: Any = getattr(model, "config", None)
    name = getattr(model, "main_input_name", "")
    gen = torch.Generator().manual_seed(0)
    if config is None:
        raise SearchError(f"{type(model).__name__} has no config to make a probe batch from; give one")
    if name == "input_ids":
        vocab = int(getattr(config, "vocab_size", 100) or 100)
        length = min(12, int(getattr(config, "max_position_embeddings", 12) or 12))
        pad = getattr(config, "pad_token_id", None)
        ids = torch.randint(min(5, vocab - 1), vocab, (4, length), generator=gen)
        if isinstance(pad, int):
            ids[ids == pad] = (pad + 1) % vocab
            for i in range(1, 4):
                ids[i, length - i * max(1, length // 6):] = pad
        return ids
    if name == "pixel_values":
        channels = int(getattr(config, "num_channels", 3) or 3)
        size = getattr(config, "image_size", 32) or 32
        rows, cols = (size, size) if isinstance(size, int) else tuple(size)[:2]
        return torch.randn(2, channels, int(rows), int(cols), generator=gen)
    if name == "input_values":
        return torch.randn(2, 4000, generator=gen)
    raise SearchError(f"cannot make a probe batch for {type(model).__name__} (input {name!r}); give one")


__all__ = ["ENTRIES", "Chain", "ClsAndMean", "Context", "ForwardPrefix", "GlobalMean", "MeanToken", "PooledHead",
           "PoolerChain", "Recipe", "Reference", "RelativeBiasLayer", "TokenPool", "TokenPositionStem", "build",
           "default_probe", "family_classifier", "padded_probe", "split_hf", "text_forward"]
