"""The block view of a candidate model (Alsatian, Section 4): a feature extractor as a chain of blocks.

Model search shares work between candidates through their common block prefixes, so a model must
be cut into an ordered list of blocks whose composition reproduces its feature output exactly. The
cut is chosen at *parameterised* steps: a parameter-free step (activation, pooling, flatten,
dropout) has no identity of its own and is merged into the block before it, so two candidates share
a block exactly when they share its parameters.

Supported forms: ``nn.Sequential``/``nn.ModuleList`` (expanded recursively), the Hugging Face
ResNet, ViT, DINOv2 and BERT backbones (and their classification models), and custom models that
declare their blocks (``mm_blocks()`` or the :class:`Blocks` wrapper).
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import SearchError

#: How a block is applied to the previous output ``h`` and the batch context ``ctx``:
#: ``plain``: ``module(h)``; ``hf-layer``: ``module(h)``, first element if it returns a tuple;
#: ``hf-masked-layer``: ``module(h, ctx.get("attention_mask"))``, first element of a tuple.
CALLS = ("plain", "hf-layer", "hf-masked-layer")


def _first(out: object) -> Tensor:
    """HF layers return a tensor in transformers 5 and a tuple ``(hidden, ...)`` in 4.x."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise SearchError(f"a block returned {type(out).__name__}, expected a tensor or a tuple starting with one")


@dataclass(frozen=True, eq=False)
class Block:
    """One step of a feature extractor; ``call`` says how it is applied (it is part of the block id)."""

    module: nn.Module
    call: str = "plain"

    def __post_init__(self) -> None:
        if self.call not in CALLS:
            raise SearchError(f"unknown block call {self.call!r}; expected one of {', '.join(CALLS)}")
        if not isinstance(self.module, nn.Module):
            raise SearchError(f"a block must be an nn.Module, got {type(self.module).__name__}")

    def __call__(self, h: Tensor, ctx: dict[str, Tensor]) -> Tensor:
        if self.call == "plain":
            return self.module(h)
        if self.call == "hf-layer":
            return _first(self.module(h))
        return _first(self.module(h, ctx.get("attention_mask")))


def _no_context(raw: Tensor) -> dict[str, Tensor]:
    """Most models need nothing but the previous block's output."""
    return {}


@dataclass
class Split:
    """A model as feature-extractor blocks (the first receives the raw batch) plus its head."""

    blocks: list[Block]
    head: nn.Module | None
    kind: str
    context: Callable[[Tensor], dict[str, Tensor]] = field(default=_no_context)

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


def output_sizes(split: Split, sample: Tensor) -> list[int]:
    """Bytes per item of each block's output, measured by a one-item forward pass (shape propagation),
    so the planner's cache accounting matches what the engine will hold."""
    if sample.dim() == 0 or sample.shape[0] == 0:
        raise SearchError("output_sizes needs a sample batch with at least one item")
    one = sample[:1]
    sizes: list[int] = []
    with torch.no_grad(), eval_mode(split.modules()):
        ctx = split.context(one)
        h = one
        for block in split.blocks:
            h = block(h, ctx)
            if h.dim() == 0 or h.shape[0] != 1:
                raise SearchError(
                    f"block {len(sizes)} does not keep the batch dimension (output shape {tuple(h.shape)})"
                )
            sizes.append(h.numel() * h.element_size())
    return sizes


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


def _declared(model: nn.Module) -> Split:
    name = type(model).__name__
    declared = model.mm_blocks()  # type: ignore[operator]
    shape = f"{name}.mm_blocks() must return (list of nn.Module blocks, head nn.Module or None)"
    if not isinstance(declared, (tuple, list)) or len(declared) != 2:
        raise SearchError(f"{shape}, got {type(declared).__name__}")
    blocks, head = declared
    if not isinstance(blocks, (list, tuple, nn.ModuleList, nn.Sequential)):
        raise SearchError(f"{shape}; the blocks are a {type(blocks).__name__}")
    blocks = list(blocks)
    if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
        raise SearchError(f"{shape}; the block list is empty or holds something that is not an nn.Module")
    if head is not None and not isinstance(head, nn.Module):
        raise SearchError(f"{shape}; the head is a {type(head).__name__}")
    return Split([Block(b) for b in blocks], head, "declared")


# --------------------------------------------------------------------------------------------
# Sequential models


def _has_state(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None or next(module.buffers(), None) is not None


def _is_sequence(module: nn.Module) -> bool:
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


def _sequential(model: nn.Module) -> Split:
    steps = _steps(model)
    if not steps:
        raise SearchError(f"cannot split {type(model).__name__} into blocks: it is empty")
    groups: list[list[nn.Module]] = []
    lead: list[nn.Module] = []
    for step in steps:
        if _has_state(step):
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
# Hugging Face transformers


class ClsToken(nn.Module):
    """The first token of a sequence output (what ViT/DINOv2/BERT classifiers read)."""

    def forward(self, h: Tensor) -> Tensor:
        return h[:, 0]


class PooledClassifier(nn.Module):
    """BERT's classification head on CLS features: pooler dense + activation, dropout, classifier.
    It holds the model's own modules (no copies), so ``head(features)`` equals the model's logits."""

    def __init__(self, dense: nn.Module, activation: nn.Module, dropout: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.dense = dense
        self.activation = activation
        self.dropout = dropout
        self.classifier = classifier

    def forward(self, cls: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.activation(self.dense(cls))))


def _encoder_layers(backbone: nn.Module) -> list[nn.Module]:
    """Encoder layers live in ``encoder.layer`` (4.x, BERT, DINOv2) or ``layers`` (ViT in 5.x)."""
    layers = getattr(backbone, "layers", None)
    if layers is None:
        encoder = getattr(backbone, "encoder", None)
        layers = getattr(encoder, "layer", None)
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        raise SearchError(f"cannot split {type(backbone).__name__} into blocks: no encoder layer list found")
    return list(layers)


def _resnet(backbone: nn.Module, head: nn.Module | None) -> Split:
    blocks = [Block(backbone.embedder)]
    for stage in backbone.encoder.stages:
        blocks.extend(Block(layer) for layer in stage.layers)
    blocks.append(Block(nn.Sequential(backbone.pooler, nn.Flatten(1))))
    return Split(blocks, head, "hf-resnet")


def _vit_like(backbone: nn.Module, head: nn.Module | None, kind: str) -> Split:
    blocks = [Block(backbone.embeddings)]
    blocks.extend(Block(layer, "hf-layer") for layer in _encoder_layers(backbone))
    blocks.append(Block(nn.Sequential(backbone.layernorm, ClsToken())))
    return Split(blocks, head, kind)


class _BertContext:
    """Per-batch attention mask from the raw token ids, prepared exactly as the backbone prepares it."""

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone

    def __call__(self, raw: Tensor) -> dict[str, Tensor]:
        config = self.backbone.config
        pad = config.pad_token_id
        mask = (raw != pad).long() if pad is not None else torch.ones_like(raw)
        dtype = self.backbone.embeddings.word_embeddings.weight.dtype
        try:
            from transformers.masking_utils import create_bidirectional_mask
        except ImportError:  # transformers 4.x
            prepared = self.backbone.get_extended_attention_mask(mask, raw.shape)
        else:
            shape_only = torch.zeros((1, 1, 1), dtype=dtype, device=raw.device).expand(raw.shape[0], raw.shape[1], 1)
            prepared = create_bidirectional_mask(config=config, inputs_embeds=shape_only, attention_mask=mask)
        if prepared is None:  # no padding and an attention kernel that needs no mask
            return {}
        if not isinstance(prepared, Tensor):
            raise SearchError(f"unsupported attention implementation {config._attn_implementation!r} for BERT blocks")
        return {"attention_mask": prepared}


def _bert(backbone: nn.Module, head: nn.Module | None) -> Split:
    if getattr(backbone.config, "is_decoder", False):
        raise SearchError(f"cannot split {type(backbone).__name__} into blocks: decoder (causal) BERT is not supported")
    blocks = [Block(backbone.embeddings)]
    blocks.extend(Block(layer, "hf-masked-layer") for layer in _encoder_layers(backbone))
    blocks.append(Block(ClsToken()))
    return Split(blocks, head, "hf-bert", _BertContext(backbone))


def _huggingface(model: nn.Module) -> Split | None:
    """Split a supported transformers model (or a subclass); None when it is not one of them."""
    import transformers as tf

    if not isinstance(model, tf.PreTrainedModel):
        return None
    if isinstance(model, tf.ResNetForImageClassification):
        return _resnet(model.resnet, model.classifier)
    if isinstance(model, tf.ResNetModel):
        return _resnet(model, None)
    if isinstance(model, tf.ViTForImageClassification):
        return _vit_like(model.vit, model.classifier, "hf-vit")
    if isinstance(model, tf.ViTModel):
        return _vit_like(model, None, "hf-vit")
    if isinstance(model, tf.Dinov2Model):
        return _vit_like(model, None, "hf-dinov2")
    if isinstance(model, tf.BertForSequenceClassification):
        bert = model.bert
        if bert.pooler is None:
            raise SearchError(f"cannot split {type(model).__name__} into blocks: its BERT has no pooler")
        head = PooledClassifier(bert.pooler.dense, bert.pooler.activation, model.dropout, model.classifier)
        return _bert(bert, head)
    if isinstance(model, tf.BertModel):
        return _bert(model, None)
    return None


# --------------------------------------------------------------------------------------------


def split_model(model: nn.Module) -> Split:
    """The block view of ``model``; a SearchError naming the class when it has none."""
    if not isinstance(model, nn.Module):
        raise SearchError(f"cannot split {type(model).__name__} into blocks: not an nn.Module")
    if callable(getattr(model, "mm_blocks", None)):
        return _declared(model)
    if _is_sequence(model):
        return _sequential(model)
    if "transformers" in sys.modules:  # a transformers model implies the library is loaded: never import it here
        split = _huggingface(model)
        if split is not None:
            return split
    raise SearchError(
        f"cannot split {type(model).__name__} into blocks: it is neither an nn.Sequential, a supported Hugging Face "
        "model (ResNet, ViT, DINOv2, BERT) nor a model that declares its blocks; make it an nn.Sequential, give it "
        "mm_blocks(), or wrap it in mm_jupyter.search.Blocks"
    )


__all__ = [
    "CALLS", "Block", "Blocks", "ClsToken", "PooledClassifier", "Split", "eval_mode", "output_sizes", "split_model",
]
