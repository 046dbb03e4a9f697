"""Blocks of an arbitrary model, found by tracing its ``forward`` (``torch.fx``).

A model that is neither an ``nn.Sequential``, a known Hugging Face family nor declares its blocks
is traced symbolically (no example input, so the split — and every block id — depends on the model
alone: ``add_candidates`` without data and a search with data cut a model the same way). The graph
is cut wherever exactly one value is live between two operations, that value is a tensor whose
batch axis is still axis 0 (the engine slices cached intermediates along axis 0), and no later
operation mutates it in place (a shared cached intermediate must never change). The pieces between
cuts become blocks; parameter-free pieces join the block before them, so a block is shared exactly
when its parameters are, as with Sequential models.

Submodules whose own ``forward`` cannot be traced (data-dependent control flow, shape arithmetic
with ``int()``) are kept whole: they run as they are, inside one block. Only a model whose own
``forward`` cannot be traced has no block view; the SearchError names the line that failed.

A piece that is a plain chain of module calls becomes that module (or an ``nn.Sequential`` of
them), exactly as the Sequential rule would build it; any other piece becomes an ``fx.GraphModule``
with canonical names (``m0``, ``t0``, ``v0`` …), so the same piece from any candidate, at any
position, generates the same code — which is what the block id hashes, next to the tensors.
"""
from __future__ import annotations

import inspect
import operator
import os
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
from torch import fx, nn

from ..errors import SearchError, a_type
from .blocks import eval_mode, fresh_caches

_TORCH_DIR = os.path.dirname(torch.__file__)
_MAX_OPAQUE = 64  # distinct submodule classes kept whole before giving up


class _Root(nn.Module):
    """The traced root: calls the model with one input, so its ``forward`` runs with its own
    defaults (also ``*args``/``**kwargs``) instead of symbolic placeholders for them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x)


class _Tracer(fx.Tracer):
    """fx's tracer, with submodule classes that failed to trace kept as leaves."""

    def __init__(self, opaque: frozenset[type]) -> None:
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in self.opaque or super().is_leaf_module(m, module_qualified_name)


def _where(exc: BaseException) -> str:
    """``file:line `code``` of the innermost frame outside torch: the user's line that failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    if not frames:
        return "inside torch.fx"
    f = frames[-1]
    code = f" `{f.line.strip()}`" if f.line else ""
    return f"{os.path.basename(f.filename)}:{f.lineno}{code}"


def trace(model: nn.Module) -> fx.GraphModule:
    """fx graph of ``model`` (traced in eval mode: blocks only ever run inference; caches of tensors
    the forward fills are empty while tracing, so the graph computes their content)."""

    name = type(model).__name__
    opaque: set[type] = set()
    root = _Root(model)
    with eval_mode([model]), fresh_caches([model]):
        while True:
            tracer = _Tracer(frozenset(opaque))
            try:
                graph = tracer.trace(root)
                break
            except Exception as e:  # noqa: BLE001 - any failure is reported as a SearchError
                stack = list(tracer.module_stack.values())
                culprit = stack[-1][1] if stack and stack[-1][0] != "model" else None
                if culprit is None or culprit in opaque or len(opaque) >= _MAX_OPAQUE:
                    reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    raise SearchError(
                        f"cannot split {name} into blocks: tracing {name}.forward failed at {_where(e)}: "
                        f"{type(e).__name__}: {reason}; declare its blocks instead: give {name} an "
                        "mm_blocks() method returning (blocks, head), or wrap its steps in "
                        "mm_jupyter.modelsearch.Blocks"
                    ) from None
                opaque.add(culprit)
    return fx.GraphModule(root, graph)


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own ``forward`` only: every non-container submodule is a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


_CHAINS: dict[tuple[Any, ...], tuple[str, ...] | None] = {}  # chain() by module structure: candidates repeat stages


def chain(module: nn.Module) -> list[nn.Module] | None:
    """The submodules ``module.forward`` calls one after another, each on the previous output
    (a stage that only chains its layers), or None when its forward does anything else.

    Tracing is remembered per class, submodule tree and scalar attributes, which is all a
    forward's call pattern can depend on besides data (a search splits many copies of one stage)."""
    plain = (bool, int, float, str, type(None))
    scalars = tuple(sorted((k, v) for k, v in vars(module).items() if not k.startswith("_") and k != "training" and (
        isinstance(v, plain) or (isinstance(v, tuple) and all(isinstance(e, plain) for e in v)))))
    key = (type(module), tuple((n, type(m)) for n, m in module.named_modules()), scalars)
    if key not in _CHAINS:
        if len(_CHAINS) >= 1024:
            _CHAINS.clear()
        found = _chain(module)
        _CHAINS[key] = None if found is None else tuple(found)
    names = _CHAINS[key]
    return None if names is None else [module.get_submodule(n) for n in names]


def _chain(module: nn.Module) -> list[str] | None:

    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not params or any(p.kind not in plain for p in params) or any(
            p.default is inspect.Parameter.empty for p in params[1:]):
        return None
    try:
        with eval_mode([module]):
            graph = _ChildrenAsLeaves().trace(module, concrete_args={p.name: p.default for p in params[1:]})
    except Exception:  # noqa: BLE001 - not traceable, so not a plain chain
        return None
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    prev = next(n for n in graph.nodes if n.op == "placeholder")
    for n in nodes:
        if n.op != "call_module" or n.args != (prev,) or n.kwargs:
            return None
        prev = n
    out = next(n for n in graph.nodes if n.op == "output")
    if not nodes or out.args[0] is not prev:
        return None
    return [str(n.target) for n in nodes]


# --------------------------------------------------------------------------------------------
# Where the batch axis is (static, conservative: unknown is None and forbids a cut)


class _Each(tuple[Any, ...]):
    """A tuple value whose every element has the batch axis at the same position."""


Axis = Union[int, None, str, tuple[Any, ...]]
_NT = "non-tensor"  # sizes, shapes, dtypes: values derived from the input that are not tensors

_NON_TENSOR = {"size", "dim", "numel", "nelement", "element_size", "tolist", "item", "stride", "data_ptr",
               "is_contiguous", "len", "is_floating_point", "is_complex"}
_NON_TENSOR_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}
_REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "prod", "std", "var", "norm", "logsumexp", "argmax",
           "argmin", "all", "any", "median", "nansum", "nanmean", "count_nonzero", "aminmax", "mode", "std_mean",
           "var_mean"}
_ALONG_DIM = {"softmax", "log_softmax", "softmin", "cumsum", "cumprod", "cummax", "cummin", "sort", "argsort",
              "flip", "roll", "narrow", "select", "index_select", "gather", "unbind", "split", "chunk",
              "tensor_split", "diff", "kthvalue", "topk", "glu", "normalize", "scatter", "scatter_add",
              "index_add", "take_along_dim", "logcumsumexp", "renorm"}
_DEFAULT_DIM = {"cat": 0, "concat": 0, "concatenate": 0, "stack": 0, "unbind": 0, "chunk": 0, "split": 0,
                "tensor_split": 0, "topk": -1, "sort": -1, "argsort": -1, "diff": -1, "glu": -1, "normalize": 1}
_VIEWS = {"view", "reshape", "transpose", "permute", "t", "getitem", "flatten", "unflatten", "squeeze", "unsqueeze",
          "expand", "expand_as", "view_as", "narrow", "select", "split", "chunk", "unbind", "contiguous", "detach",
          "swapaxes", "swapdims", "movedim", "moveaxis", "as_strided", "diagonal", "unfold", "real", "imag",
          "tensor_split", "getattr", "type_as", "to", "float", "double", "half", "bfloat16"}
_INPLACE_OPS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor", "ilshift",
                "irshift", "imatmul", "setitem"}


def _name(n: fx.Node) -> str:
    if n.op == "call_method":
        return str(n.target)
    return getattr(n.target, "__name__", "") if n.op == "call_function" else ""


def _nodes_in(value: Any) -> Iterable[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(value, out.append)
    return out


def _dim_arg(n: fx.Node, index: int, default: Any = None) -> Any:
    for key in ("dim", "dims", "axis", "start_dim"):
        if key in n.kwargs:
            return n.kwargs[key]
    return n.args[index] if len(n.args) > index else default


def _keeps_zero(dims: Any) -> bool:
    """Whether an op along ``dims`` leaves axis 0 alone (negative dims count from the end, and a
    batched tensor has at least two axes, so they never mean axis 0 here)."""
    if isinstance(dims, int) and not isinstance(dims, bool):
        return dims != 0
    if isinstance(dims, (tuple, list)) and dims:
        return all(isinstance(d, int) and d != 0 for d in dims)
    return False


class _Axes:
    """Batch-axis position of every input-dependent node (``None``: unknown)."""

    def __init__(self, gm: fx.GraphModule, dependent: set[fx.Node]) -> None:
        self.gm = gm
        self.dependent = dependent
        self.axis: dict[fx.Node, Axis] = {}

    def of(self, value: Any) -> Axis:
        return self.axis.get(value) if isinstance(value, fx.Node) and value in self.dependent else _NT

    def _batch_size(self, value: Any) -> bool:
        """``x.size(0)``, ``x.shape[0]`` or ``x.size()[0]`` of a tensor with its batch axis at 0."""
        if not isinstance(value, fx.Node):
            return False
        if value.op == "call_method" and value.target == "size" and value.args[1:] == (0,):
            return self.of(value.args[0]) == 0
        if _name(value) == "getitem" and value.args[1] == 0 and isinstance(value.args[0], fx.Node):
            src = value.args[0]
            if (src.op == "call_method" and src.target == "size" and len(src.args) == 1) or (
                    _name(src) == "getattr" and src.args[1] == "shape"):
                return self.of(src.args[0]) == 0
        return False

    def _common(self, n: fx.Node) -> Axis:
        """Elementwise-like ops: the batch axis all input-dependent tensor arguments agree on."""
        found: set[Any] = set()
        for a in _nodes_in((n.args, n.kwargs)):
            ax = self.of(a)
            if a in self.dependent and ax != _NT:
                found.add(ax if isinstance(ax, int) else None)
        return found.pop() if len(found) == 1 else None

    def compute(self, n: fx.Node) -> Axis:
        if n.op == "placeholder":
            return 0
        inputs = [self.of(a) for a in _nodes_in((n.args, n.kwargs)) if a in self.dependent]
        if inputs and all(ax == _NT for ax in inputs):  # depends on the input through sizes only
            return self._unbatched(n)
        if n.op == "call_module":
            return self._module(n, self.gm.get_submodule(str(n.target)))
        if n.op not in ("call_function", "call_method"):
            return None
        return self._function(n, _name(n))

    def _unbatched(self, n: fx.Node) -> Axis:
        """A node whose only input dependence is through sizes (``pos[:, :x.size(1)]``) holds no
        batch axis, unless it makes one of the batch size (``cls.expand(x.shape[0], -1, -1)``)."""
        name = _name(n)
        if name in ("expand", "zeros", "ones", "empty", "full"):
            sizes: Sequence[Any] = n.args[1:] if name == "expand" else n.args
            sizes = sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes
            return 0 if sizes and self._batch_size(sizes[0]) else _NT
        return _NT

    def _module(self, n: fx.Node, mod: nn.Module) -> Axis:
        a = self.of(n.args[0]) if n.args else None
        if isinstance(mod, nn.RNNBase):
            first = 0 if mod.batch_first else 1
            hidden = 1 if a == first else None
            return (a, (hidden, hidden)) if isinstance(mod, nn.LSTM) else (a, hidden)
        if isinstance(mod, nn.MultiheadAttention):
            return (a, 0 if a == (0 if mod.batch_first else 1) else None)
        if not isinstance(a, int):
            return None
        if isinstance(mod, nn.Flatten):
            return a if (mod.start_dim > a or mod.start_dim < 0) else None
        if isinstance(mod, nn.Unflatten):
            return a if (mod.dim > a or mod.dim < 0) else None
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
            return a if mod.dim is not None and mod.dim != a else None
        if n.users and all(_name(u) == "getitem" and isinstance(u.args[1], int) for u in n.users):
            return _Each((a,))  # a module returning a tuple (read only by indexing)
        return self._common(n) if len(n.args) > 1 or n.kwargs else a

    def _function(self, n: fx.Node, name: str) -> Axis:
        args = n.args
        a = self.of(args[0]) if args else None
        if name == "getitem":
            return self._getitem(a, args[1])
        if name == "getattr":
            attr = args[1]
            if attr in _NON_TENSOR_ATTRS:
                return _NT
            if attr == "T":
                return 1 - a if a in (0, 1) else None
            return a if attr in ("data", "mT", "real", "imag") and a == 0 else None
        if name in _NON_TENSOR:
            return _NT
        if name == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            return list(dims).index(a) if isinstance(a, int) and a in dims else None
        if name in ("transpose", "swapaxes", "swapdims"):
            d0, d1 = (args[1], args[2]) if len(args) > 2 else (n.kwargs.get("dim0"), n.kwargs.get("dim1"))
            if not isinstance(a, int) or not isinstance(d0, int) or not isinstance(d1, int):
                return None
            if a == d0:
                return d1 if d1 >= 0 else None
            if a == d1:
                return d0 if d0 >= 0 else None
            return a
        if name == "t":
            return 1 - a if a in (0, 1) else None
        if name in ("movedim", "moveaxis"):
            src, dst = (args[1], args[2]) if len(args) > 2 else (None, None)
            if a == src and isinstance(dst, int) and dst >= 0:
                return dst
            return a if a == 0 and _keeps_zero(src) and _keeps_zero(dst) else None
        if name in ("view", "reshape", "expand"):
            sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            first = sizes[0] if sizes else None
            return 0 if a == 0 and (first == -1 or self._batch_size(first)) else None
        if name in ("repeat", "tile"):
            sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            return 0 if a == 0 and sizes and sizes[0] == 1 else None
        if name in ("expand_as", "view_as", "type_as", "reshape_as"):
            return self.of(args[1]) if a == 0 else None
        if name == "flatten":
            start = _dim_arg(n, 1, 0)
            return 0 if a == 0 and _keeps_zero(start) else None
        if name in ("unflatten", "squeeze", "unsqueeze"):
            dim = _dim_arg(n, 1)
            if name == "unsqueeze" and dim == 0 and isinstance(a, int):
                return a + 1
            return 0 if a == 0 and _keeps_zero(dim) else None
        if name in ("cat", "concat", "concatenate", "stack"):
            tensors = args[0] if args else n.kwargs.get("tensors", ())
            if not isinstance(tensors, (tuple, list)):  # a list built at run time: unknown
                return None
            axes = {self.of(t) for t in tensors if isinstance(t, fx.Node) and t in self.dependent}
            dim = _dim_arg(n, 1, 0)
            return 0 if axes == {0} and _keeps_zero(dim) else None
        if name in ("max", "min") and len(args) > 1 and isinstance(args[1], fx.Node):
            return self._common(n)  # elementwise maximum/minimum of two tensors
        if name in _REDUCE or name in _ALONG_DIM:
            dims = _dim_arg(n, 2 if name == "topk" else 1, _DEFAULT_DIM.get(name))
            if a != 0 or not _keeps_zero(dims):
                return None
            return _Each((0,)) if name in ("unbind", "split", "chunk", "tensor_split") else 0
        if name in ("einsum", "tensordot", "where", "nonzero", "masked_select", "take", "bincount", "unique"):
            return None
        return self._common(n)

    @staticmethod
    def _getitem(a: Axis, index: Any) -> Axis:
        if isinstance(a, _Each):
            return a[0] if isinstance(index, int) else None
        if isinstance(a, tuple):
            return a[index] if isinstance(index, int) and -len(a) <= index < len(a) else None
        if not isinstance(a, int):
            return None
        items = index if isinstance(index, tuple) else (index,)
        at = 0  # input axis the next index item applies to
        out = a
        for item in items:
            if item is Ellipsis:
                return out if at > a or a == 0 else None
            if item is None:
                out += 1 if at <= a else 0
                continue
            if at == a:
                return out if isinstance(item, slice) and item == slice(None) else None
            if isinstance(item, int) and not isinstance(item, bool):
                out -= 1
            elif not isinstance(item, slice):
                return None
            at += 1
        return out


# --------------------------------------------------------------------------------------------
# Cutting


def _inplace(n: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``n`` mutates its first argument."""
    if n.op == "call_module":
        return bool(getattr(gm.get_submodule(str(n.target)), "inplace", False))
    name = _name(n)
    if n.op == "call_method":
        return name.endswith("_") and not name.startswith("_")
    if n.op != "call_function":
        return False
    if name in _INPLACE_OPS or (name.endswith("_") and not name.startswith("_")):
        return True
    if n.kwargs.get("inplace") is True:
        return True
    if callable(n.target) and getattr(n.target, "__module__", "") == "torch.nn.functional":
        try:
            bound = inspect.signature(n.target).bind(*n.args, **n.kwargs)
        except (TypeError, ValueError):
            return False
        return bound.arguments.get("inplace") is True
    return False


def _base(n: Any) -> Any:
    """The value a view-like chain ending in ``n`` aliases."""
    while isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and _name(n) in _VIEWS and n.args:
        n = n.args[0]
    return n


@dataclass
class Piece:
    """Nodes ``order[start:stop]``, fed by ``source`` and producing ``result``."""

    start: int
    stop: int
    source: fx.Node
    result: fx.Node
    stateful: bool = False


class TracedGraph:
    """A traced model's graph, its cut points and pieces."""

    def __init__(self, gm: fx.GraphModule, name: str) -> None:
        self.gm = gm
        nodes = list(gm.graph.nodes)
        self.input = next(n for n in nodes if n.op == "placeholder")
        out = next(n for n in nodes if n.op == "output")
        result = out.args[0]
        if not isinstance(result, fx.Node):
            raise SearchError(f"cannot split {name} into blocks: its forward returns {a_type(result)}, "
                              "not one tensor")
        self.output = result
        dependent = {self.input}
        for n in nodes:
            if n.op != "placeholder" and any(a in dependent for a in _nodes_in((n.args, n.kwargs))):
                dependent.add(n)
        self.dependent = dependent
        self.order = [n for n in nodes if n in dependent and n.op not in ("placeholder", "output")]
        self.pos = {n: i for i, n in enumerate(self.order)}
        self.pos[self.input] = -1
        axes = _Axes(gm, dependent)
        for n in [self.input] + self.order:
            axes.axis[n] = axes.compute(n)
        if result not in dependent:
            raise SearchError(f"cannot split {name} into blocks: its output does not depend on its input")
        final = axes.axis.get(result)
        if isinstance(final, tuple) or final == _NT or (isinstance(final, int) and final != 0):
            raise SearchError(f"cannot split {name} into blocks: its forward does not return one tensor with the "
                              "batch as its first axis")
        self.axes = axes.axis
        self.cuts = self._cuts(out)

    def _cuts(self, out: fx.Node) -> dict[int, fx.Node]:
        """Position -> the one value crossing a cut before ``order[position]``."""
        m = len(self.order)
        last = {}
        for n in [self.input] + self.order:
            uses = [m if u is out else self.pos[u] for u in n.users if u in self.pos or u is out]
            last[n] = max(uses, default=self.pos[n])
        mutated: dict[Any, int] = {}
        for n in self.order:
            if n.args and _inplace(n, self.gm):
                base = _base(n.args[0])
                mutated[base] = max(mutated.get(base, -1), self.pos[n])
        starts: dict[int, list[fx.Node]] = {}
        for n in last:
            starts.setdefault(self.pos[n] + 1, []).append(n)
        live: set[fx.Node] = set()
        cuts: dict[int, fx.Node] = {}
        for c in range(m):
            live.update(starts.get(c, ()))
            live = {v for v in live if last[v] >= c}
            if c == 0 or len(live) != 1:
                continue
            (v,) = live
            if self.axes.get(v) == 0 and mutated.get(v, -1) < c:
                cuts[c] = v
        return cuts

    def _stateful(self, nodes: list[fx.Node]) -> bool:
        for n in self._with_free(nodes):
            if n.op == "get_attr":
                return True
            if n.op == "call_module":
                mod = self.gm.get_submodule(str(n.target))
                if next(mod.parameters(), None) is not None or next(mod.buffers(), None) is not None:
                    return True
        return False

    def _with_free(self, nodes: list[fx.Node]) -> list[fx.Node]:
        """``nodes`` plus the input-independent nodes they need (recomputed in every piece that
        uses them: parameters, constants, ``torch.arange(...)``), in graph order."""
        need: set[fx.Node] = set()
        todo = [a for n in nodes for a in _nodes_in((n.args, n.kwargs)) if a not in self.dependent]
        while todo:
            a = todo.pop()
            if a not in need:
                need.add(a)
                todo += [b for b in _nodes_in((a.args, a.kwargs)) if b not in self.dependent]
        chosen = need | set(nodes)
        return [n for n in self.gm.graph.nodes if n in chosen]

    def pieces(self) -> list[Piece]:
        """Pieces between cuts, parameter-free ones merged into the stateful piece before them
        (leading ones into the first)."""
        bounds = [0, *sorted(self.cuts), len(self.order)]
        raw = []
        for lo, hi in zip(bounds, bounds[1:]):
            src = self.input if lo == 0 else self.cuts[lo]
            res = self.output if hi == len(self.order) else self.cuts[hi]
            raw.append(Piece(lo, hi, src, res, self._stateful(self.order[lo:hi])))
        if not raw:  # the model returns its input unchanged
            return [Piece(0, 0, self.input, self.output)]
        merged: list[Piece] = []
        lead: Piece | None = None
        for p in raw:
            if p.stateful:
                if lead is not None:
                    p = Piece(lead.start, p.stop, lead.source, p.result, True)
                    lead = None
                merged.append(p)
            elif merged:
                last = merged[-1]
                merged[-1] = Piece(last.start, p.stop, last.source, p.result, True)
            else:
                lead = p if lead is None else Piece(lead.start, p.stop, lead.source, p.result)
        if lead is not None:  # nothing stateful at all: one block doing everything
            merged.append(lead)
        return merged

    def linear_head(self, piece: Piece) -> bool:
        """A piece whose only state is one ``nn.Linear`` it applies first: a classifier head."""
        nodes = self.order[piece.start:piece.stop]
        stateful = [n for n in self._with_free(nodes) if n.op == "get_attr" or (
            n.op == "call_module" and self._stateful([n]))]
        return (len(stateful) == 1 and stateful[0] is nodes[0] and stateful[0].op == "call_module"
                and isinstance(self.gm.get_submodule(str(stateful[0].target)), nn.Linear))

    def module(self, piece: Piece) -> nn.Module:
        """The piece as a module: the called module itself, an ``nn.Sequential`` of a plain chain
        of module calls, or an ``fx.GraphModule`` with canonical names."""
        nodes = self.order[piece.start:piece.stop]
        chain = all(n.op == "call_module" and not n.kwargs and n.args == ((nodes[i - 1] if i else piece.source),)
                    for i, n in enumerate(nodes))
        if chain and nodes and nodes[-1] is piece.result:
            mods = [self.gm.get_submodule(str(n.target)) for n in nodes]
            return mods[0] if len(mods) == 1 else nn.Sequential(*mods)
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {piece.source: graph.placeholder("x")}
        attrs: dict[str, Any] = {}
        names: dict[tuple[str, str], str] = {}

        def canonical(op: str, target: str) -> str:
            key = (op, target)
            if key not in names:
                prefix = "m" if op == "call_module" else "t"
                names[key] = f"{prefix}{sum(1 for k in names if k[0] == op)}"
                attrs[names[key]] = operator.attrgetter(target)(self.gm)
            return names[key]

        for i, n in enumerate(self._with_free(nodes)):
            if n is piece.source:
                continue
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
            target = canonical(n.op, str(n.target)) if n.op in ("call_module", "get_attr") else n.target
            env[n] = graph.create_node(n.op, target, args, kwargs, name=f"v{i}")
        graph.output(env[piece.result])
        return fx.GraphModule(attrs, graph, class_name="TracedBlock")


def traced_blocks(model: nn.Module) -> tuple[list[nn.Module], nn.Module | None]:
    """Block modules and head of ``model`` by tracing (see the module docstring)."""
    g = TracedGraph(trace(model), type(model).__name__)
    pieces = g.pieces()
    head = None
    if len(pieces) > 1 and pieces[-1].stateful and g.linear_head(pieces[-1]):
        head = g.module(pieces.pop())
    return [g.module(p) for p in pieces], head


__all__ = ["Piece", "TracedGraph", "chain", "trace", "traced_blocks"]
