"""A block split is proven, not assumed.

Before a split is used, its composed blocks run on a small probe batch and must reproduce the
model's *own* features, computed by the model's own forward:

* a split with a head: the input the model's forward feeds the head's first parameterised layer
  (a forward pre-hook captures it), against the input the head receives from the composed blocks;
* a Hugging Face model without one: what its family's classifier consumes (``Split.reference``,
  ``hf.py``), e.g. DINOv2's CLS token concatenated with the mean patch token;
* any other model: its output.

Every intermediate is checked too, where the model shows one: a block's output against the same
module's output in the model's forward, and against the input the model gives the next block's
module (the k-th call for a module run k times, as ALBERT's shared layers). The first mismatch names
the block where outputs diverge. Tolerance: ``|ours - ref| <= rtol * |ref| + atol`` elementwise, with
``rtol`` = 1e-4 for float32 (1e-7 float64, 1e-2 float16, 5e-2 bfloat16) and ``atol = rtol / 10 *
max(1, max |ref|)``: far below any real divergence (a skipped layer differs by O(1)), above the
reassociation noise of a different kernel order.

A method whose split fails is never used: the next method (traced) is tried, and when none holds, a
SearchError names the block where the first method's outputs diverge. Caches of tensors a forward
fills (LeViT's attention biases) are empty during the check, so model and blocks both compute them
from the (perturbed) parameters; they are put back afterwards.

**Verdicts are cached per architecture**, so a 500-candidate search pays the check once per
architecture. The key is everything the check's outcome can depend on except parameter values:
every module's class (a per-class-object token, so a redefined notebook class is new), its place in
the tree with shared modules and tied parameters by first occurrence, all of its attributes (scalars,
containers, enums, configs, functions by their code and closure, tensors by dtype and shape, and by
value where not floating), forward hooks, every parameter's and buffer's name, dtype and shape, the
values of buffers other than batch-norm running statistics (masks, rotary frequencies, position ids),
and the probe's bytes. A model with anything the key cannot describe (an object without a ``__dict__``,
a global hook) is verified on its own, never from the cache. Parameter values are not in the key
because the check runs with every parameter moved to general position (seeded noise, restored
bit-exactly afterwards): a split that is wrong for some weights of an architecture differs there
almost surely, so a zero-initialised branch or a degenerate trained weight cannot make a wrong split
pass for the first candidate and then be reused for the rest. Batch-norm statistics enter an
inference forward only as a per-channel affine map whose parameters are perturbed already.
"""
from __future__ import annotations

import copy
import enum
import functools
import hashlib
import itertools
import sys
import types
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from ..errors import ProbeMismatch as ProbeMismatch, SearchError
from .blocks import Block, Split, eval_mode, fresh_caches, methods
from .cuts import split_by
from .hf import default_probe, padded_probe
from .identity import (
    HOOK_DICTS as _HOOK_DICTS,
    SKIP_ATTRS as _SKIP_ATTRS,
    STATS as _STATS,
    IdentityCache,
    Scope,
    _Uncacheable,
    digest as _bytes,
)
from .probes import differs, first_tensor, hidden_argument

PROBE_ITEMS = 8
_KEY_VERSION = "mm-split-verdict/2"
_MAX_VERDICTS = 1024


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one architecture: the method (and recipe) whose split holds, or
    the SearchError message when none does."""

    method: str | None
    recipe: object = None
    error: str | None = None


_VERDICTS: OrderedDict[str, Verdict] = OrderedDict()
#: split methods that rebuild a split from a verdict without running the model's code (``mm_blocks``,
#: tracing, a forward): the model is then as the verdict key's walk found it
_NO_MODEL_CODE = frozenset({"hf", "sequential"})


def clear_verdicts() -> None:
    """Forget every cached verdict and remembered key (tests; a process that redefines split rules)."""
    _VERDICTS.clear()
    _STREAMS.clear()


# --------------------------------------------------------------------------------------------
# The cache key


_CLASS_TOKENS: "weakref.WeakKeyDictionary[type, int]" = weakref.WeakKeyDictionary()
_NEXT_TOKEN = itertools.count()
#: exact types (no subclasses) whose ``repr`` tells every two values apart, type included (1, 1.0,
#: True; 0.0, -0.0; strings quoted): tuples of them are described in one repr, not field by field
_PLAIN = frozenset({type(None), bool, int, float, str, bytes})


def _class_token(cls: type) -> str:
    if cls not in _CLASS_TOKENS:
        _CLASS_TOKENS[cls] = next(_NEXT_TOKEN)
    return f"{cls.__module__}:{cls.__qualname__}#{_CLASS_TOKENS[cls]}"


def _put(out: list[bytes], *parts: object) -> None:
    """Length-prefixed fields, so no two different field sequences give the same bytes."""
    for part in parts:
        raw = part if type(part) is bytes else str(part).encode()
        out.append(len(raw).to_bytes(8, "little"))
        out.append(raw)


class _Key:
    """sha256 over a model's structure (module docstring): everything but parameter values."""

    def __init__(self, model: nn.Module) -> None:
        self.out: list[bytes] = []  # length-prefixed fields, hashed once at the end (one C call, not thousands)
        self.modules = {id(m): i for i, m in enumerate(model.modules())}
        self.seen: dict[int, int] = {}  # objects already described, by id: described once, then referenced
        self.keep: list[object] = []  # keeps described objects alive, so their ids are not reused meanwhile

    def put(self, *parts: object) -> None:
        _put(self.out, *parts)

    def hexdigest(self) -> str:
        return hashlib.sha256(b"".join(self.out)).hexdigest()

    def value(self, v: Any, depth: int = 0) -> None:
        if depth > 8:
            raise _Uncacheable("nesting too deep")
        if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
            self.put(type(v).__name__, repr(v))
        elif isinstance(v, enum.Enum):
            self.put("enum", _class_token(type(v)), v.name)
        elif isinstance(v, (torch.dtype, torch.device, torch.Size, torch.layout, torch.memory_format)):
            self.put(type(v).__name__, str(v))
        elif isinstance(v, Tensor):
            self.put("tensor", v.dtype, tuple(v.shape), v.device.type)
            if not v.is_meta:
                self.put(_bytes(v))
        elif isinstance(v, nn.Module):
            if id(v) in self.modules:
                self.put("module", self.modules[id(v)])
            else:
                self._outside(v, depth)
        elif isinstance(v, type):
            self.put("class", _class_token(v))
        elif isinstance(v, types.ModuleType):
            self.put("python module", v.__name__)
        elif id(v) in self.seen:
            self.put("seen", self.seen[id(v)])
        else:
            self.seen[id(v)] = len(self.seen)
            self.keep.append(v)
            self._compound(v, depth)

    def _compound(self, v: Any, depth: int) -> None:
        if isinstance(v, (tuple, list)):
            self.put(type(v).__name__, len(v))
            for item in v:
                self.value(item, depth + 1)
        elif isinstance(v, (set, frozenset)):
            self.put(type(v).__name__, sorted(repr(item) for item in v))
        elif isinstance(v, dict):
            self.put("dict", _class_token(type(v)), len(v))
            for key, item in v.items():
                self.value(key, depth + 1)
                self.value(item, depth + 1)
        elif isinstance(v, (types.FunctionType, types.MethodType, functools.partial, weakref.ref)):
            self._callable(v, depth)
        elif isinstance(v, (types.BuiltinFunctionType, types.BuiltinMethodType)) or callable(v) and hasattr(
                v, "__qualname__") and not hasattr(v, "__dict__"):
            self.put("builtin", getattr(v, "__module__", ""), getattr(v, "__qualname__", repr(v)))
            if getattr(v, "__self__", None) is not None and not isinstance(v.__self__, types.ModuleType):
                self.value(v.__self__, depth + 1)
        elif hasattr(v, "__dict__"):
            self.put("object", _class_token(type(v)))
            self.value(dict(vars(v)), depth + 1)
        else:
            raise _Uncacheable(f"an attribute of type {type(v).__name__}")

    def _outside(self, m: nn.Module, depth: int) -> None:
        """A module held outside the model's tree (a kernel wrapper made per layer): by its class
        name and forward's code (such classes are often made per instance), attributes and tensors."""
        if id(m) in self.seen:
            self.put("seen", self.seen[id(m)])
            return
        self.seen[id(m)] = len(self.seen)
        self.keep.append(m)
        cls = type(m)
        self.put("outside", cls.__module__, cls.__qualname__)
        forward = getattr(cls, "forward", None)
        if isinstance(forward, types.FunctionType):
            self._callable(forward, depth + 1)
        self.value({k: v for k, v in vars(m).items() if k not in _SKIP_ATTRS}, depth + 1)
        for name, t in itertools.chain(m.named_parameters(), m.named_buffers()):
            self.put(name)
            self.value(t, depth + 1)
        for name, child in m.named_children():
            self.put(name)
            self._outside(child, depth + 1)

    def _callable(self, v: Any, depth: int) -> None:
        if isinstance(v, weakref.ref):
            self.put("weakref")
            self.value(v(), depth + 1)
        elif isinstance(v, functools.partial):
            self.put("partial")
            self.value((v.func, v.args, v.keywords), depth + 1)
        elif isinstance(v, types.MethodType):
            self.put("method")
            self.value(v.__func__, depth + 1)
            self.value(v.__self__, depth + 1)
        else:
            self.put("function", v.__module__, v.__qualname__)
            self._code(v.__code__)
            self.value((v.__defaults__, v.__kwdefaults__), depth + 1)
            self.value(tuple(c.cell_contents for c in v.__closure__ or ()), depth + 1)

    def _code(self, code: types.CodeType) -> None:
        self.put(code.co_code, code.co_names, code.co_varnames)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                self._code(c)
            else:
                self.put(repr(c))

    def model(self, model: nn.Module) -> None:
        for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_with_kwargs"):
            if getattr(torch_module, name, None):
                raise _Uncacheable("a global module hook")
        first: dict[int, int] = {}
        for pos, (name, m) in enumerate(model.named_modules(remove_duplicate=False)):
            self.put("node", name)
            if id(m) in first:
                self.put("same", first[id(m)])
                continue
            first[id(m)] = pos
            self.put(_class_token(type(m)))
            plain = []  # attributes of exact plain types, described by one repr (injective for them)
            for key, v in sorted(vars(m).items()):
                if key in _SKIP_ATTRS:
                    continue
                if type(v) in _PLAIN or (type(v) is tuple and all(type(i) in _PLAIN for i in v)):
                    plain.append((key, v))
                else:
                    self.put("attr", key)
                    self.value(v)
            self.put("plain", repr(plain))
            for hooks in _HOOK_DICTS:
                found = getattr(m, hooks, None)
                if found:
                    self.put(hooks)
                    self.value(list(found.values()))
            self.put("params", repr([(pname, None if p is None else (str(p.dtype), tuple(p.shape)))
                                     for pname, p in m._parameters.items()]))
            for bname, b in m._buffers.items():
                self.put("buffer", bname, "none" if b is None else f"{b.dtype}{tuple(b.shape)}")
                if b is not None and not (bname in _STATS and isinstance(m, nn.modules.batchnorm._NormBase)):
                    self.put(_bytes(b))
        ties: dict[int, str] = {}
        for pname, p in model.named_parameters(remove_duplicate=False):
            self.put("tie", pname, ties.setdefault(id(p), pname))


_STREAMS = IdentityCache[bytes](1024)


def _model_stream(model: nn.Module) -> tuple[bytes | None, Scope | None]:
    """``_Key.model``'s bytes for ``model``: remembered per model object (``identity.py``), with the
    entry's scope."""

    def describe() -> bytes | None:
        key = _Key(model)
        try:
            key.model(model)
        except (_Uncacheable, RecursionError, TypeError, ValueError, RuntimeError):
            return None
        return b"".join(key.out)

    return _STREAMS.lookup(model, (), describe)


def structure_key(model: nn.Module, probe: Tensor) -> str | None:
    """The verdict cache key of ``model`` on ``probe`` (module docstring), or None when the model
    holds something the key cannot describe."""
    return _key_and_scope(model, probe)[0]


def _key_and_scope(model: nn.Module, probe: Tensor) -> tuple[str | None, Scope | None]:
    data, scope = _model_stream(model)
    if data is None:
        return None, None
    head: list[bytes] = []
    _put(head, _KEY_VERSION, "probe", probe.dtype, tuple(probe.shape), _bytes(probe))
    return hashlib.sha256(b"".join(head) + data).hexdigest(), scope


# --------------------------------------------------------------------------------------------
# General position


@contextmanager
def general_position(model: nn.Module, seed: int = 0) -> Iterator[None]:
    """Every floating parameter of ``model`` moved by seeded Gaussian noise (std 0.05 * its RMS +
    0.01), and restored bit-exactly afterwards (also when the body raises)."""
    gen = torch.Generator().manual_seed(seed)
    saved: list[tuple[nn.Parameter, Tensor]] = []
    try:
        with torch.no_grad():
            for p in model.parameters():
                if not p.is_floating_point() or p.is_meta or p.numel() == 0:
                    continue
                saved.append((p, p.detach().clone()))
                scale = float(p.detach().float().pow(2).mean().sqrt()) * 0.05 + 0.01
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
                p.add_(noise.to(device=p.device, dtype=p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, original in saved:
                p.copy_(original)


# --------------------------------------------------------------------------------------------
# The check


def _head_leaf(head: nn.Module) -> nn.Module | None:
    """The first module of the head holding parameters of its own: the layer whose input is what
    the head consumes."""
    return next((m for m in head.modules() if next(m.parameters(recurse=False), None) is not None), None)


class _Recorder:
    """Forward hooks recording the hidden input and the first output of watched modules, per call."""

    def __init__(self) -> None:
        self.inputs: dict[int, list[Tensor | None]] = {}
        self.outputs: dict[int, list[Tensor | None]] = {}
        self.handles: list[Any] = []

    def watch(self, module: nn.Module) -> None:
        if id(module) in self.inputs:
            return
        ins: list[Tensor | None] = []
        outs: list[Tensor | None] = []
        self.inputs[id(module)] = ins
        self.outputs[id(module)] = outs
        self.handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs: ins.append(hidden_argument(args, kwargs)), with_kwargs=True))
        self.handles.append(module.register_forward_hook(lambda m, args, out: outs.append(first_tensor(out))))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _occurrences(keys: list[int]) -> tuple[list[int], dict[int, int]]:
    """For each key, how many times it came before; and how many times each key occurs."""
    counts: dict[int, int] = {}
    before = []
    for k in keys:
        before.append(counts.get(k, 0))
        counts[k] = before[-1] + 1
    return before, counts


def _name(i: int, block: Block) -> str:
    return f"block {i} ({type(block.module).__name__})"


def check_split(model: nn.Module, split: Split, probe: Tensor) -> str | None:
    """Why ``split`` does not reproduce ``model``'s own features on ``probe`` (module docstring),
    or None when it does. Runs in eval mode without gradients, with the caches of tensors a forward
    fills empty; the model is left as it was."""
    with fresh_caches([model] + split.modules() + ([split.head] if split.head is not None else [])):
        return _check(model, split, probe)


def _check(model: nn.Module, split: Split, probe: Tensor) -> str | None:
    ids = {id(m) for m in model.modules()}
    entries: list[nn.Module | None] = []
    for b in split.blocks:
        m = b.module
        if id(m) in ids:
            entries.append(m)
        elif type(m) is nn.Sequential and len(m) and id(m[0]) in ids:
            entries.append(m[0])  # a group of the model's own modules: its first one takes the block's input
        else:
            entries.append(None)
    leaf = _head_leaf(split.head) if split.head is not None else None
    if leaf is not None and id(leaf) not in ids:
        leaf = None
    rec = _Recorder()
    try:
        for i, b in enumerate(split.blocks):
            if id(b.module) in ids:
                rec.watch(b.module)
            if entries[i] is not None:
                rec.watch(entries[i])  # type: ignore[arg-type]
        if leaf is not None:
            rec.watch(leaf)
        with torch.no_grad(), eval_mode([model]):
            try:
                out = split.forward(model, probe)
            except Exception as e:  # noqa: BLE001 - the data does not fit the model itself
                raise ProbeMismatch(f"the model's own forward raised {type(e).__name__}: {_line(e)}",
                                    split) from None
        model_head_input = rec.inputs[id(leaf)] if leaf is not None else None
        model_inputs = {k: list(v) for k, v in rec.inputs.items()}
        model_outputs = {k: list(v) for k, v in rec.outputs.items()}
    finally:
        rec.close()
    outs: list[Tensor] = []
    with torch.no_grad(), eval_mode(split.modules() + ([split.head] if split.head is not None else [])):
        try:
            ctx = split.context(probe)
        except Exception as e:  # noqa: BLE001 - the user's model code, any type: this split is not proven
            return f"preparing the batch context raised {type(e).__name__}: {_line(e)}"
        h = probe
        for i, b in enumerate(split.blocks):
            try:
                h = b(h, ctx)
            except Exception as e:  # noqa: BLE001 - the user's model code, any type: this split is not proven
                return f"{_name(i, b)} raised {type(e).__name__}: {_line(e)}"
            outs.append(h)
    occurrence, seen = _occurrences([id(b.module) for b in split.blocks])
    entry_occurrence, entry_seen = _occurrences([id(e) for e in entries])
    for i, b in enumerate(split.blocks):
        own = model_outputs.get(id(b.module))
        if own is not None and len(own) == seen[id(b.module)] and own[occurrence[i]] is not None:
            why = differs(outs[i], own[occurrence[i]])  # type: ignore[arg-type]
            if why is not None:
                return f"{_name(i, b)} differs from the same module in the model's forward: {why}"
        nxt = entries[i + 1] if i + 1 < len(entries) else None
        if nxt is not None:
            fed = model_inputs.get(id(nxt))
            if fed is not None and len(fed) == entry_seen[id(nxt)] and fed[entry_occurrence[i + 1]] is not None:
                why = differs(outs[i], fed[entry_occurrence[i + 1]])  # type: ignore[arg-type]
                if why is not None:
                    return (f"{_name(i, b)} differs from what the model feeds {_name(i + 1, split.blocks[i + 1])}: "
                            f"{why}")
    last = _name(len(split.blocks) - 1, split.blocks[-1])
    why = _check_features(split, out, outs[-1], leaf, model_head_input, ctx, last, probe)
    if why is None:
        return None
    for i, b in enumerate(split.blocks):  # the likely cause: a module the blocks run more or less often
        runs = len(model_outputs.get(id(b.module), ()))
        if id(b.module) in model_outputs and runs != seen[id(b.module)]:
            return f"{why}; {_name(i, b)} runs {seen[id(b.module)]} time(s) in the blocks, {runs} in the model"
    return why


def _check_features(split: Split, out: Any, final: Tensor, leaf: nn.Module | None,
                    model_head_input: list[Tensor | None] | None, ctx: dict[str, Tensor], last: str,
                    probe: Tensor) -> str | None:
    """The last block's output (``final``; the search flattens it into features) against what the
    model's head consumes, or the model's own features."""
    n = final.shape[0]
    if split.head is not None:
        return _check_head(split, final, leaf, model_head_input, ctx, last)
    feats = final.reshape(n, -1)
    ref = split.reference(probe) if split.reference is not None else first_tensor(out)
    if ref is None:
        return (f"the model's forward returns {type(out).__name__}, not a tensor: there are no features to "
                "compare the blocks with")
    ours = feats
    if split.pooler is not None:
        with torch.no_grad():
            ours = split.pooler(feats)
    ref = _token_level(split, ref, ours, ctx)
    why = differs(ours.reshape(n, -1), ref.reshape(n, -1))
    return None if why is None else f"the features after {last} differ from the model's own: {why}"


def _token_level(split: Split, ref: Tensor, ours: Tensor, ctx: dict[str, Tensor]) -> Tensor:
    """A reference with a token axis more than the features (a head that reads every token, as a
    language-model head or a sequence classifier that picks the last token after its layer) is
    reduced as the split's last block reduces tokens."""
    if split.reduce is not None and ref.dim() == ours.dim() + 1:
        with torch.no_grad():
            return split.reduce(ref, ctx)
    return ref


def _check_head(split: Split, feats: Tensor, leaf: nn.Module | None, captured: list[Tensor | None] | None,
                ctx: dict[str, Tensor], last: str) -> str | None:
    assert split.head is not None
    if leaf is None:
        return "the head holds no parameterised layer of the model: what it consumes cannot be compared"
    if not captured:
        return f"the model's forward never applies the head's {type(leaf).__name__}"
    if len(captured) != 1 or captured[0] is None:
        return f"the model's forward applies the head's {type(leaf).__name__} {len(captured)} times"
    rec = _Recorder()
    try:
        rec.watch(leaf)
        with torch.no_grad(), eval_mode([split.head]):
            try:
                split.head(feats)
            except Exception as e:  # noqa: BLE001 - the user's model code, any type: this split is not proven
                return f"the head raised {type(e).__name__} on the features after {last}: {_line(e)}"
        ours = rec.inputs[id(leaf)]
    finally:
        rec.close()
    if len(ours) != 1 or ours[0] is None:
        return f"the head applies its {type(leaf).__name__} {len(ours)} times"
    ref = _token_level(split, captured[0], ours[0], ctx)
    why = differs(ours[0], ref)
    return None if why is None else (f"the features after {last} differ from what the model's head consumes: {why}")


def _line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


# --------------------------------------------------------------------------------------------


def probe_of(model: nn.Module, probe: Tensor | None) -> Tensor:
    """The probe batch: the first ``PROBE_ITEMS`` items given (for a Hugging Face text model with
    a pad token, plus a copy of the first row padded at its end, so the padding mask is always
    exercised), or one made from a Hugging Face model's config."""
    if probe is None:

        return default_probe(model)
    if probe.dim() == 0 or probe.shape[0] == 0:
        raise SearchError("a probe batch needs at least one item")
    probe = probe[:PROBE_ITEMS]
    if "transformers" in sys.modules and "hf" in methods(model)[:1]:

        probe = padded_probe(model, probe)
    return probe


def _built(model: nn.Module, verdict: Verdict, probe: Tensor, scope: Scope) -> Split:
    """The split ``verdict`` describes, remembered in the model's ``scope``: these methods build it
    from the model's modules and the recipe alone (no model code, no probe), so while the signature
    that keeps the scope holds, the same split (its wrapper modules too: their block ids are then
    remembered as well) serves again. The caller copies it (shallow) before marking it as its own."""
    at = ("split", verdict.method)
    kept = scope.memo.get(at)
    if kept is not None and kept[0] is verdict:
        return kept[1]  # type: ignore[no-any-return]
    assert verdict.method is not None
    split = split_by(model, verdict.method, probe, verdict.recipe)
    scope.memo[at] = (verdict, split)
    return split


def verified_split(model: nn.Module, probe: Tensor | None = None) -> Split:
    """The first split of ``model`` (``blocks.methods`` order) whose composed blocks reproduce the
    model's own features on ``probe`` (module docstring); a SearchError naming the block where the
    first method's outputs diverge when none does."""
    order = methods(model)
    probe = probe_of(model, probe)
    key, scope = _key_and_scope(model, probe)
    if key is not None and key in _VERDICTS:
        _VERDICTS.move_to_end(key)
        verdict = _VERDICTS[key]
        if verdict.error is not None:
            raise SearchError(verdict.error)
        assert verdict.method is not None
        if verdict.method in _NO_MODEL_CODE and scope is not None:  # the key's walk still describes the model
            cached = copy.copy(_built(model, verdict, probe, scope))
            cached.scope = scope
        else:
            cached = split_by(model, verdict.method, probe, verdict.recipe)
        cached.architecture = key
        return cached
    name = type(model).__name__
    reasons: list[str] = []
    found: Split | None = None
    method = None
    with general_position(model), eval_mode([model]):
        for method in order:
            try:
                split = split_by(model, method, probe)
                problem = check_split(model, split, probe)
            except ProbeMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - a method that breaks on this model is not proven
                why = str(e).split("; declare its blocks instead")[0] if isinstance(e, SearchError) else (
                    f"{type(e).__name__}: {_line(e)}")
                reasons.append(f"{method}: {why}")
                continue
            if problem is None:
                found = split
                break
            reasons.append(f"{method}: {problem}")
    if found is None:
        message = (f"cannot split {name} into blocks that reproduce its own features: " + "; ".join(reasons)
                   + "; declare its blocks instead: give it an mm_blocks() method returning (blocks, head), or "
                   "wrap its steps in mm_jupyter.modelsearch.Blocks")
        _remember(key, Verdict(None, None, message))
        raise SearchError(message)
    _remember(key, Verdict(method, found.recipe))
    found.architecture = key
    return found


def _remember(key: str | None, verdict: Verdict) -> None:
    if key is None:
        return
    _VERDICTS[key] = verdict
    while len(_VERDICTS) > _MAX_VERDICTS:
        _VERDICTS.popitem(last=False)


__all__ = ["PROBE_ITEMS", "ProbeMismatch", "Verdict", "check_split", "clear_verdicts", "general_position", "probe_of",
           "structure_key", "verified_split"]
