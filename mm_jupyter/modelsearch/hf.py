"""Blocks of Hugging Face models by one generic rule, observed on a probe batch (no table per model).

A transformers backbone (``model.base_model``) is a stem, a ``ModuleList`` of layers or stages (held
directly or by an encoder child), and a tail. Their forward functions are not traceable (model
outputs, decorators, mask helpers), so the rule *watches* the model's own forward on a probe batch
(forward hooks on the backbone's and the encoder's children and on every layer) and builds the
blocks from what it saw:

* **stem**: the modules called before the first layer, chained (an embeddings module; ALBERT's
  embeddings and ``embedding_hidden_mapping_in``), or token + position tables summed and then the
  other modules (GPT-2; BART's scaled tokens, learned positions and ``layernorm_embedding``) —
  whichever gives exactly what the model feeds its first layer. Rotary-embedding modules are not
  blocks: they make batch context.
* **layers**: one block per layer *call*, in call order, so a layer group that ALBERT shares across
  its depth is the same block run ``num_hidden_layers`` times (one block id, stored and hashed
  once). A stage whose ``forward`` only chains its children (``traced.chain``) is expanded into them
  (ResNet, ConvNeXt, RegNet). Every tensor the model passes a layer besides the hidden states must
  come from the batch context, computed from the raw batch with the model's own pieces: the
  padding mask prepared by transformers' mask helpers (bidirectional, causal, sliding-window),
  position ids and cache positions, rotary ``(cos, sin)`` from the model's rotary module, ALiBi
  biases from the model's ``build_alibi_tensor``, the token grid (Swin); each is matched to what the
  model passed on the probe. T5's relative position bias, which its first layer computes and hands
  on, is computed in every later block by that layer's attention (so the block owns that table).
  A layer given a tensor nothing reproduces (DeBERTa's relative embeddings) has no block view.
* **tail and features**: the features are what the model's classifier consumes (``reference``): for
  a task model the input of its first parameterised layer outside the backbone; for a backbone the
  same from its family's ``...ForImageClassification`` / ``...ForSequenceClassification`` (built on
  the meta device around this backbone, stopped before its head runs); else the backbone's output.
  The feature step is the first of a few parameter-free reductions (after the tail's norms) that
  matches it: a 1-d pooling module (Swin), the last non-pad token (causal), the first token, first
  token + mean of the others (DINOv2), the mean token; a parameterised pooler after them (BERT,
  ALBERT) is head material, not a feature step. Feature maps go through the tail's convolutions, its
  pooling module (or a global mean), then its norms (ConvNeXt).
* **head** of a task model: its one parameterised non-backbone child when that is a Linear
  classifier (after the pooler, if any), so ``head(features)`` equals the logits.

What was observed is kept as a :class:`Recipe` (module paths and choices), so a verified split is
rebuilt for the next model of the same architecture without running it.
"""
from __future__ import annotations

import copy
import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SearchError
from .blocks import Block, ClsToken, Split, has_state
from .traced import chain

_POOL2D = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
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
        h = self.token(ids)
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
        return self.classifier(self.pooler(cls))


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


class Context:
    """Per-batch context from the raw batch, prepared with the backbone's own pieces (entries by
    name; ``recipe.needs`` says which): ``attention_mask`` (bidirectional or causal, by
    ``causal``), ``attention_mask.sliding``, ``position_ids``, ``cache_position``, ``rope{i}.0/.1``
    (the ``i``-th rotary module's cos and sin), ``alibi``, ``last_index`` (each row's last non-pad
    token) and ``grid`` (the image's token grid)."""

    def __init__(self, backbone: nn.Module, causal: bool, needs: tuple[str, ...], rotary: list[nn.Module]) -> None:
        self.backbone = backbone
        self.causal = causal
        self.needs = needs
        self.rotary = rotary

    def __call__(self, raw: Tensor) -> dict[str, Tensor]:
        config: Any = self.backbone.config
        out: dict[str, Tensor] = {}
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
        if "cache_position" in self.needs:
            out["cache_position"] = where
        dtype = next(self.backbone.parameters()).dtype
        for i, rotary in enumerate(self.rotary):
            if f"rope{i}" in self.needs:
                like = torch.zeros((1, 1, 1), dtype=dtype, device=raw.device)
                cos, sin = rotary(like, where.unsqueeze(0))
                out[f"rope{i}.0"], out[f"rope{i}.1"] = cos, sin
        for name in ("attention_mask", "attention_mask.sliding"):
            if name in self.needs:
                mask = self._mask(config, raw, keep, dtype, sliding=name.endswith("sliding"))
                if mask is not None and not isinstance(mask, Tensor):
                    raise SearchError(f"unsupported attention implementation {config._attn_implementation!r} for "
                                      f"blocks of {type(self.backbone).__name__}")
                if mask is not None:
                    out[name] = mask
        if "alibi" in self.needs:
            out["alibi"] = self._alibi(config, keep if keep is not None else torch.ones_like(raw), dtype)
        return out

    def _mask(self, config: Any, raw: Tensor, keep: Tensor | None, dtype: torch.dtype, sliding: bool) -> Any:
        try:
            from transformers import masking_utils as mu
        except ImportError:  # transformers 4.x
            if self.causal:
                raise SearchError("blocks of causal language models need transformers >= 4.53") from None
            ones = keep if keep is not None else torch.ones_like(raw)
            return self.backbone.get_extended_attention_mask(ones, raw.shape)  # type: ignore[operator]
        shape_only = torch.zeros((1, 1, 1), dtype=dtype, device=raw.device).expand(raw.shape[0], raw.shape[1], 1)
        if self.causal:
            where = torch.arange(raw.shape[1], device=raw.device).unsqueeze(0)
            make = mu.create_sliding_window_causal_mask if sliding else mu.create_causal_mask
            return make(config=config, inputs_embeds=shape_only, attention_mask=keep, cache=None, position_ids=where)
        return mu.create_bidirectional_mask(config=config, inputs_embeds=shape_only, attention_mask=keep)

    def _alibi(self, config: Any, keep: Tensor, dtype: torch.dtype) -> Tensor:
        build = getattr(self.backbone, "build_alibi_tensor", None) or getattr(
            sys.modules[type(self.backbone).__module__], "build_alibi_tensor", None)
        if build is None:
            raise SearchError(f"{type(self.backbone).__name__} has no build_alibi_tensor")
        heads = getattr(config, "n_head", None) or config.num_attention_heads
        return build(keep, heads, dtype)


# --------------------------------------------------------------------------------------------
# Observation


@dataclass
class _Call:
    module: nn.Module
    args: tuple
    kwargs: dict
    output: Any = None


def _observe(model: nn.Module, watched: list[nn.Module], forward: Any, raw: Tensor) -> tuple[list[_Call], Any]:
    """The calls of ``watched`` modules in the order they start, during the model's own forward."""
    calls: list[_Call] = []
    open_calls: dict[int, list[_Call]] = {}
    handles = []

    def pre(m: nn.Module, args: tuple, kwargs: dict) -> None:
        call = _Call(m, args, dict(kwargs))
        calls.append(call)
        open_calls.setdefault(id(m), []).append(call)

    def post(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
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


class _Stop(Exception):
    def __init__(self, value: Tensor | None) -> None:
        super().__init__("stop")
        self.value = value


def _head_input(model: nn.Module, backbone: nn.Module, forward: Any, raw: Tensor) -> Tensor | None:
    """What ``model``'s forward feeds its first parameterised layer outside ``backbone`` (None when
    it has none or never calls one); the forward stops there."""
    inside = {id(m) for m in backbone.modules()}
    leaves = [m for m in model.modules() if id(m) not in inside and next(m.parameters(recurse=False), None) is not None]
    if not leaves:
        return None

    def stop(m: nn.Module, args: tuple, kwargs: dict) -> None:
        value = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        raise _Stop(value if isinstance(value, Tensor) else None)

    handles = [m.register_forward_pre_hook(stop, with_kwargs=True) for m in leaves]
    try:
        with torch.no_grad():
            forward(model, raw)
    except _Stop as s:
        return s.value
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
    model's own head input, its family's for a backbone, else the backbone's output."""

    def __init__(self, model: nn.Module, forward: Any) -> None:
        self.model = model
        self.forward = forward

    def __call__(self, raw: Tensor) -> Tensor | None:
        from .blocks import eval_mode

        with eval_mode([self.model]):
            return self._reference(raw)

    def _reference(self, raw: Tensor) -> Tensor | None:
        model: Any = self.model
        backbone = model.base_model
        if model is not backbone:
            return _head_input(model, backbone, self.forward, raw)
        task = _family_model(model)
        if task is not None:
            found = _head_input(task, model, self.forward, raw)
            if found is not None:
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
        return task.eval()
    except Exception:  # noqa: BLE001 - a family model that does not build has no reference
        return None


# --------------------------------------------------------------------------------------------
# The rule


@dataclass(frozen=True)
class Recipe:
    """A split as observed: module paths (relative to the model) and the choices made."""

    stem: str  # "chain" | "tables"
    stem_paths: tuple[str, ...]
    layers: tuple[tuple[str, str, tuple[str, ...], str], ...]  # (path, call, inputs, bias source path)
    spatial: bool
    tail: tuple[str, ...]  # sequence: norms before the reduction; feature map: the tail modules
    reduce: str  # "cls" | "last" | "mean" | "cls+mean:<start>" | "pool:<path>" | "" (feature map)
    pooler: tuple[tuple[str, bool], ...]  # head material: (path, reads a sequence)
    causal: bool
    needs: tuple[str, ...]
    rotary: tuple[str, ...]


def _layer_list(child: nn.Module) -> tuple[nn.ModuleList | nn.Sequential, list[nn.Module]] | None:
    if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) and has_state(child):
        return child, []
    kids = list(child.children())
    for i, sub in enumerate(kids):
        if isinstance(sub, nn.ModuleList) and len(sub) and has_state(sub):
            return sub, kids[i + 1:]
    return None


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


def _reducer(name: str, get: Any) -> tuple[nn.Module, str]:
    """The reduction module and block call of a recipe's ``reduce``."""
    if name == "last":
        return nn.Identity(), "hf-last-token"
    if name == "cls":
        return ClsToken(), "plain"
    if name == "mean":
        return MeanToken(), "plain"
    if name.startswith("cls+mean:"):
        return ClsAndMean(int(name.split(":", 1)[1])), "plain"
    return TokenPool(get(name.split(":", 1)[1])), "plain"


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


def build(model: nn.Module, recipe: Recipe) -> Split:
    """The split a recipe describes, on ``model``'s own modules."""
    get = model.get_submodule
    backbone: Any = model.base_model
    stem_mods = [get(p) for p in recipe.stem_paths]
    if recipe.stem == "tables":
        tables = [m for m in stem_mods if isinstance(m, nn.Embedding)]
        first: nn.Module = TokenPositionStem(tables[0], tables[1:], [m for m in stem_mods if m not in tables])
    else:
        first = stem_mods[0] if len(stem_mods) == 1 else Chain(stem_mods)
    blocks = [Block(first, "hf-layer")]
    for path, call, inputs, source in recipe.layers:
        layer = get(path)
        if source:
            layer = RelativeBiasLayer(layer, get(source))
        blocks.append(Block(layer, call, inputs))
    tail = [get(p) for p in recipe.tail]
    reduce = None
    if recipe.spatial:
        final = _spatial_tail(tail)
        assert final is not None
        blocks.append(Block(final))
    else:
        module, call = _reducer(recipe.reduce, get)
        if call == "hf-last-token":
            blocks.append(Block(nn.Sequential(*tail), call))
        else:
            blocks.append(Block(nn.Sequential(*tail, module) if tail else module))
        reduce = _Reduce(module, call)
    pooler = PoolerChain([get(p) for p, _ in recipe.pooler], [s for _, s in recipe.pooler]) if recipe.pooler else None
    head = _head(model, backbone, pooler)
    forward = text_forward if getattr(model, "main_input_name", "") == "input_ids" else _plain
    split = Split(blocks, head, f"hf-{backbone.config.model_type}", forward=forward, reduce=reduce,
                  pooler=pooler if head is None else None, recipe=recipe)
    if recipe.needs:
        split.context = Context(backbone, recipe.causal, recipe.needs, [get(p) for p in recipe.rotary])
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
    from .blocks import eval_mode

    with eval_mode([model]):  # dropout off, batch-norm statistics untouched
        recipe = _Observer(model, probe if probe is not None else default_probe(model)).recipe()
    return build(model, recipe)


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
        self.forward = text_forward if getattr(model, "main_input_name", "") == "input_ids" else _plain

    def fail(self, why: str) -> SearchError:
        return SearchError(f"the Hugging Face rule cannot split {self.name}: {why}")

    def recipe(self) -> Recipe:
        backbone = self.backbone
        children = list(backbone.children())
        body = next(((c, found) for c in children if (found := _layer_list(c)) is not None), None)
        if body is None:
            raise self.fail("no list of layers found")
        holder, (layers, _) = body
        containers = {id(backbone), id(layers)} | ({id(holder)} if holder is not layers else set())
        watched = list(children) + (list(holder.children()) if holder is not layers else []) + list(layers)
        try:
            calls, _ = _observe(self.model, watched, self.forward, self.probe)
        except Exception as e:  # noqa: BLE001 - the data does not fit the model itself
            from .verify import ProbeMismatch

            lines = str(e).strip().splitlines()
            raise ProbeMismatch(f"the model's own forward raised {type(e).__name__}: {lines[0] if lines else ''}"
                                ) from None
        in_layers = {id(m) for m in layers}
        calls = [c for c in calls if id(c.module) not in containers]
        at = [i for i, c in enumerate(calls) if id(c.module) in in_layers]
        if not at:
            raise self.fail("its forward calls none of its layers")
        first, last = at[0], at[-1]
        between = [c for c in calls[first:last + 1] if id(c.module) not in in_layers and not _rotary(c.module)]
        if between:
            raise self.fail(f"{type(between[0].module).__name__} runs between its layers")
        rotary = list({id(c.module): c.module for c in calls if _rotary(c.module)}.values())
        pre = [c for c in calls[:first] if not _rotary(c.module)]
        layer_calls = calls[first:last + 1]
        witness = _hidden_of(layer_calls[0])
        stem, stem_mods = self._stem(pre, witness)
        self.causal = any(vars(m).get("is_causal") is True for m in layers[0].modules())
        context = Context(backbone, self.causal, ("attention_mask", "attention_mask.sliding", "alibi", "last_index",
                                                  "grid", *_POSITIONS, *(f"rope{i}" for i in range(len(rotary)))),
                          rotary)
        entries = self._entries(context)
        entries_used: set[str] = set()
        layer_recipe = [spec for call in layer_calls for _, spec in self._layer(call, entries, entries_used,
                                                                                layer_calls[0])]
        tail_calls = [c for c in calls[last + 1:] if not _rotary(c.module)]
        out = _first(layer_calls[-1].output)
        if not isinstance(out, Tensor):
            raise self.fail("its last layer returns no tensor")
        needs = set(entries_used)
        spatial = out.dim() == 4
        pooler: tuple[tuple[str, bool], ...] = ()
        if spatial:
            reduce, norms = "", tuple(self.path(c.module) for c in tail_calls)
            if _spatial_tail([c.module for c in tail_calls]) is None:
                raise self.fail("its tail after the last feature map is not convolutions, a pooling and norms")
        elif out.dim() == 3:
            norms, reduce, pooler = self._features(out, tail_calls, context)
            if reduce == "last":
                needs.add("last_index")
        else:
            raise self.fail(f"its last layer returns a {out.dim()}-d tensor")
        if any(call == "hf-grid-layer" for _, call, _, _ in layer_recipe):
            needs.add("grid")
        return Recipe(stem, tuple(self.path(m) for m in stem_mods), tuple(layer_recipe), spatial, tuple(norms),
                      reduce, pooler, self.causal, tuple(sorted(needs)), tuple(self.path(m) for m in rotary))

    def path(self, module: nn.Module) -> str:
        if id(module) not in self.paths:
            raise self.fail(f"{type(module).__name__} is not a submodule of the model")
        return self.paths[id(module)]

    # -- stem ---------------------------------------------------------------------------------

    def _stem(self, pre: list[_Call], witness: Tensor | None) -> tuple[str, list[nn.Module]]:
        mods = list({id(c.module): c.module for c in pre}.values())
        if not mods:
            raise self.fail("nothing runs before its first layer")
        if witness is None:
            raise self.fail("its first layer is called without a hidden-state tensor")
        tried = []
        tables = [m for m in mods if isinstance(m, nn.Embedding)]
        options: list[tuple[str, nn.Module]] = [("chain", mods[0] if len(mods) == 1 else Chain(mods))]
        if tables and mods[: len(tables)] == tables:
            options.append(("tables", TokenPositionStem(tables[0], tables[1:], mods[len(tables):])))
        from .verify import _differs

        for kind, module in options:
            try:
                with torch.no_grad():
                    got = _first(module(self.probe))
            except Exception as e:  # noqa: BLE001 - this stem form does not apply
                tried.append(f"{kind}: {type(e).__name__}")
                continue
            why = _differs(got, witness) if isinstance(got, Tensor) else "no tensor"
            if why is None:
                return kind, mods
            tried.append(f"{kind}: {why}")
        names = ", ".join(type(m).__name__ for m in mods)
        raise self.fail(f"no stem of {names} gives what the model feeds its first layer ({'; '.join(tried)})")

    # -- layers -------------------------------------------------------------------------------

    def _entries(self, context: Context) -> dict[str, Any]:
        """Every context entry on the probe (entries that fail to build are left out)."""
        found: dict[str, Any] = {}
        for name in context.needs:
            try:
                with torch.no_grad():
                    part = Context(context.backbone, context.causal, (name,), context.rotary)(self.probe)
            except Exception:  # noqa: BLE001 - an entry this model cannot have
                continue
            if name.startswith("rope"):
                if f"{name}.0" in part:
                    found[name] = (part[f"{name}.0"], part[f"{name}.1"])
            else:
                found[name] = part.get(name)
        return found

    def _layer(self, call: _Call, entries: dict[str, Any], used: set[str],
               first: _Call) -> list[tuple[nn.Module, tuple[str, str, tuple[str, ...], str]]]:
        layer = call.module
        try:
            sig = inspect.signature(layer.forward)
            bound = sig.bind(*call.args, **call.kwargs)
        except (TypeError, ValueError) as e:
            raise self.fail(f"cannot read the call of {type(layer).__name__}: {e}") from None
        params = list(sig.parameters)
        args: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                args.update(value)
            elif name != params[0]:
                args[name] = value
        inputs: list[str] = []
        source = ""
        grid = False
        for name, value in args.items():
            if name == "input_dimensions":
                grid = True
                continue
            if name == "position_bias" and isinstance(value, Tensor):
                source = self._bias_source(call, first)
                continue
            tensors = isinstance(value, Tensor) or (isinstance(value, tuple) and value and all(
                isinstance(v, Tensor) for v in value))
            if not tensors and not (value is None and name == "attention_mask"):
                continue
            entry = self._match(name, value, entries, layer)
            if entry is None:
                shape = tuple(value.shape) if isinstance(value, Tensor) else f"{len(value)} tensors"
                raise self.fail(f"its model gives {type(layer).__name__} `{name}` ({shape}), which no batch context "
                                "reproduces")
            used.add(entry)
            inputs.append(name if entry == name else f"{name}={entry}")
        if grid:
            if inputs or source:
                raise self.fail(f"{type(layer).__name__} takes a token grid and other inputs")
            return [(layer, (self.path(layer), "hf-grid-layer", (), ""))]
        if not inputs and not source and any(isinstance(c, (nn.ModuleList, nn.Sequential)) for c in layer.children()):
            units = chain(layer)
            if units:
                return [(u, (self.path(u), "hf-layer", (), "")) for u in units]
        return [(layer, (self.path(layer), "hf-layer", tuple(inputs), source))]

    def _match(self, name: str, value: Any, entries: dict[str, Any], layer: nn.Module) -> str | None:
        """The context entry equal to what the model passed (the one named like the argument first)."""
        if name == "attention_mask":
            kind = getattr(layer, "attention_type", None) or getattr(getattr(layer, "self_attn", None),
                                                                      "attention_type", None)
            order = ["attention_mask.sliding", "attention_mask"] if kind == "sliding_attention" else [
                "attention_mask", "attention_mask.sliding"]
        elif name == "position_embeddings":
            order = sorted(k for k in entries if k.startswith("rope"))
        else:
            order = [name] + [k for k in entries if k != name]
        for entry in order:
            if entry in entries and _same(entries[entry], value):
                return entry
        return None

    def _bias_source(self, call: _Call, first: _Call) -> str:
        """The attention of the first layer that computes the relative bias it hands on (T5)."""
        source = next((m for m in first.module.modules() if vars(m).get("has_relative_attention_bias") is True
                       and callable(getattr(m, "compute_bias", None))), None)
        if source is None:
            raise self.fail(f"{type(call.module).__name__} is given a position bias that no layer computes")
        return self.path(source)

    # -- features -----------------------------------------------------------------------------

    def _features(self, out: Tensor, tail: list[_Call],
                  context: Context) -> tuple[tuple[str, ...], str, tuple[tuple[str, bool], ...]]:
        from .verify import _differs

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
        ctx = Context(self.backbone, self.causal, ("last_index",), [])(self.probe)
        with torch.no_grad():
            h = out
            for c in norms:
                h = _first(c.module(h))
        reductions = [f"pool:{self.path(c.module)}" for c in rest if isinstance(c.module, nn.AdaptiveAvgPool1d)]
        reductions += (["last"] if self.causal else []) + ["cls"]
        config = self.backbone.config
        starts = sorted({1, 1 + int(getattr(config, "num_register_tokens", 0) or 0)})
        reductions += [f"cls+mean:{s}" for s in starts] + ["mean"]
        poolers: list[tuple[tuple[str, bool], ...]] = [()]
        stateful = [c for c in rest if has_state(c.module)]
        if stateful:
            poolers.append(tuple((self.path(c.module), _first_input_dim(c) == 3) for c in rest
                                 if not isinstance(c.module, nn.AdaptiveAvgPool1d)))
        tried = []
        for reduce in reductions:
            module, call = _reducer(reduce, self.model.get_submodule)
            with torch.no_grad():
                feats = _last_token(h, ctx) if call == "hf-last-token" else module(h)
                want = reference
                if want.dim() == feats.dim() + 1:
                    want = _last_token(want, ctx) if call == "hf-last-token" else module(want)
            for pooler in poolers:
                got = feats
                if pooler:
                    chain_ = PoolerChain([self.model.get_submodule(p) for p, _ in pooler], [s for _, s in pooler])
                    try:
                        with torch.no_grad():
                            got = chain_(feats)
                    except Exception:  # noqa: BLE001 - not a pooler of these features
                        continue
                why = _differs(got.reshape(len(got), -1), want.reshape(len(want), -1))
                if why is None:
                    return tuple(self.path(c.module) for c in norms), reduce, pooler
                tried.append(f"{reduce}{' + pooler' if pooler else ''}")
        raise self.fail(f"none of its feature reductions ({', '.join(tried)}) gives what its classifier consumes "
                        f"(shape {tuple(reference.shape)})")


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


__all__ = ["Chain", "ClsAndMean", "Context", "GlobalMean", "MeanToken", "PooledHead", "PoolerChain", "Recipe",
           "Reference", "RelativeBiasLayer", "TokenPool", "TokenPositionStem", "build", "default_probe",
           "family_classifier", "split_hf", "text_forward"]
