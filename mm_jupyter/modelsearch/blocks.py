"""The block view of a candidate model (Alsatian, Section 4): a feature extractor as a chain of blocks.

Model search shares work between candidates through their common block prefixes, so a model must
be cut into an ordered list of blocks whose composition reproduces its feature output exactly. The
cut is chosen at *parameterised* steps: a parameter-free step (activation, pooling, flatten,
dropout) has no identity of its own and is merged into the block before it, so two candidates share
a block exactly when they share its parameters.

Methods, tried in this order: custom models that declare their blocks (``mm_blocks()`` or the
:class:`Blocks` wrapper); ``nn.Sequential``/``nn.ModuleList`` (expanded recursively); Hugging Face
models by one generic rule (``hf.py``); any other model by tracing its forward (``traced.py``).
With a probe batch, a split is proven before it is used (``verify.py``): a method whose composed
blocks do not reproduce the model's own features is never used.
"""
from __future__ import annotations

import hashlib
import json
import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeGuard

import torch
from torch import Tensor, nn

from ..errors import SearchError, a_type
from .identity import Scope

#: How a block is applied to the previous output ``h`` and the batch context ``ctx``:
#: ``plain``: ``module(h)``; ``hf-layer``: ``module(h, **inputs)``, first element if it returns a tuple;
#: ``hf-grid-layer``: ``module(h, (rows, cols))`` with the token grid of ``h`` (Swin), first element;
#: ``hf-last-token``: ``module(h)`` at each row's last (non-pad) position.
CALLS = ("plain", "hf-layer", "hf-grid-layer", "hf-last-token")


def _first(out: object) -> Tensor:
    """HF layers return a tensor in transformers 5 and a tuple ``(hidden, ...)`` in 4.x."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise SearchError(f"a block returned {type(out).__name__}, expected a tensor or a tuple starting with one")


@dataclass(frozen=True, eq=False)
class Block:
    """One step of a feature extractor; ``call`` says how it is applied and ``inputs`` which batch
    context entries it takes as keyword arguments (``"name"``, or ``"name=entry"`` when the entry is
    called differently); both are part of the block id."""

    module: nn.Module
    call: str = "plain"
    inputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.call not in CALLS:
            raise SearchError(f"unknown block call {self.call!r}; expected one of {', '.join(CALLS)}")
        if not isinstance(self.module, nn.Module):
            raise SearchError(f"a block must be an nn.Module, got {type(self.module).__name__}")
        if self.inputs and self.call != "hf-layer":
            raise SearchError(f"only hf-layer blocks take context inputs, not {self.call!r}")

    def __call__(self, h: Tensor, ctx: dict[str, Tensor]) -> Tensor:
        if self.call == "plain":
            y: Tensor = self.module(h)
            return y
        if self.call == "hf-layer":
            inputs = {name: context_value(ctx, entry) for name, entry in map(_entry, self.inputs)}
            return _first(self.module(h, **inputs))
        if self.call == "hf-grid-layer":
            return _first(self.module(h, _grid(ctx["grid"], h.shape[1])))
        out: Tensor = self.module(h)
        last = ctx.get("last_index")
        return out[:, -1] if last is None else out[torch.arange(out.shape[0], device=out.device), last]


def _entry(spec: str) -> tuple[str, str]:
    name, _, entry = spec.partition("=")
    return name, entry or name


def _constant(value: object) -> object:
    return tuple(_constant(v) for v in value) if isinstance(value, list) else value


def context_value(ctx: dict[str, Tensor], entry: str) -> object:
    """A context entry: a tensor, a tuple stored as ``entry.0``, ``entry.1``, … (rotary cos and
    sin), or None when the batch has none (no padding mask); ``#<json>`` is a constant (an int,
    a tuple of ints: an image's patch grid that the model passes its layers)."""
    if entry.startswith("#"):
        return _constant(json.loads(entry[1:]))
    if entry in ctx:
        return ctx[entry]
    parts: list[Tensor] = []
    while f"{entry}.{len(parts)}" in ctx:
        parts.append(ctx[f"{entry}.{len(parts)}"])
    return tuple(parts) if parts else None


def _grid(start: Tensor, tokens: int) -> tuple[int, int]:
    """The (rows, cols) token grid of a sequence of ``tokens``: the first grid, halved (rounding
    up, as patch merging pads odd sides) until it holds that many tokens."""
    rows, cols = (int(v) for v in start.tolist())
    while rows * cols > tokens and (rows, cols) != (1, 1):
        rows, cols = (rows + 1) // 2, (cols + 1) // 2
    if rows * cols != tokens:
        raise SearchError(f"a sequence of {tokens} tokens fits no token grid of the input image")
    return rows, cols


def _no_context(raw: Tensor) -> dict[str, Tensor]:
    """Most models need nothing but the previous block's output."""
    return {}


def _plain_forward(model: nn.Module, raw: Tensor) -> object:
    return model(raw)


@dataclass
class Split:
    """A model as feature-extractor blocks (the first receives the raw batch) plus its head.

    ``forward`` runs the model's own forward on a raw batch as the blocks see it (a text model with
    the padding mask), ``reduce`` picks the features from token-level outputs as the last block does
    (for the check against a head that reads every token), ``pooler`` is a parameterised pooler
    the model's classifier applies to these features (BERT; head material, not a feature block),
    and ``reference`` gives the features the model's family feeds its classifier, for a backbone
    without one (Hugging Face). ``verify.py`` uses them; ``recipe`` lets a verified split of one
    architecture be rebuilt for the next model without observing it again."""

    blocks: list[Block]
    head: nn.Module | None
    kind: str
    context: Callable[[Tensor], dict[str, Tensor]] = field(default=_no_context)
    forward: Callable[[nn.Module, Tensor], object] = field(default=_plain_forward, repr=False)
    reduce: Callable[[Tensor, dict[str, Tensor]], Tensor] | None = field(default=None, repr=False)
    pooler: nn.Module | None = field(default=None, repr=False)
    reference: Callable[[Tensor], Tensor | None] | None = field(default=None, repr=False)
    recipe: object = field(default=None, repr=False)
    architecture: str | None = field(default=None, repr=False)  # the verdict key (verify.py) when verified
    #: the model's ``identity.Scope`` when the split was rebuilt from a cached verdict without running any of
    #: the model's code (verify.py): block ids remember their plans in it (hashing.py)
    scope: Scope | None = field(default=None, repr=False)

    def modules(self) -> list[nn.Module]:
        """The block modules in order (what the engine moves, hashes and runs)."""
        return [b.module for b in self.blocks]

    def features(self, raw: Tensor) -> Tensor:
        """All blocks composed in eval mode without gradients; ``(N, D)`` features."""
        with torch.no_grad(), eval_mode(self.modules()):
            ctx = self.context(raw)
            h = raw
            for block in self.blocks:
                h = block(h, ctx)
        return h.reshape(h.shape[0], -1)


@contextmanager
def eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Dropout and batch norm must behave as at inference; the callers' training flags are restored."""
    saved = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for m, _ in saved:
            m.training = False
        yield
    finally:
        for m, flag in saved:
            m.training = flag


@contextmanager
def fresh_caches(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Containers of tensors that modules fill during a forward (LeViT's ``attention_bias_cache``)
    emptied for the body and put back afterwards: a trace or a check then computes what they hold
    from the parameters, and never leaves a symbolic value or a stale entry behind."""
    saved = []
    for root in modules:
        for m in root.modules():
            for key, value in list(vars(m).items()):
                if key.startswith("_"):  # nn.Module's own tables (parameters, buffers, hooks)
                    continue
                if isinstance(value, dict) and value and all(isinstance(v, Tensor) for v in value.values()):
                    saved.append((m, key, value))
                    setattr(m, key, {})
    try:
        yield
    finally:
        for m, key, value in saved:
            setattr(m, key, value)


def _failed(index: int | None, block: Block | None, exc: BaseException) -> str:
    where = "preparing the batch context" if block is None else f"block {index} ({type(block.module).__name__})"
    lines = str(exc).strip().splitlines()
    return f"{where} raised {type(exc).__name__}: {lines[0] if lines else ''}"


def block_failure(candidate: Hashable, index: int | None, block: Block | None, exc: BaseException) -> SearchError:
    """One line naming the candidate, the block and what went wrong inside it."""
    return SearchError(f"candidate {candidate!r}: {_failed(index, block, exc)}")


def output_sizes(split: Split, sample: Tensor, candidate: str | None = None) -> list[int]:
    """Bytes per item of each block's output, measured by a one-item forward pass (shape propagation),
    so the planner's cache accounting matches what the engine will hold. It is also the check that
    the data fits the model: a block that fails on the item is a SearchError naming it."""
    if sample.dim() == 0 or sample.shape[0] == 0:
        raise SearchError("output_sizes needs a sample batch with at least one item")
    one = sample[:1]
    who = f"candidate {candidate!r}" if candidate is not None else "the model"
    fits = f"cannot take the data (one item: shape {tuple(one.shape)}, {one.dtype})"
    sizes: list[int] = []
    with torch.no_grad(), eval_mode(split.modules()):
        try:
            ctx = split.context(one)
        except Exception as e:  # noqa: BLE001 - reported as the data not fitting
            raise SearchError(f"{who} {fits}: {_failed(None, None, e)}") from None
        h = one
        for i, block in enumerate(split.blocks):
            try:
                h = block(h, ctx)
            except Exception as e:  # noqa: BLE001 - reported as the data not fitting
                raise SearchError(f"{who} {fits}: {_failed(i, block, e)}") from None
            if not isinstance(h, Tensor) or h.dim() == 0 or h.shape[0] != 1:
                got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
                raise SearchError(f"{who}: block {i} ({type(block.module).__name__}) does not keep the batch "
                                  f"dimension (output {got} for one item)")
            sizes.append(h.numel() * h.element_size())
    return sizes


_SIZES: "OrderedDict[tuple[object, ...], list[int]]" = OrderedDict()
_MAX_SIZES = 4096


def cached_output_sizes(split: Split, ids: list[str], sample: Tensor, candidate: str | None = None) -> list[int]:
    """``output_sizes``, remembered per verified architecture (``split.architecture``: every
    module's class, attributes, buffers and parameter shapes), the blocks' ids (their structure and
    every tensor's bytes), the device and the item's dtype, shape and bytes: all that a block's
    output shape can depend on. An unverified split is measured every time."""
    if split.architecture is None:
        return output_sizes(split, sample, candidate)
    one = sample[:1]
    flat = one.detach().cpu().contiguous().reshape(-1)
    key = (split.architecture, tuple(ids), str(one.device), str(one.dtype), tuple(one.shape),
           hashlib.sha256(flat.view(torch.uint8).numpy().data).hexdigest())
    if key in _SIZES:
        _SIZES.move_to_end(key)
        return list(_SIZES[key])
    sizes = output_sizes(split, sample, candidate)
    _SIZES[key] = list(sizes)
    while len(_SIZES) > _MAX_SIZES:
        _SIZES.popitem(last=False)
    return sizes


def block_costs(split: Split, sample: Tensor) -> list[float]:
    """Per-item cost of each block, the cost model that distributed search balances workers by:
    the floating-point operations of a one-item forward (torch's ``FlopCounterMode``: matrix
    products and convolutions), at least the block's output elements, so that a lookup or
    element-wise block is not free. Counted, not timed: the same on every machine and run."""
    from torch.utils.flop_counter import FlopCounterMode

    one = sample[:1]
    costs: list[float] = []
    with torch.no_grad(), eval_mode(split.modules()):
        ctx = split.context(one)
        h = one
        for block in split.blocks:
            with FlopCounterMode(display=False) as counter:
                h = block(h, ctx)
            costs.append(float(max(counter.get_total_flops(), h.numel())))
    return costs


# --------------------------------------------------------------------------------------------
# Declared blocks


class Blocks(nn.Module):
    """Wrap custom feature-extractor steps so they can be searched: ``forward`` applies the blocks
    in order (each as ``block(h)``), then the head if there is one."""

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Module | None = None) -> None:
        super().__init__()
        blocks = list(blocks)
        if not blocks:
            raise SearchError("Blocks needs at least one block")
        for b in blocks:
            if not isinstance(b, nn.Module):
                raise SearchError(f"Blocks takes nn.Module blocks, got {type(b).__name__}")
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x) if self.head is not None else x

    def mm_blocks(self) -> tuple[list[nn.Module], nn.Module | None]:
        return list(self.blocks), self.head


def declared_split(model: nn.Module) -> Split:
    name = type(model).__name__
    declared = model.mm_blocks()  # type: ignore[operator]
    shape = f"{name}.mm_blocks() must return (list of nn.Module blocks, head nn.Module or None)"
    if not isinstance(declared, (tuple, list)) or len(declared) != 2:
        raise SearchError(f"{shape}, got {type(declared).__name__}")
    blocks, head = declared
    if not isinstance(blocks, (list, tuple, nn.ModuleList, nn.Sequential)):
        raise SearchError(f"{shape}; the blocks are {a_type(blocks)}")
    blocks = list(blocks)
    if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
        raise SearchError(f"{shape}; the block list is empty or holds something that is not an nn.Module")
    if head is not None and not isinstance(head, nn.Module):
        raise SearchError(f"{shape}; the head is {a_type(head)}")
    return Split([Block(b) for b in blocks], head, "declared")


# --------------------------------------------------------------------------------------------
# Sequential models


def has_state(module: nn.Module) -> bool:
    """Parameters or buffers: a step with an identity of its own."""
    return next(module.parameters(), None) is not None or next(module.buffers(), None) is not None


def _is_sequence(module: nn.Module) -> TypeGuard[nn.ModuleList | nn.Sequential]:
    """A Sequential whose forward is the plain chain (a subclass overriding forward is one step),
    or a ModuleList (only ever iterated in order when used as a model's body)."""
    if isinstance(module, nn.ModuleList):
        return True
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _steps(module: nn.Module) -> list[nn.Module]:
    if not _is_sequence(module):
        return [module]
    out: list[nn.Module] = []
    for child in module:
        out.extend(_steps(child))
    return out


def _group(modules: list[nn.Module]) -> nn.Module:
    # a lone module stays itself, so the same layer object has the same id anywhere
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


def sequential_split(model: nn.Module) -> Split:
    steps = _steps(model)
    if not steps:
        raise SearchError(f"cannot split {type(model).__name__} into blocks: it is empty")
    groups: list[list[nn.Module]] = []
    lead: list[nn.Module] = []
    for step in steps:
        if has_state(step):
            groups.append(lead + [step])
            lead = []
        elif groups:
            groups[-1].append(step)
        else:
            lead.append(step)
    if not groups:  # nothing parameterised at all: one block doing everything
        return Split([Block(_group(lead))], None, "sequential")
    head: nn.Module | None = None
    if len(groups) > 1 and isinstance(groups[-1][0], nn.Linear):
        # the last parameterised step is a Linear classifier (with any parameter-free steps after it)
        head = _group(groups.pop())
    return Split([Block(_group(g)) for g in groups], head, "sequential")


# --------------------------------------------------------------------------------------------
# Pieces the Hugging Face rule (hf.py) builds its feature step from


class ClsToken(nn.Module):
    """The first token of a sequence output (what ViT/DINOv2/BERT classifiers read)."""

    def forward(self, h: Tensor) -> Tensor:
        return h[:, 0]


# --------------------------------------------------------------------------------------------


def methods(model: nn.Module) -> list[str]:
    """The split methods that apply to ``model``, in the order they are tried."""
    if not isinstance(model, nn.Module):
        raise SearchError(f"cannot split {type(model).__name__} into blocks: not an nn.Module")
    if callable(getattr(model, "mm_blocks", None)):
        first = "declared"
    elif _is_sequence(model):
        first = "sequential"
    elif "transformers" in sys.modules and _is_hf(model):  # a transformers model implies the library is loaded
        first = "hf"
    else:
        return ["traced"]
    return [first, "traced"]


def _is_hf(model: nn.Module) -> bool:
    import transformers as tf

    return isinstance(model, tf.PreTrainedModel)


__all__ = [
    "CALLS", "Block", "Blocks", "ClsToken", "Split", "block_failure", "context_value", "eval_mode", "has_state",
    "methods", "output_sizes",
]
