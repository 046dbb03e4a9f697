"""``mm.search``: pick the best base models for a task by feature-based model search.

Approaches (same proxy, same splits, same batches — so the same scores on the same rungs):
* ``alsatian``: successive halving; per rung the surviving candidates' blocks form a task tree,
  every shared block runs once, intermediates live in a budgeted tiered cache (DFS+ plan);
* ``shift``: successive halving, every candidate run whole, nothing shared;
* ``base``: every candidate run whole on all data, no halving.
"""
from __future__ import annotations

import itertools
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import ProbeMismatch, SearchError, a_type
from ..store import Store
from ..store.features import FeatureStore
from .distributed import RaySearch, resolve_executor
from .engine import Candidate, Meter, check_items, extract_shared, extract_whole
from .halving import Rung, schedule
from .lake import Kept, item_hashes, layout, precision

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn


APPROACHES = ("alsatian", "shift", "base")
MIN_RUNG_ITEMS = 32


@dataclass
class SearchResult:
    """Outcome of a search: ``ranking`` (best first), ``best``, ``timings``, ``stats``, ``rungs``."""

    approach: str
    ranking: "pd.DataFrame"
    timings: dict[str, float]
    stats: dict[str, int]
    rungs: list[Rung]
    k: int
    models: dict[str, Any] = field(repr=False, default_factory=dict)
    #: the stored candidate set (name, version) the candidates came from; None: held in memory
    source: tuple[str, int] | None = None

    @property
    def best(self) -> str:
        """Name of the best candidate."""
        return str(self.ranking.iloc[0]["model"])

    @property
    def best_arm(self) -> tuple[str, int]:
        """(model, layer) of the best arm; layer -1 is the model's own output (``layers=1``: always)."""
        row = self.ranking.iloc[0]
        return str(row["model"]), int(row["layer"]) if "layer" in self.ranking else -1

    @property
    def top(self) -> list[str]:
        """Names of the ``k`` selected candidates."""
        return [str(m) for m in self.ranking["model"].iloc[: self.k]]

    def save(self, store: "Store", dataset: str) -> int:
        """Keep this result in ``store`` as the search on ``dataset`` (its name, e.g. "cifar-subset"):
        date, approach, k, the ranking with scores, winner, top 5, timings, and the candidates' stored
        identities when they came from ``mm.load_candidates`` (else only their names). Then
        ``store.searches()`` lists it and ``store.models()`` marks the winner ``best_on`` it. Returns
        the kept search's id."""
        if not isinstance(store, Store):
            raise SearchError(f"save needs an mm.Store, not {type(store).__name__}")
        cols = self.ranking[["model", "score", "loss", "rung"]]
        ranking = [(str(m), float(s), float(loss), int(rung)) for m, s, loss, rung in cols.to_numpy().tolist()]
        return store.keep_search(dataset, self.approach, self.k, ranking, self.timings, self.source)

    def __repr__(self) -> str:
        head = self.ranking.head(5)
        lines = [f"SearchResult({self.approach}: best {self.best!r} of {len(self.ranking)}, "
                 f"{len(self.rungs)} rung(s), {self.stats['block_inferences']} block inferences)"]
        for _, r in head.iterrows():
            layer = f" layer {r['layer']}" if "layer" in head else ""
            lines.append(f"  {r['model']}{layer}: score {r['score']:.4f} (rung {r['rung']})")
        return "\n".join(lines)


def _as_tensor(value: Any, what: str) -> "torch.Tensor":
    """A tensor from a tensor, NumPy array or (nested) list of numbers; anything else is refused."""
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, list, tuple)):
        try:
            out = torch.as_tensor(np.asarray(value) if not isinstance(value, np.ndarray) else value)
        except (TypeError, ValueError, RuntimeError) as e:
            raise SearchError(f"{what} cannot be made a tensor: {str(e).splitlines()[0]}") from None
        return out
    raise SearchError(f"{what} must be a tensor, a NumPy array or a list of numbers, not {type(value).__name__}")


def _finite(x: "torch.Tensor") -> bool:
    """No NaN or infinity in ``x``: real data by its extremes (NaN propagates through min and max; no
    full-size mask is allocated -- 25x faster on a batch of 224 px images), complex data elementwise."""
    import torch

    if x.numel() == 0:
        return True
    if x.dtype.is_complex:
        return bool(torch.isfinite(x).all())
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _as_data(data: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(X, y)``: inputs with a leading item axis and 1-d integer class labels, checked."""
    import torch

    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = _as_tensor(data[0], "data X"), _as_tensor(data[1], "labels y")
    elif _dataset_like(data):
        try:
            items = [data[i] for i in range(len(data))]
        except Exception as e:  # noqa: BLE001 - a user's Dataset failing is reported as bad data
            raise SearchError(f"reading the Dataset failed: {type(e).__name__}: {e}") from None
        if not items or not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
            raise SearchError("a Dataset for search must yield (input, label) pairs")
        try:
            x = torch.stack([_as_tensor(a, "a Dataset input") for a, _ in items])
            y = torch.as_tensor([int(b) for _, b in items])
        except (TypeError, ValueError, RuntimeError) as e:
            raise SearchError(f"the Dataset's items do not stack into (X, y): {str(e).splitlines()[0]}") from None
    else:
        raise SearchError(f"data must be (X, y) tensors or a torch Dataset, not {type(data).__name__}")
    if x.dim() == 0:
        raise SearchError("data X must have a leading item axis, got a 0-d tensor")
    check_items(x, y)
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.dim() != 1:
        raise SearchError(f"labels must be a 1-d integer tensor of class indices, got {y.dtype}{list(y.shape)}")
    if int(y.min()) < 0:
        raise SearchError(f"labels must be class indices >= 0, found {int(y.min())}")
    if (x.dtype.is_floating_point or x.dtype.is_complex) and not _finite(x):
        raise SearchError("data X holds NaN or infinite values")
    return x, y.long()


def _dataset_like(data: Any) -> bool:
    """A torch Dataset, or anything indexable with a length that is not a string or a dict."""
    import torch

    return isinstance(data, torch.utils.data.Dataset) or (
        hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, bytes, dict)))


def _named(candidates: Any) -> dict[str, Any]:
    """Candidates by name; every in-memory one must be an ``nn.Module``."""
    from torch import nn

    if isinstance(candidates, Mapping):
        named = {str(k): v for k, v in candidates.items()}
    elif isinstance(candidates, (list, tuple)):
        named = {str(i): m for i, m in enumerate(candidates)}
    elif hasattr(candidates, "engine_candidates"):
        if not len(candidates):
            raise SearchError("no candidates to search")
        stored: dict[str, Any] = candidates  # stored candidates resolve themselves
        return stored
    elif isinstance(candidates, nn.Module):
        raise SearchError("candidates must be a list or dict of models; wrap a single model as [model]")
    else:
        raise SearchError(f"candidates must be a list or dict of models, not {type(candidates).__name__}")
    if not named:
        raise SearchError("no candidates to search")
    for name, model in named.items():
        if not isinstance(model, nn.Module):
            raise SearchError(f"candidate {name!r} is {a_type(model)}, not an nn.Module")
    return named


def _prepare(named: dict[str, Any], sample: "torch.Tensor", shared: bool, device: str,
             meter: Meter, emit: Callable[[dict[str, Any]], None], costs: bool = False,
             with_ids: bool = False) -> list[Candidate]:
    """Split every candidate into blocks, verified on the first items of the data (``sample``: the
    probe; a split that does not reproduce a candidate's own features is never used, see
    ``verify.py``), run one item through them (the data must fit every candidate before any real
    work starts), and for sharing hash the blocks. Emits ``prepare`` events (candidates done /
    total, distinct blocks hashed): on large candidates this is the search's first, silent-looking
    phase. ``costs``: also count each block's work (a distributed search balances its workers by it);
    ``with_ids``: hash the blocks without sharing too (kept features are keyed by block ids)."""
    import torch

    from .blocks import block_costs, cached_output_sizes, output_sizes
    from .hashing import block_id
    from .splitting import split_model

    total = len(named)
    emit({"event": "prepare", "done": 0, "total": total, "blocks": 0})
    if hasattr(named, "engine_candidates"):
        out: list[Candidate] = named.engine_candidates(sample, shared=shared or with_ids, device=device, costs=costs)
        emit({"event": "prepare", "done": total, "total": total, "blocks": 0})
        return out
    t0 = time.perf_counter()
    splits: dict[str, tuple[Any, list[int], list[str] | None]] = {}
    ids_of: dict[int, str] = {}
    distinct: set[str] = set()
    target = torch.device(device)
    for name, model in named.items():
        settled, elsewhere = _survey(model, target)
        if not settled:
            model.eval()
            elsewhere = _elsewhere(model, target)  # eval() may run the model's own code: look again
        if elsewhere:
            model.to(device)  # a walk over every module: only when a tensor is elsewhere
        try:
            split = split_model(model, sample.to(device))
        except ProbeMismatch as e:  # the data does not fit the model: name the block that fails on it
            if e.split is not None:
                output_sizes(e.split, sample[:1].to(device), name)
            raise SearchError(f"candidate {name!r} cannot take the data (the first {len(sample)} items: shape "
                              f"{tuple(sample.shape)}, {sample.dtype}): {e}") from None
        except SearchError as e:
            raise SearchError(f"candidate {name!r}: {e}") from None
        if shared or with_ids:  # hashed anyway: the sizes are then remembered by block ids
            hashed: list[str] = []
            for b in split.blocks:  # the same block object in several candidates is hashed once
                if id(b.module) not in ids_of:
                    ids_of[id(b.module)] = block_id(b, split.scope)
                    distinct.add(ids_of[id(b.module)])
                hashed.append(ids_of[id(b.module)])
            splits[name] = (split, cached_output_sizes(split, hashed, sample[:1].to(device), name), hashed)
        else:
            splits[name] = (split, output_sizes(split, sample[:1].to(device), name), None)
    out = []
    costs_of: dict[tuple[Any, ...], list[float]] = {}  # work depends on the architecture, not on the weights
    for done, (name, (split, sizes, ids)) in enumerate(splits.items(), start=1):
        work = None
        if costs:
            shape = (tuple(sizes), tuple(tuple((k, tuple(v.shape)) for k, v in b.module.state_dict().items())
                                         for b in split.blocks))
            if shape not in costs_of:
                costs_of[shape] = block_costs(split, sample[:1].to(device))
            work = costs_of[shape]
        out.append(Candidate(name, split.blocks.__getitem__, len(split.blocks), split.context, ids,
                             sizes if shared else None, costs=work))
        emit({"event": "prepare", "done": done, "total": total, "blocks": len(distinct)})
    meter.add("prepare model", time.perf_counter() - t0)
    return out


def _survey(model: "torch.nn.Module", target: "torch.device") -> tuple[bool, bool]:
    """One walk over the modules (shared ones once): whether ``model.eval()`` would change nothing,
    and ``_elsewhere``. It changes nothing when every module is in eval mode already and neither
    the module nor its class brings a ``train`` or ``eval`` of its own (only ``nn.Module``'s, and
    Hugging Face's ``PreTrainedModel``'s, which does more only with ``use_kernels``): a kept search
    of 35 Hugging Face models then skips 20 ms of ``__setattr__`` that set nothing."""
    from torch import nn

    trains, evals = {nn.Module.train}, {nn.Module.eval}
    pretrained = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    hf_train = None if pretrained is None else pretrained.train
    if pretrained is not None:
        trains.add(pretrained.train)
        evals.add(pretrained.eval)
    on_cpu = target.type == "cpu" and target.index is None  # (is_cpu: no device object per tensor)
    elsewhere = False
    for m in _each_module(model):
        d, cls = m.__dict__, type(m)
        if not (d.get("training") is False and "train" not in d and "eval" not in d and cls.train in trains
                and cls.eval in evals and not (cls.train is hf_train and getattr(m, "use_kernels", False))):
            return False, False  # the caller runs eval() and then looks for tensors elsewhere
        elsewhere = elsewhere or _off(m, target, on_cpu)
    return True, elsewhere


def _elsewhere(model: "torch.nn.Module", target: "torch.device") -> bool:
    """Whether a parameter or buffer of ``model`` is not on ``target``: its modules' own tensor dicts
    read directly (``parameters()``'s generators with their name prefixes cost as much as the rest of
    preparing a kept candidate)."""
    return any(_off(m, target, False) for m in _each_module(model))


def _each_module(model: "torch.nn.Module") -> "Iterator[torch.nn.Module]":
    """Every module of the tree once (shared ones too), read from the modules' own dicts."""
    stack, seen = [model], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        yield m
        stack.extend(c for c in m._modules.values() if c is not None)


def _off(m: "torch.nn.Module", target: "torch.device", on_cpu: bool) -> bool:
    """Whether one of ``m``'s own parameters or buffers is not on ``target``."""
    for t in itertools.chain(m._parameters.values(), m._buffers.values()):
        if t is not None and (not t.is_cpu if on_cpu else t.device != target):
            return True
    return False


def resolve_device(device: str) -> str:
    """``"auto"`` becomes CUDA when present, else CPU; a device that torch does not know, or that
    this machine lacks, is an error."""
    import torch

    if not isinstance(device, str):
        raise SearchError(f"device must be a string such as 'auto', 'cpu' or 'cuda', not {type(device).__name__}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SearchError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu":
        return device
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SearchError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SearchError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
        return device
    if dev.type == "mps" and torch.backends.mps.is_available():
        return device
    raise SearchError(f"device {device!r} is not available for search; use 'auto', 'cpu' or 'cuda'")


def _enough(items: int, train: Sequence[int] | "torch.Tensor") -> None:
    if len(train) < 2:
        raise SearchError(f"{items} items are too few to split into training and test data")


def _positive_int(value: Any, what: str, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise SearchError(f"{what} must be an integer >= {least}, not {value!r}")


def search(
    candidates: Sequence["nn.Module"] | Mapping[str, "nn.Module"] | Any,
    data: Any,
    k: int = 1,
    approach: str = "alsatian",
    cache_budget: int | None = None,
    device: str = "auto",
    proxy: str = "linear",
    progress: Callable[[dict[str, Any]], None] | None = None,
    executor: Any = None,
    store: Any = None,
    reuse: bool = False,
    layers: int = 1,
    *,
    eta: int = 2,
    batch_size: int = 64,
    test_fraction: float = 0.2,
    seed: int = 0,
    halving: bool | None = None,
    feature_budget: int | None = None,
) -> SearchResult:
    """Rank ``candidates`` as base models for the labelled ``data`` (Alsatian model search).

    Args:
        candidates: a list or dict of ``nn.Module`` (any models: cut into blocks automatically), or stored
            candidates (``mm.load_candidates(store, name)``).
        data: ``(X, y)`` tensors, arrays or lists (``y``: integer class labels) or a torch ``Dataset`` of
            ``(input, label)`` pairs; split into a proxy train/test part and halving rungs internally.
        k: how many candidates to select (halving stops at ``k``).
        approach: ``"alsatian"`` (shared blocks run once, DFS+ plan, successive halving), ``"shift"``
            (successive halving, every candidate whole) or ``"base"`` (every candidate on all data).
        cache_budget: bytes of cached intermediate results at most (None: unbounded); the data is chunked
            when the plan needs more. On a GPU it bounds GPU memory and host memory each: results that
            fit neither spill to disk.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:n]"``.
        proxy: the score of a candidate's features: ``"linear"`` (a linear classifier) or another of
            ``modelsearch.proxies``.
        progress: called with event dicts (candidates prepared, rung start/end, model scored/pruned, cache).
        executor: ``"ray"`` or a ``RayExecutor``: each rung on several workers, each taking whole subtrees of
            the task tree; pruning stays global, scores and ranking are the single process's.
        store: the ``mm.Store`` whose kept features a search with ``reuse=True`` reads and writes.
        reuse: keep block outputs in ``store`` and reuse those kept by earlier searches (the model
            lake): the same search again, a search over appended items or over candidates derived from
            kept ones computes only what is new. The data are then split and chunked by content (see
            ``modelsearch.lake``), so rankings equal a fresh ``reuse=True`` search's on any store, but
            may differ from ``reuse=False``'s (a different, position-free split).
        layers: score the outputs of each candidate's last ``layers`` block boundaries as separate arms
            (VISTA): the ranking gets a ``layer`` column (-1: the candidate's own output, -2: the
            input of its last block, ...) and ``result.best_arm`` names the best (model, layer).
        eta: the halving factor (keep ``1/eta`` per rung).
        batch_size: items per inference batch.
        test_fraction: the part of ``data`` the proxy is scored on.
        seed: the seed of the data split and the proxy.
        halving: successive halving on or off (default: on for alsatian and shift, off for base).
        feature_budget: bytes of kept features in ``store`` at most (default 4 GiB); the least recently
            used are evicted.

    Returns:
        A ``SearchResult``: ``ranking`` (a DataFrame, best first), ``best``, ``top``, ``timings``, ``stats``
        (``block_inferences``, ``unique_edges``, ``cache_peak_bytes``, ``bytes_loaded``; with ``reuse``
        also ``features_reused`` and ``features_computed``: per candidate and chunk, ``features_resumed``: the
        computed ones that started from a kept block output (a last-block input or a fork) instead of the
        input, ``features_foreign``: kept entries another writer sealed, not read (see
        ``store.features``), and ``features_written_bytes``) and ``rungs``.

    Raises:
        SearchError: bad candidates, data or options, or a model whose blocks cannot be split.

    Example:
        >>> result = mm.search({"a": net_a, "b": net_b}, (X, y), k=1)
        >>> result.best, result.ranking.head()
        >>> again = mm.search(models, (X, y), store=store, reuse=True)     # computes only what is new
        >>> mm.search(models, (X, y), layers=3).best_arm                  # ("b", -2): b's second-last layer
    """
    import torch

    from .proxies import get_proxy

    if approach not in APPROACHES:
        raise SearchError(f"unknown approach {approach!r}; choose one of {', '.join(APPROACHES)}")
    get_proxy(proxy)  # an unknown proxy fails here, before any work
    _positive_int(k, "k")
    _positive_int(eta, "eta (the halving factor)", 2)
    _positive_int(batch_size, "batch_size")
    if cache_budget is not None:
        if isinstance(cache_budget, bool) or not isinstance(cache_budget, (int, float)) or not (
                1 <= cache_budget < float("inf")):
            raise SearchError(f"cache_budget must be a number of bytes >= 1 (or None), not {cache_budget!r}")
        cache_budget = int(cache_budget)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise SearchError(f"test_fraction must be a number between 0 and 1, not {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SearchError(f"seed must be an integer, not {seed!r}")
    if halving is not None and not isinstance(halving, bool):
        raise SearchError(f"halving must be True, False or None, not {halving!r}")
    if progress is not None and not callable(progress):
        raise SearchError(f"progress must be a callable or None, not {type(progress).__name__}")
    _positive_int(layers, "layers")
    if not isinstance(reuse, bool):
        raise SearchError(f"reuse must be True or False, not {reuse!r}")
    if reuse and store is None:
        raise SearchError("reuse=True needs store=mm.Store(...): the kept features live there")
    if store is not None and not hasattr(store, "objects"):
        raise SearchError(f"store must be an mm.Store, not {type(store).__name__}")
    if feature_budget is not None:
        _positive_int(feature_budget, "feature_budget (bytes)", 0)
    if executor is not None and (reuse or layers > 1):
        raise SearchError("reuse and layers > 1 run in this process; leave executor out")
    if executor is not None:

        pool = resolve_executor(executor)
    dev = resolve_device(device) if executor is None else "cpu"  # the driver only probes; workers run
    meter = Meter()
    emit = progress or (lambda event: None)
    t0 = time.perf_counter()
    named = _named(candidates)
    n_models = len(named)
    if k > n_models:
        raise SearchError(f"k={k} is larger than the number of candidates ({n_models})")
    x, y = _as_data(data)
    lay, hashing = None, None
    if reuse:  # the items' content hashes (the split rests on them) on a second thread, beside the
        # candidates' preparation: hashing releases the GIL, preparing is Python (the data is only read)
        hasher = ThreadPoolExecutor(1, thread_name_prefix="mm-item-hashes")
        hashing = hasher.submit(item_hashes, x)
        hasher.shutdown(wait=False)
    else:
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(x), generator=gen)
        n_test = max(1, int(round(len(x) * test_fraction)))
        test_idx, train_idx = order[:n_test], order[n_test:]
        _enough(len(x), train_idx)
        x_test, y_test = x[test_idx], y[test_idx]
        x_train, y_train = x[train_idx], y[train_idx]
    meter.add("prepare data", time.perf_counter() - t0)

    shared = approach == "alsatian"
    # str(): the names are already str (_named); Candidate allows any hashable name
    from .verify import PROBE_ITEMS

    probe = x[:PROBE_ITEMS].clone()  # verification runs candidates on it: one that writes its input in place
    # must not change the data (with kept features, chunks are gathered from ``x`` later)
    cands = {str(c.name): c for c in _prepare(named, probe, shared, dev, meter, emit, costs=executor is not None,
                                              with_ids=reuse)}
    if hashing is not None:  # a content-determined split: appended items never move old ones
        t0 = time.perf_counter()
        lay = layout(x, y, test_fraction=test_fraction, seed=seed, batch_size=batch_size, hashes=hashing.result())
        test_idx, train_idx = lay.test, lay.train
        _enough(len(x), train_idx)
        x_test, y_test = x, y[test_idx]  # with a layout a chunk's items are gathered only when it is computed
        meter.add("prepare data", time.perf_counter() - t0)
    arms = {name: (name, -1) for name in cands}
    if layers > 1:  # every candidate's last block boundaries as arms; prefixes shared in the task tree
        arms = {f"{name} [layer {-off}]": (name, -off) for name, c in cands.items()
                for off in range(1, min(layers, c.count) + 1)}
        cands = {arm: cands[m].prefix(cands[m].count + 1 + layer, arm) for arm, (m, layer) in arms.items()}
    t0 = time.perf_counter()
    n_arms = len(cands)
    if k > n_arms:
        raise SearchError(f"k={k} is larger than the number of arms ({n_arms})")
    use_halving = (approach != "base") if halving is None else halving
    rungs = schedule(n_arms, k, len(train_idx), eta, use_halving)
    if lay is None:
        rungs = [Rung(r.index, r.models, max(r.items, min(len(train_idx), MIN_RUNG_ITEMS)), r.keep) for r in rungs]
    else:
        counts = lay.rung_items(len(rungs) - 1, MIN_RUNG_ITEMS)
        rungs = [Rung(r.index, r.models, counts[r.index], r.keep) for r in rungs]
        lay = lay.grouped(len(rungs) - 1)  # never moves with the item count (see ``Layout``)
        x_train, y_train = x, y[lay.train]
    kept = None
    if reuse:

        kept = Kept(FeatureStore(store, feature_budget), precision(dev))
    meter.add("prepare data", time.perf_counter() - t0)
    remote = None
    if executor is not None:

        t1 = time.perf_counter()
        remote = RaySearch(pool, named, list(cands.values()), probe, device, shared=shared, batch_size=batch_size,
                           budget=cache_budget, proxy=proxy, seed=seed)
        meter.add("prepare model", time.perf_counter() - t1)
    try:
        result = _run(named, cands, x_train, y_train, x_test, y_test, rungs, approach, k, shared, dev, meter, emit,
                      proxy, batch_size, cache_budget, seed, remote, lay, kept)
    finally:
        if remote is not None:
            remote.close()
        if kept is not None:
            kept.features.flush()
    if layers > 1:
        ranking = result.ranking
        ranking.insert(2, "layer", [arms[a][1] for a in ranking["model"]])
        ranking["model"] = [arms[a][0] for a in ranking["model"]]
    return result


def _run(named: Any, cands: dict[str, Candidate], x_train: "torch.Tensor", y_train: "torch.Tensor",
         x_test: "torch.Tensor", y_test: "torch.Tensor", rungs: list[Rung], approach: str, k: int, shared: bool,
         dev: str, meter: Meter, emit: Callable[[dict[str, Any]], None], proxy: str,
         batch_size: int, cache_budget: int | None, seed: int, remote: Any, lay: Any = None,
         kept: Any = None) -> SearchResult:
    """The rungs: extract new features, score, prune (locally or on the Ray workers). With kept
    features (``lay``: the content layout, ``kept``: the store's features) every segment is one chunk,
    ``x_train`` and ``x_test`` are the whole data and a segment is its chunk's item indices."""
    import torch

    from .proxies import ProxyScore, score_many

    active = list(cands)
    test_feats: dict[str, torch.Tensor] = {}
    test_parts: dict[str, list[torch.Tensor]] = {name: [] for name in cands}
    train_feats: dict[str, list[torch.Tensor]] = {name: [] for name in cands}
    done_items = 0
    results: dict[str, dict[str, Any]] = {}
    resident: dict[tuple[str, ...], Any] = {}  # loaded blocks, kept while survivors still need them
    for rung in rungs:
        emit({"event": "rung_start", "rung": rung.index, "models": list(active), "items": rung.items,
              "rungs": len(rungs)})
        if lay is None:
            pairs = ([("test", x_test)] if rung.index == 0 else []) + [("train", x_train[done_items:rung.items])]
            pairs = [(label, seg) for label, seg in pairs if len(seg)]
            hashes: list[str] = []
        else:  # a segment is a chunk's item indices into the data (``x_test is x_train``: all of it)
            parts = ([("test", lay.test, c) for c in lay.test_chunks] if rung.index == 0 else []) + [
                ("train", lay.train, c) for c in lay.chunks("train", done_items, rung.items)]
            pairs = [(label, order[a:b]) for label, order, (a, b, _) in parts]
            hashes = [h for _, _, (_, _, h) in parts]
        labels = [label for label, _ in pairs]
        segments = [seg for _, seg in pairs]
        group = [cands[n] for n in active]
        before = (kept.reused, kept.computed, meter.block_inferences) if kept is not None else (0, 0, 0)
        if not segments:
            per_segment: list[dict[Any, Any]] = []
        elif kept is not None:
            per_segment = kept.extract(group, x_train, segments, hashes, shared=shared, batch_size=batch_size,
                                       device=dev,
                                       budget=cache_budget, meter=meter, emit=emit, resident=resident)
        elif remote is not None:
            per_segment = remote.extract(group, segments, meter, emit)
        elif shared:
            per_segment = extract_shared(group, segments, batch_size=batch_size, device=dev,
                                         budget=cache_budget, host_budget=cache_budget, meter=meter, progress=emit,
                                         resident=resident)
        else:
            per_model = {c.name: extract_whole(c, segments, batch_size=batch_size, device=dev, meter=meter)
                         for c in group}
            per_segment = [{n: f[i] for n, f in per_model.items()} for i in range(len(segments))]
        for label, feats in zip(labels, per_segment):
            for name, f in feats.items():
                if label == "test":
                    test_parts[name].append(f)
                else:
                    train_feats[name].append(f)
        for name in active:
            if test_parts[name]:
                test_feats[name] = torch.cat(test_parts[name]) if len(test_parts[name]) > 1 else test_parts[name][0]
                test_parts[name] = []
        if kept is not None:
            emit({"event": "reuse", "rung": rung.index, "reused": kept.reused - before[0],
                  "computed": kept.computed - before[1], "block_inferences": meter.block_inferences - before[2]})
        done_items = rung.items
        t1 = time.perf_counter()
        if remote is not None:
            scores = remote.score([(n, torch.cat(train_feats[n])[: rung.items], test_feats[n]) for n in active],
                                  y_train[: rung.items], y_test)
        elif kept is not None:  # a proxy score computed before on the same features is kept too
            train_chunks = [h for _, _, h in lay.chunks("train", 0, rung.items)]
            test_chunks = [h for _, _, h in lay.test_chunks]
            label_bytes = y_train[: rung.items].numpy().tobytes() + b"|" + y_test.numpy().tobytes()
            keys = {n: kept.score_key(cands[n].ids, train_chunks, test_chunks, label_bytes, proxy, seed)
                    for n in active}
            known = kept.scores(keys)
            todo = [n for n in active if n not in known]
            together = score_many(proxy, [(torch.cat(train_feats[n])[: rung.items], test_feats[n]) for n in todo],
                                  y_train[: rung.items], y_test, seed=seed)
            fresh = {n: (s.score, s.loss) for n, s in zip(todo, together)}
            kept.keep_scores(keys, fresh)
            scores = {n: ProxyScore(*(known.get(n) or fresh[n])) for n in active}
        else:
            together = score_many(proxy, [(torch.cat(train_feats[n])[: rung.items], test_feats[n]) for n in active],
                                  y_train[: rung.items], y_test, seed=seed)  # the rung's survivors together
            scores = dict(zip(active, together))
        for name in active:
            s = scores[name]
            results[name] = {"model": name, "score": s.score, "loss": s.loss, "rung": rung.index}
            emit({"event": "model_scored", "rung": rung.index, "model": name, "score": s.score, "loss": s.loss})
        meter.add("proxy", time.perf_counter() - t1)
        ranked = sorted(active, key=lambda n: (-scores[n].score, scores[n].loss, n))
        keep = ranked[: rung.keep]
        for name in ranked[rung.keep:]:
            emit({"event": "model_pruned", "rung": rung.index, "model": name, "score": scores[name].score})
        for name in ranked[rung.keep:]:
            train_feats[name] = []
        emit({"event": "rung_end", "rung": rung.index, "survivors": list(keep)})
        active = keep
        if shared:
            needed = {tuple(ids[: d + 1]) for n in active if (ids := cands[n].ids) is not None
                      for d in range(cands[n].count)}  # shared candidates all have ids
            for key in [key for key in resident if key not in needed]:
                del resident[key]
    ranking = _ranking(results, active)
    stats = meter.stats()
    if remote is not None:
        stats["distributed"] = remote.stats
    if kept is not None:
        stats.update(features_reused=kept.reused, features_computed=kept.computed, features_resumed=kept.resumed,
                     features_corrupt=kept.features.corrupt, features_foreign=kept.features.foreign,
                     features_written_bytes=kept.features.written_bytes)
    emit({"event": "done", "timings": dict(meter.timings), "stats": stats})
    ref = getattr(named, "ref", None) if hasattr(named, "engine_candidates") else None
    return SearchResult(approach, ranking, dict(meter.timings), stats, rungs, k,
                        {n: named[n] for n in named} if isinstance(named, dict) else {},
                        None if ref is None else (str(ref.name), int(ref.version)))


def _ranking(results: dict[str, dict[str, Any]], survivors: list[str]) -> "pd.DataFrame":
    """Survivors by final score, then candidates pruned later before those pruned earlier."""
    import pandas as pd

    rows = sorted(results.values(), key=lambda r: (-r["rung"], r["model"] not in survivors, -r["score"],
                                                   r["loss"], r["model"]))
    frame = pd.DataFrame(rows, columns=["model", "score", "loss", "rung"])
    frame["selected"] = frame["model"].isin(survivors)
    frame.insert(0, "rank", range(1, len(frame) + 1))
    return frame.reset_index(drop=True)
