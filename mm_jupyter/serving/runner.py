"""Answering requests with one version of a stored set, three ways.

* ``none``  — one request at a time, each through its own module (``ms[i]``; built modules are kept in a
  bounded LRU, ``max_modules=0`` builds every request's module anew, as a naive per-request server would);
* ``model`` — per-model batching: the batch's requests are grouped by model, one module call per group;
* ``multi`` — multi-model batching: one call for the whole batch. Each row's parameters are gathered
  from the set's stacked tensors (``ModelSet.stacked``: zero-copy for baseline sets) with one
  ``index_select`` per key. A ``Sequential`` of ``Linear`` layers and element-wise activations (the
  battery FFNNs) then runs as one ``baddbmm`` per layer over all rows; any other architecture runs
  through ``torch.func.vmap`` of ``functional_call`` on one template module. Either way requests for
  thousands of different models cost one batched call per layer, not one module call per model.
  (The ``baddbmm`` chain exists because vmap's Python dispatch costs ~1 ms per call and holds the
  GIL that request threads need; for the FFNN it is several times faster than vmap.)

Equality: the batched call runs the same operations as ``ms[i](x)`` but through batched kernels
(``bmm`` instead of ``addmm``), whose summation order may differ, so answers agree with calling each
model alone to float rounding, not bit for bit: ``torch.allclose(batched, ms[i](x), rtol=RTOL, atol=ATOL)``
for float32 models (tested on FFNN-48; observed differences are ~1e-8).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..errors import ServeError
from ..store.structure import is_attribute_state
from .errors import BadInputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..store.modelset import ModelSet

#: Tolerance of multi-model (and per-model) batched answers against ``ms[i](x)`` for float32 models.
RTOL, ATOL = 1e-5, 1e-6


def infer_input_shape(module: "nn.Module") -> tuple[int, ...]:
    """The input shape of one item, when the first layer with parameters is an ``nn.Linear``."""
    from torch import nn

    for sub in module.modules():
        if next(sub.parameters(recurse=False), None) is None:
            continue
        if isinstance(sub, nn.Linear):
            return (sub.in_features,)
        break
    raise ServeError(f"cannot tell the input shape of {type(module).__name__} models (the first layer is not "
                     "nn.Linear): pass input_shape=(...) for one item, e.g. (3, 32, 32)")


class Runner:
    """One version of a set, ready to answer: its names, input shape, modules and stacked tensors."""

    def __init__(self, ms: "ModelSet", max_modules: int = 1024,
                 input_shape: Sequence[int] | None = None) -> None:
        import torch

        self.ms = ms
        self.ref = ms.ref
        self.names = ms.names
        self.index = {name: i for i, name in enumerate(self.names)}
        self.max_modules = max_modules
        self._modules: OrderedDict[int, "nn.Module"] = OrderedDict()
        self._lock = threading.Lock()
        self.template = ms[0]  # built from the store like every ms[i]; its tensors are swapped per call
        self.input_shape = tuple(int(d) for d in input_shape) if input_shape is not None \
            else infer_input_shape(self.template)
        floats = [p.dtype for p in self.template.parameters() if p.is_floating_point()]
        self.dtype = floats[0] if floats else torch.get_default_dtype()
        #: the dtype requests travel in: the models' own where numpy has it (bfloat16: float32)
        self.np_dtype = {torch.float16: np.float16, torch.float64: np.float64}.get(self.dtype, np.float32)
        #: tensor dtypes whose ``.numpy()`` is a plain view (real numbers numpy has)
        self._numpy_dtypes = frozenset((torch.float32, torch.float64, torch.float16, torch.uint8, torch.int8,
                                        torch.int16, torch.int32, torch.int64))
        self._stacked: dict[str, "torch.Tensor"] | None = None
        self._vmapped: Callable[..., "torch.Tensor"] | None = None
        self.layers: list[Any] | None = None  # the baddbmm chain (see linear_chain), None: vmap
        self._plan: list[Any] = []  # the chain's steps: offsets of a layer's weight and bias in a row, or an activation
        self._rows: "torch.Tensor | None" = None  # (models, parameters of the chain): see _plan_rows
        self.rows_shared = False  # whether _rows is a view of the stored buffer (else a copy)
        self._buffers = threading.local()  # per thread: the gather buffer of run_multi (see _gathered)
        self.multi_error: str | None = None  # why multi-model batching fell back to per-model calls
        self.wait_ms = 0.0  # the server's automatic hold for this version (see server.auto_wait_ms)

    # -- inputs --------------------------------------------------------------------------------------
    def as_input(self, x: Any, max_rows: int) -> tuple[np.ndarray, bool]:
        """``x`` as a private C-contiguous ``(rows, *input_shape)`` numpy array, and whether it was
        one item. Non-numeric or misshapen input raises BadInputError (non-finite values are found
        per batch, see ``nonfinite``). Requests travel as numpy arrays because numpy's per-call cost
        on tiny arrays is a fraction of torch's; a batch becomes one tensor."""
        import torch

        if isinstance(x, torch.Tensor):
            if x.is_cpu and not x.requires_grad and x.dtype in self._numpy_dtypes:
                arr = x.numpy()  # the common case, without the checks and copies below
            else:
                if x.dtype == torch.bool or x.is_complex() or not (x.is_floating_point() or _is_int(x.dtype)):
                    raise BadInputError(f"input must be real numbers, not a {x.dtype} tensor")
                arr = (x if x.dtype != torch.bfloat16 else x.float()).detach().cpu().numpy()
        else:
            try:
                arr = np.asarray(x)
            except (ValueError, TypeError) as e:
                raise BadInputError(f"input is not a numeric array: {e}") from None
            if arr.dtype.kind not in "iuf":
                found = {"O": "nested lists of different lengths or non-numbers", "U": "text", "S": "text",
                         "b": "true/false values"}.get(arr.dtype.kind, f"{arr.dtype.name} values")
                raise BadInputError(f"input must be an array of numbers, not {found}")
        arr = np.array(arr, dtype=self.np_dtype, copy=True, order="C")
        shape, item = arr.shape, self.input_shape
        if shape == item:
            return arr[None], True
        if len(shape) == len(item) + 1 and shape[1:] == item and 1 <= shape[0] <= max_rows:
            return arr, False
        if len(shape) == len(item) + 1 and shape[1:] == item and shape[0] > max_rows:
            raise BadInputError(f"input has {shape[0]} rows; at most {max_rows} per request")
        raise BadInputError(f"input has shape {list(shape)}; the models of {self.ref} take one item of "
                            f"shape {list(item)} or a batch of shape [rows, {', '.join(map(str, item))}]")

    def batch(self, parts: Sequence[np.ndarray]) -> "torch.Tensor":
        """Requests' arrays as one ``(rows, *input_shape)`` tensor of the models' dtype."""
        import torch

        x = parts[0] if len(parts) == 1 else np.concatenate(parts)
        t = torch.from_numpy(x)
        return t if t.dtype == self.dtype else t.to(self.dtype)

    # -- one model at a time ---------------------------------------------------------------------------
    def module(self, i: int) -> "nn.Module":
        """Model ``i`` as a module: from the LRU of built modules, else built by ``ms[i]``."""
        with self._lock:
            m = self._modules.get(i)
            if m is not None:
                self._modules.move_to_end(i)
                return m
        m = self.ms[i]
        if self.max_modules:
            with self._lock:
                self._modules[i] = m
                while len(self._modules) > self.max_modules:
                    self._modules.popitem(last=False)
        return m

    def warm(self, indices: Sequence[int]) -> int:
        """Build the modules of ``indices`` now (at most ``max_modules``); returns how many are kept."""
        for i in list(indices)[: self.max_modules]:
            self.module(int(i))
        return len(self._modules)

    def run_one(self, i: int, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        with torch.no_grad():
            out: torch.Tensor = self.module(i)(x)
        return out

    # -- many models in one call -----------------------------------------------------------------------
    def prepare_multi(self) -> None:
        """Map every key of every model as a (models, *shape) tensor and build the batched call."""
        if self._stacked is not None or self.multi_error is not None:
            return
        from torch.func import functional_call, vmap

        held = [key for key in self.ms.layout.keys if is_attribute_state(key)]
        if held:  # functional_call swaps parameters and buffers only: these would be the template's
            self.multi_error = (f"the models hold tensors in plain attributes ({held[0]}, ...), which a batched "
                                "call cannot swap; they run one model at a time")
            return

        template = self.template

        def one(params: dict[str, "torch.Tensor"], x: "torch.Tensor") -> "torch.Tensor":
            out: torch.Tensor = functional_call(template, params, (x.unsqueeze(0),))
            return out.squeeze(0)

        self._vmapped = vmap(one)
        self._stacked = {key: self.ms.stacked(key) for key in self.ms.layout.keys}
        self.layers = linear_chain(template)
        if self.layers is not None:
            self._plan_rows(self.layers)

    def _plan_rows(self, layers: list[Any]) -> None:
        """The chain's parameters as one row per model (``_rows``) and each layer as offsets into it.

        A batch then costs one gather (``index_select`` of its models' rows) and, per layer, views
        of the gathered rows made by ``as_strided`` (the weight already transposed, the bias) and one
        ``baddbmm``: a third of the torch calls of a gather per tensor, and every torch call releases
        and re-takes the GIL that the request threads are waiting for. A baseline set's stacked
        tensors are views into one mapped buffer with a row per model: ``_rows`` is a view of it
        (zero-copy); any other set's tensors are copied into rows once."""
        import torch
        from torch import nn

        stacked = self._stacked
        assert stacked is not None
        keys = [k for layer in layers if isinstance(layer, tuple) for k in layer if k is not None]
        tensors = [stacked[k] for k in keys]
        n = len(self.names)
        first = tensors[0]
        shared = (len({t.dtype for t in tensors}) == 1
                  and len({t.untyped_storage().data_ptr() for t in tensors}) == 1
                  and len({t.stride(0) for t in tensors}) == 1
                  and all(t[0].is_contiguous() for t in tensors))
        if shared:
            base = min(t.storage_offset() for t in tensors)
            offsets = [t.storage_offset() - base for t in tensors]
            span = max(o + t[0].numel() for o, t in zip(offsets, tensors))
            rows = first.as_strided((n, span), (first.stride(0), 1), base)
        elif len({t.dtype for t in tensors}) == 1:
            parts = [t.reshape(n, -1) for t in tensors]
            rows = torch.cat(parts, dim=1)
            offsets = np.cumsum([0] + [p.shape[1] for p in parts[:-1]]).tolist()
        else:  # mixed dtypes cannot share one row (baddbmm would refuse them too): vmap
            self.layers = None
            return
        where = dict(zip(keys, offsets))
        self.rows_shared = shared
        self._rows = rows
        # a layer: (weight offset, in, out, bias offset or -1); an activation: its ``forward`` (the
        # template is ours: no hooks to run, and ``Module.__call__`` costs several times a ReLU here),
        # ReLU's own function (its forward is two more Python calls around it)
        self._plan = [(torch.relu if type(layer) is nn.ReLU else layer.forward) if not isinstance(layer, tuple) else
                      (where[layer[0]], stacked[layer[0]].shape[2], stacked[layer[0]].shape[1],
                       -1 if layer[1] is None else where[layer[1]])
                      for layer in layers]

    def run_multi(self, idx: "torch.Tensor", x: "torch.Tensor") -> "torch.Tensor":
        """Row ``r`` of ``x`` through model ``idx[r]``, all rows in one batched call."""
        import torch

        self.prepare_multi()
        assert self._stacked is not None and self._vmapped is not None
        with torch.no_grad():
            if self.layers is None:
                params = {key: s.index_select(0, idx) for key, s in self._stacked.items()}
                return self._vmapped(params, x)
            assert self._rows is not None
            g = self._gathered(idx)  # (rows, span): every parameter of each row's model
            b, span = g.shape
            h = x.unsqueeze(1)  # (rows, 1, features): every row is a batch of one for its own model
            for step in self._plan:
                if type(step) is tuple:
                    w, n_in, n_out, bias = step
                    wt = g.as_strided((b, n_in, n_out), (span, 1, n_in), w)  # the weight, transposed
                    h = torch.bmm(h, wt) if bias < 0 else \
                        torch.baddbmm(g.as_strided((b, 1, n_out), (span, n_out, 1), bias), h, wt)
                else:
                    h = step(h)
            return h.squeeze(1)

    def _gathered(self, idx: "torch.Tensor") -> "torch.Tensor":
        """The rows of ``idx``, gathered into a buffer this thread keeps: a batch of 256 gathers
        5 MB, and a fresh allocation of that size is new pages from the kernel each time (page
        faults: 5-10 µs of system time per request, measured). Nothing returned aliases the buffer."""
        import torch

        rows = self._rows
        assert rows is not None
        buf: "torch.Tensor | None" = getattr(self._buffers, "gather", None)
        n = len(idx)
        if buf is None or len(buf) < n:
            buf = self._buffers.gather = torch.empty((max(n, 8), rows.shape[1]), dtype=rows.dtype)
        out = buf[:n]
        torch.index_select(rows, 0, idx, out=out)
        return out

    def batch_cost(self, multi: bool, repeats: int = 5) -> float:
        """Seconds one request of one row takes through the call the server makes (``run_multi``,
        else ``run_one``), the fastest of ``repeats`` after a warm-up: a batch's fixed cost."""
        import torch

        x = torch.zeros((1, *self.input_shape), dtype=self.dtype)
        idx = torch.zeros(1, dtype=torch.int64)
        best = float("inf")
        for k in range(repeats + 1):
            t0 = time.perf_counter()
            self.run_multi(idx, x) if multi else self.run_one(0, x)
            if k:
                best = min(best, time.perf_counter() - t0)
        return best

    def close(self) -> None:
        """Drop the readers; tensors still in use keep their mappings alive (see ObjectReader.close)."""
        self.ms.close()


def linear_chain(module: "nn.Module") -> list[Any] | None:
    """``module`` as a list of ``(weight key, bias key or None)`` for each ``nn.Linear`` and the
    element-wise activation modules between them, when it is a (nested) ``nn.Sequential`` of just
    those; None otherwise. Only exact classes qualify: a subclass may override ``forward``."""
    from torch import nn

    elementwise = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                   nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity)
    if module.training:
        return None

    def walk(m: "nn.Module", prefix: str) -> list[Any] | None:
        if type(m) is nn.Sequential:
            out: list[Any] = []
            for name, child in m.named_children():
                part = walk(child, f"{prefix}{name}.")
                if part is None:
                    return None
                out += part
            return out
        if type(m) is nn.Linear:
            return [(f"{prefix}weight", f"{prefix}bias" if m.bias is not None else None)]
        if type(m) in elementwise or type(m) is nn.Dropout:  # dropout is the identity in eval mode
            return [m] if type(m) is not nn.Dropout else []
        return None

    return walk(module, "")


def _is_int(dtype: "torch.dtype") -> bool:
    import torch

    return dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
