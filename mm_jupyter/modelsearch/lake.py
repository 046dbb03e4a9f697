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
only that block; and the outputs at the search's forks (where two of its candidates run different
blocks; not the large maps of early blocks, see ``fork_paths``), so a candidate that misses a chunk
(new on a rung after items were appended, or derived from one pruned early) resumes from the deepest
kept point of its path instead of the input. Proxy scores are kept too, keyed by the features and
labels they were computed on.
"""
from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable

from ..store.features import add_field, path_hasher
from .engine import Candidate, Meter, extract_shared, extract_whole
from .quickhash import quick_hash

if TYPE_CHECKING:
    import torch

    from ..store.features import FeatureStore

#: the deepest halving level an item can have (a rung never asks for more than 2**-30 of the data)
MAX_LEVEL = 30


@dataclass
class Layout:
    """Content-determined order of the data: ``test`` and ``train`` are item indices; chunks are
    ``(start, stop, hash)`` ranges of those orders; ``levels[i]`` is train item ``i``'s level.

    Train items are grouped by level, every level above ``top`` in one group, in data order within a
    group: appended items go to the end of their group, and the small groups of the highest levels
    (where every candidate runs) do not each end in a partial chunk. A search groups at its last
    rung's index (a function of the candidates alone, never of the item count), so appended items
    never regroup an old item and every rung's levels (``rung_levels``) are whole groups."""

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

    def copy(self) -> "Layout":
        """A layout of the caller's own (the remembered ones are shared, see ``layout``)."""
        return Layout(self.test.clone(), self.train.clone(), list(self.levels), list(self.test_chunks),
                      list(self.train_chunks), list(self.hashes), self.batch_size)

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
    """sha256 of every item's dtype, shape and bytes. The same data searched again (the same tensor,
    or a copy) gets its list back from a small memo keyed by a ``quick_hash`` of all of it: ~10x
    less than hashing the items one by one."""
    import torch

    flat = x.detach().cpu().contiguous()
    head = f"{flat.dtype}|{tuple(flat.shape[1:])}|".encode()
    if not flat.numel():
        return [hashlib.sha256(head).digest()] * len(flat)
    rows = flat.reshape(len(flat), -1).view(torch.uint8).numpy()  # hashed in place, never copied
    quick = quick_hash()
    quick.update(b"%d|" % len(flat) + head)
    quick.update(rows.data)
    key = quick.digest()
    with _MEMO_LOCK:
        kept = _ITEMS.get(key)
        if kept is not None:
            _ITEMS.move_to_end(key)
            return list(kept)
    out = []
    base = hashlib.sha256(head)
    for row in rows:
        h = base.copy()
        h.update(row)
        out.append(h.digest())
    if len(out) <= ITEMS_MEMO:
        with _MEMO_LOCK:
            _ITEMS[key] = tuple(out)
            while sum(len(v) for v in _ITEMS.values()) > ITEMS_MEMO:
                _ITEMS.popitem(last=False)
    return out


#: item digests remembered (``item_hashes``), at most this many in all (~100 bytes each)
ITEMS_MEMO = 200_000
_ITEMS: "OrderedDict[bytes, tuple[bytes, ...]]" = OrderedDict()
#: the last layouts made (``layout``), by a quick hash of everything they are a function of
_LAYOUTS: "OrderedDict[bytes, Layout]" = OrderedDict()
_MEMO_LOCK = threading.Lock()


def layout(x: "torch.Tensor", y: "torch.Tensor", *, test_fraction: float, seed: int, batch_size: int,
           hashes: list[bytes] | None = None) -> Layout:
    """The content-determined split, levels and chunks of ``(x, y)`` (see the module docstring);
    ``hashes``: ``item_hashes(x)`` where the caller computed them already. The last few layouts are
    remembered by a ``quick_hash`` of everything they follow from (items' digests, labels, options);
    each caller gets a copy."""
    import torch

    if hashes is None:
        hashes = item_hashes(x)
    labels_raw = y.detach().cpu().contiguous()
    quick = quick_hash()
    quick.update(f"{test_fraction!r}|{seed}|{batch_size}|{labels_raw.dtype}|{tuple(labels_raw.shape)}|{len(hashes)}|"
                 .encode())
    quick.update(b"".join(hashes))
    quick.update(labels_raw.reshape(-1).view(torch.uint8).numpy().data if labels_raw.numel() else b"")
    key = quick.digest()
    with _MEMO_LOCK:
        kept = _LAYOUTS.get(key)
        if kept is not None:
            _LAYOUTS.move_to_end(key)
    if kept is not None:  # the layout is a function of these alone: a copy of the remembered one
        return kept.copy()
    lay = _layout(list(hashes), y.tolist(), test_fraction, seed, batch_size)
    if len(hashes) <= ITEMS_MEMO:
        with _MEMO_LOCK:
            _LAYOUTS[key] = lay
            while len(_LAYOUTS) > 4:
                _LAYOUTS.popitem(last=False)
    return lay.copy()


def _layout(hashes: list[bytes], labels: list[Any], test_fraction: float, seed: int, batch_size: int) -> Layout:
    import torch

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


def fork_paths(cands: list[Candidate], item_bytes: int) -> set[tuple[str, ...]]:
    """Block paths (from the input) after which two of ``cands`` run different blocks, whose output
    takes at most ``item_bytes`` per item: where a later search's candidate that is new on a chunk
    can resume (``Kept.extract``) without the outputs of early high-resolution blocks being kept."""
    after: dict[tuple[str, ...], set[str]] = {}
    small: set[tuple[str, ...]] = set()
    for c in cands:
        if c.ids is None or c.sizes is None:
            continue
        for d in range(1, c.count):
            path = tuple(c.ids[:d])
            after.setdefault(path, set()).add(c.ids[d])
            if c.sizes[d - 1] <= item_bytes:
                small.add(path)
    return {p for p, nxt in after.items() if len(nxt) >= 2 and p in small}


@dataclass
class Kept:
    """The kept features a search reads and writes, and what it reused (per rung, for progress).

    Besides every candidate's features and last-block input, the outputs at the search's forks
    (``fork_paths`` of its candidates, each at most as large per item as one input item or as the
    largest last-block input, which is kept anyway) are kept, so a candidate that misses a chunk's
    features resumes from the deepest kept point of its path. ``resumed`` counts
    the computed features that started from a kept point instead of the input."""

    features: "FeatureStore"
    precision: str
    reused: int = 0
    computed: int = 0
    resumed: int = 0
    forks: set[tuple[str, ...]] = field(default_factory=set)

    _paths: dict[tuple[tuple[str, ...], str], Any] = field(default_factory=dict)

    def key(self, path: list[str] | tuple[str, ...], chunk: str, kind: str) -> str:
        """``store.features.feature_key`` of a block path and chunk (the path's hash state reused)."""

        at = (tuple(path), kind)
        if at not in self._paths:
            self._paths[at] = path_hasher(at[0], f"{self.precision}|{kind}")
        h = self._paths[at].copy()
        add_field(h, chunk)
        return str(h.hexdigest())

    def note_forks(self, group: list[Candidate], data: "torch.Tensor") -> None:
        """Add the forks of ``group`` (this search's candidates on a rung) to the kept points."""
        item = data[:1].numel() * data.element_size()
        lasts = [c.sizes[c.count - 2] for c in group if c.sizes is not None and c.count >= 2]
        self.forks |= fork_paths(group, max([item, *lasts]))

    def _start(self, c: Candidate, hs: list[str], starts: dict[tuple[str, ...], "torch.Tensor | None"]
               ) -> tuple[str, ...] | None:
        """The deepest path of ``c`` (its last block's input first) kept for every chunk of ``hs``
        (``starts``: paths looked up so far, None where some chunk's output is absent or damaged)."""
        import torch

        assert c.ids is not None
        for d in range(c.count - 1, 0, -1):
            path = tuple(c.ids[:d])
            if path not in starts:
                keys = [self.key(path, h, "raw") for h in hs]
                got = [self.features.get(k) for k in keys] if all(k in self.features for k in keys) else [None]
                starts[path] = None if any(t is None for t in got) else torch.cat(got)  # type: ignore[arg-type]
            if starts[path] is not None:
                return path
        return None

    def extract(self, group: list[Candidate], data: "torch.Tensor", segments: list["torch.Tensor"],
                hashes: list[str], *, shared: bool, batch_size: int, device: str, budget: int | None, meter: Meter,
                emit: Callable[[dict[str, Any]], None],
                resident: dict[tuple[str, ...], Any]) -> list[dict[Hashable, "torch.Tensor"]]:
        """Features of ``group`` per segment (one chunk each: the indices of its items in ``data``):
        kept ones read, the rest computed (from the deepest point of a candidate's path kept for
        every segment that needs it: its last-block input or a fork) and kept, with the outputs at
        the candidates' last-block inputs and the search's forks. Only the items of computed chunks
        are gathered."""
        t0 = time.perf_counter()
        if shared:
            self.note_forks(group, data)
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
            starts: dict[tuple[str, ...], torch.Tensor | None] = {}
            resume: dict[tuple[str, ...], list[Candidate]] = {}
            for name in names:
                c = by_name[name]
                path = self._start(c, hs, starts) if shared else None
                if path is None:
                    full.append(c)
                else:
                    resume.setdefault(path, []).append(c)
            bounds, at = [], 0
            for s in segs:
                bounds.append((at, at + len(s)))
                at += len(s)
            results: list[dict[Hashable, torch.Tensor]] = [{} for _ in segs]
            taps = []
            if full and shared:
                taps.append(self._tap(full, bounds))
                self._merge(results, extract_shared(full, segs, batch_size=batch_size, device=device, budget=budget,
                                                    host_budget=budget, meter=meter, progress=emit,
                                                    resident=resident, tap=taps[-1]))
            elif full:
                for c in full:
                    feats = extract_whole(c, segs, batch_size=batch_size, device=device, meter=meter)
                    self._merge(results, [{c.name: f} for f in feats])
            for path, cs in resume.items():
                taps.append(self._tap(cs, bounds))
                self._merge(results, extract_shared(cs, segs, batch_size=batch_size, device=device, budget=budget,
                                                    host_budget=budget, meter=meter, progress=emit,
                                                    resident=resident, from_depth=len(path), inputs=starts[path],
                                                    tap=taps[-1]))
                self.resumed += len(cs) * len(segs)
            keep = [(self.key(p, hs[j], "raw"), t) for tap in taps for (p, j), t in tap.got.items()]
            for j, res in enumerate(results):
                for name, f in res.items():
                    ids = by_name[name].ids
                    assert ids is not None
                    keep.append((self.key(ids, hs[j], "features"), f))
                    out[idx[j]][name] = f
                    self.computed += 1
            self.features.put(keep)
        return out

    def _tap(self, cands: list[Candidate], bounds: list[tuple[int, int]]) -> _Collect:
        """Keeps the candidates' last-block inputs and the search's forks on their paths."""
        lasts = {tuple(c.ids[: c.count - 1]) for c in cands if c.ids is not None and c.count >= 2}
        return _Collect(lasts | self.forks, bounds)

    def score_key(self, ids: list[str], train: list[str], test: list[str], labels: bytes, proxy: str,
                  seed: int) -> str:
        """Key of a proxy score: the proxy, its seed, the labels and the keys of every feature it
        trains and tests on (a proxy's score does not depend on the other candidates it is trained
        beside, see ``proxies.score_many``)."""
        h = hashlib.sha256(b"mm-proxy-score/3")  # /3: the linear proxy's fused Adam and (classes, rows) logits
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
