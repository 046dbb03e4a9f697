"""Searches that remember (``mm.search(..., store=store, reuse=True)``): block outputs kept in the store.

A kept feature is reused only where it is bit-identical to what the search would compute, so the
data are laid out by content, not by position:

* every item gets a hash of its bytes; the train/test split and the item's halving *level* are
  functions of that hash (and the seed), so appending items never moves an old item;
* rung ``r`` scores the training items of level >= ``last - r`` (about half of the next rung's, as
  ``halving.schedule`` asks), so the rungs' subsets are nested and content-determined too;
* within the test part and within each level, items keep their order in the data and are cut into
  chunks of ``batch_size`` items; a chunk is one inference batch, so a block's output on a chunk
  depends on the chunk's items alone. Appending items leaves every full old chunk as it was.

Features are keyed by (block-id path, chunk hash, precision); the precision tag holds what else can
change float results (device kind and name, torch version, CPU threads and vector capability, TF32
and cuDNN switches). Per candidate the search keeps its features (the flattened last output) and the
input of its last block, so a candidate derived from a kept one by retraining its last block runs
only that block. Proxy scores are kept too, keyed by the features and labels they were computed on.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable

from ..store.features import add_field, path_hasher
from .engine import Candidate, Meter, extract_shared, extract_whole

if TYPE_CHECKING:
    import torch

    from ..store.features import FeatureStore

#: the deepest halving level an item can have (a rung never asks for more than 2**-30 of the data)
MAX_LEVEL = 30


@dataclass
class Layout:
    """Content-determined order of the data: ``test`` and ``train`` are item indices; chunks are
    ``(start, stop, hash)`` ranges of those orders; ``levels[i]`` is train item ``i``'s level.

    Train items are grouped by level, every level above ``top`` (the first rung's) in one group, in
    data order within a group: appended items go to the end of their group, and the small groups
    of the highest levels (where every candidate runs) do not each end in a partial chunk."""

    test: "torch.Tensor"
    train: "torch.Tensor"
    levels: list[int]
    test_chunks: list[tuple[int, int, str]]
    train_chunks: list[tuple[int, int, str]]
    hashes: list[bytes] = field(repr=False, default_factory=list)
    batch_size: int = 1

    def rung_levels(self, last: int, least: int) -> list[int]:
        """The lowest level of each of ``last + 1`` rungs: rung ``r`` takes levels >= ``last - r``, or
        the smallest level set holding ``least`` items."""
        out = []
        for r in range(last + 1):
            level = last - r
            while sum(1 for v in self.levels if v >= level) < min(least, len(self.levels)) and level > 0:
                level -= 1
            out.append(level)
        return out

    def rung_items(self, last: int, least: int) -> list[int]:
        """Training items of each rung (see ``rung_levels``): a prefix of the train order."""
        return [sum(1 for v in self.levels if v >= level) for level in self.rung_levels(last, least)]

    def grouped(self, top: int) -> "Layout":
        """This layout with every level above ``top`` in one group (see the class docstring)."""
        import torch

        pairs = sorted(zip(self.levels, self.train.tolist()), key=lambda p: (-min(p[0], top), p[1]))
        train = [i for _, i in pairs]
        levels = [lv for lv, _ in pairs]
        return Layout(self.test, torch.tensor(train, dtype=torch.long), levels, self.test_chunks,
                      _cut(train, [min(lv, top) for lv in levels], self.hashes, self.batch_size),
                      self.hashes, self.batch_size)

    def chunks(self, part: str, lo: int, hi: int) -> list[tuple[int, int, str]]:
        """Chunks of ``part`` lying in items ``lo:hi`` of its order (rung bounds fall on chunk bounds)."""
        pool = self.test_chunks if part == "test" else self.train_chunks
        return [c for c in pool if lo <= c[0] and c[1] <= hi]


def _cut(order: list[int], groups: list[int], hashes: list[bytes], batch_size: int) -> list[tuple[int, int, str]]:
    """Chunks of at most ``batch_size`` consecutive items of one group, each named by its items' hashes."""
    out: list[tuple[int, int, str]] = []
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and stop - start < batch_size and groups[stop] == groups[start]:
            stop += 1
        h = hashlib.sha256(b"mm-chunk/1")
        for i in order[start:stop]:
            h.update(hashes[i])
        out.append((start, stop, h.hexdigest()))
        start = stop
    return out


def item_hashes(x: "torch.Tensor") -> list[bytes]:
    """sha256 of every item's dtype, shape and bytes."""
    import torch

    flat = x.detach().cpu().contiguous()
    head = f"{flat.dtype}|{tuple(flat.shape[1:])}|".encode()
    base = hashlib.sha256(head)
    if not flat.numel():
        return [base.digest()] * len(flat)
    out = []
    for row in flat.reshape(len(flat), -1).view(torch.uint8).numpy():  # rows hashed in place, never copied
        h = base.copy()
        h.update(row)
        out.append(h.digest())
    return out


def layout(x: "torch.Tensor", y: "torch.Tensor", *, test_fraction: float, seed: int, batch_size: int,
           hashes: list[bytes] | None = None) -> Layout:
    """The content-determined split, levels and chunks of ``(x, y)`` (see the module docstring);
    ``hashes``: ``item_hashes(x)`` where the caller computed them already."""
    import torch

    if hashes is None:
        hashes = item_hashes(x)
    labels = y.tolist()
    test, train, levels = [], [], []
    draws = []
    for i, (h, label) in enumerate(zip(hashes, labels)):
        d = hashlib.sha256(b"mm-split/1|%d|%d|" % (seed, int(label)) + h).digest()
        u = int.from_bytes(d[:8], "little") / 2**64
        v = (int.from_bytes(d[8:16], "little") + 1) / 2**64
        draws.append((u, i))
        if u < test_fraction:
            test.append(i)
        else:
            train.append(i)
            levels.append(min(MAX_LEVEL, int(-math.log2(v))))
    if not test:  # too few items for the fraction: the item drawn lowest is the test part
        first = min(draws)[1]
        at = train.index(first)
        del train[at], levels[at]
        test.append(first)
    pairs = sorted(zip(levels, train), key=lambda p: (-p[0], p[1]))  # level high to low, data order within
    train = [i for _, i in pairs]
    levels = [lv for lv, _ in pairs]

    return Layout(torch.tensor(test, dtype=torch.long), torch.tensor(train, dtype=torch.long), levels,
                  _cut(test, [0] * len(test), hashes, batch_size), _cut(train, levels, hashes, batch_size), hashes,
                  batch_size)


def precision(device: str) -> str:
    """What besides the inputs decides a block's float results on this machine."""
    import torch

    dev = torch.device(device)
    tag = (f"{dev.type}|torch {torch.__version__}|threads {torch.get_num_threads()}"
           f"|cpu {torch.backends.cpu.get_cpu_capability()}")  # the kernels' vector width (ATEN_CPU_CAPABILITY)
    if dev.type == "cuda":
        tag += (f"|{torch.cuda.get_device_name(dev)}|tf32 {torch.backends.cuda.matmul.allow_tf32}"
                f" {torch.backends.cudnn.allow_tf32}|det {torch.backends.cudnn.deterministic}")
    return tag


@dataclass
class _Collect:
    """A tap keeping block outputs per segment: ``paths`` to keep, ``bounds`` of the segments."""

    paths: set[tuple[str, ...]]
    bounds: list[tuple[int, int]]
    got: dict[tuple[tuple[str, ...], int], "torch.Tensor"] = field(default_factory=dict)

    def take(self, path: tuple[str, ...], start: int, stop: int, output: "torch.Tensor") -> None:
        for j, (a, b) in enumerate(self.bounds):
            if start <= a and b <= stop:
                self.got[(path, j)] = output[a - start: b - start].detach().cpu().clone()


@dataclass
class Kept:
    """The kept features a search reads and writes, and what it reused (per rung, for progress)."""

    features: "FeatureStore"
    precision: str
    reused: int = 0
    computed: int = 0

    _paths: dict[tuple[tuple[str, ...], str], Any] = field(default_factory=dict)

    def key(self, path: list[str] | tuple[str, ...], chunk: str, kind: str) -> str:
        """``store.features.feature_key`` of a block path and chunk (the path's hash state reused)."""

        at = (tuple(path), kind)
        if at not in self._paths:
            self._paths[at] = path_hasher(at[0], f"{self.precision}|{kind}")
        h = self._paths[at].copy()
        add_field(h, chunk)
        return str(h.hexdigest())

    def extract(self, group: list[Candidate], data: "torch.Tensor", segments: list["torch.Tensor"],
                hashes: list[str], *, shared: bool, batch_size: int, device: str, budget: int | None, meter: Meter,
                emit: Callable[[dict[str, Any]], None],
                resident: dict[tuple[str, ...], Any]) -> list[dict[Hashable, "torch.Tensor"]]:
        """Features of ``group`` per segment (one chunk each: the indices of its items in ``data``):
        kept ones read, the rest computed (from a kept last-block input where every segment has one)
        and kept. Only the items of computed chunks are gathered."""
        import torch

        t0 = time.perf_counter()
        out: list[dict[Hashable, torch.Tensor]] = [{} for _ in segments]
        need: dict[tuple[Hashable, ...], list[int]] = {}
        for j, h in enumerate(hashes):
            missing = []
            for c in group:
                assert c.ids is not None
                f = self.features.get(self.key(c.ids, h, "features"))
                if f is None:
                    missing.append(c.name)
                else:
                    out[j][c.name] = f
                    self.reused += 1
            if missing:
                need.setdefault(tuple(missing), []).append(j)
        meter.add("inference", time.perf_counter() - t0)  # reading kept features replaces inference
        by_name = {c.name: c for c in group}
        for names, idx in need.items():
            segs = [data.index_select(0, segments[j]) for j in idx]
            hs = [hashes[j] for j in idx]
            full: list[Candidate] = []
            resume: dict[tuple[str, ...], tuple[list[Candidate], torch.Tensor]] = {}
            for name in names:
                c = by_name[name]
                assert c.ids is not None
                path = tuple(c.ids[: c.count - 1])
                if shared and c.count >= 2 and path not in resume:
                    kept_in = [self.features.get(self.key(path, h, "raw")) for h in hs]
                    if all(t is not None for t in kept_in):
                        resume[path] = ([], torch.cat(kept_in))  # type: ignore[arg-type]
                if shared and path in resume:
                    resume[path][0].append(c)
                else:
                    full.append(c)
            bounds, at = [], 0
            for s in segs:
                bounds.append((at, at + len(s)))
                at += len(s)
            results: list[dict[Hashable, torch.Tensor]] = [{} for _ in segs]
            tap = _Collect({tuple(c.ids[: c.count - 1]) for c in full if c.ids is not None and c.count >= 2},
                           bounds)
            if full and shared:
                self._merge(results, extract_shared(full, segs, batch_size=batch_size, device=device, budget=budget,
                                                    host_budget=budget, meter=meter, progress=emit,
                                                    resident=resident, tap=tap))
            elif full:
                for c in full:
                    feats = extract_whole(c, segs, batch_size=batch_size, device=device, meter=meter)
                    self._merge(results, [{c.name: f} for f in feats])
            for path, (cs, inputs) in resume.items():
                self._merge(results, extract_shared(cs, segs, batch_size=batch_size, device=device, budget=budget,
                                                    host_budget=budget, meter=meter, progress=emit,
                                                    resident=resident, from_depth=len(path), inputs=inputs,
                                                    tap=_Collect(set(), bounds)))
            keep = [(self.key(p, hs[j], "raw"), t) for (p, j), t in tap.got.items()]
            for j, res in enumerate(results):
                for name, f in res.items():
                    ids = by_name[name].ids
                    assert ids is not None
                    keep.append((self.key(ids, hs[j], "features"), f))
                    out[idx[j]][name] = f
                    self.computed += 1
            self.features.put(keep)
        return out

    def score_key(self, ids: list[str], train: list[str], test: list[str], labels: bytes, proxy: str,
                  seed: int) -> str:
        """Key of a proxy score: the proxy, its seed, the labels and the keys of every feature it
        trains and tests on (a proxy's score does not depend on the other candidates it is trained
        beside, see ``proxies.score_many``)."""
        h = hashlib.sha256(b"mm-proxy-score/2")  # /2: the linear proxy's single-batch epochs in data order
        h.update(f"{proxy}|{seed}|".encode())
        h.update(hashlib.sha256(labels).digest())
        for part, hashes in (("train", train), ("test", test)):
            h.update(part.encode())
            for chunk in hashes:
                h.update(self.key(ids, chunk, "features").encode())
        return self.key([], h.hexdigest(), "score")

    def scores(self, keys: dict[Hashable, str]) -> dict[Hashable, tuple[float, float]]:
        """Kept (score, loss) of the names in ``keys`` that have one."""
        import torch

        out = {}
        for name, key in keys.items():
            t = self.features.get(key)
            if t is not None and t.dtype == torch.float64 and t.shape == (2,):
                out[name] = (float(t[0]), float(t[1]))
        return out

    def keep_scores(self, keys: dict[Hashable, str], got: dict[Hashable, tuple[float, float]]) -> None:
        import torch

        self.features.put([(keys[n], torch.tensor(v, dtype=torch.float64)) for n, v in got.items()])

    @staticmethod
    def _merge(into: list[dict[Hashable, "torch.Tensor"]], more: list[dict[Hashable, "torch.Tensor"]]) -> None:
        for a, b in zip(into, more):
            a.update(b)


__all__ = ["Kept", "Layout", "item_hashes", "layout", "precision"]
