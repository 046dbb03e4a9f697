"""Kept search features (the model lake): block outputs a search computed, reused by later searches.

A feature is one block output over one data chunk, keyed by ``feature_key`` (the block path's
content ids + the chunk's content hash + the precision it was computed at). Features are packed
into ordinary verified objects (one per block path and write), each holding many chunks; an index
object names, per key, the object and the byte range, and ``refs/features/index@1`` names the index.
A reader fetches and hashes only the object chunks a range touches (S3: ranged GETs).

Features are a cache, never a source of truth: a feature whose object is missing, corrupt or does
not match its index entry is dropped and recomputed, never used. Two searches writing at once may
each drop the other's new entries from the index (their objects are collected by ``gc``); nothing
is ever wrong, at worst recomputed. A byte budget is kept by evicting the least recently used
objects. Every feature object's payload starts with ``PAYLOAD_MAGIC``, so no model object can ever
share its id and eviction only ever deletes feature objects.

Hashes prove that bytes are the ones an entry names, not that they are the block's output: anyone
who can write to a store can key made-up features to a real block and chunk, and a search reusing
them would rank wrongly without an error. So every entry is *sealed* (an HMAC of the entry, its
object and byte range) with the writer's secret (``writer_key``: per user, or a team's shared
``MM_JUPYTER_FEATURE_KEY``), and a search reuses only entries sealed with its own secret — or
every entry of a store opened with ``trust_code=True``, whose writers are trusted as one's own code.
An entry sealed otherwise is *foreign*: left in the index, never read, and replaced where this
search computes the same feature.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Protocol, Sequence

from ..errors import IntegrityError, MMError, StoreError
from .limits import loads
from .objects import is_oid

if TYPE_CHECKING:
    import torch

    from .contracts import ObjectArea, Reader


class Writable(Protocol):
    """What kept features need of a store (``mm.Store``): its object area, its save lock and whether
    its writers are trusted (``trust_code``: their features are reused whoever sealed them)."""

    objects: "ObjectArea"
    trust_code: bool

    def writing(self, what: str) -> AbstractContextManager[None]: ...

KIND = "features"
INDEX_NAME = "index"
INDEX_MAGIC = b"MMFEATURES-INDEX\x00\x01\n"
PAYLOAD_MAGIC = b"MMFEATURES-DATA\x00\x01\n"
_ALIGN = 64
#: seconds within which a read does not refresh a feature's last use (and so needs no index write)
TOUCH_S = 60.0
#: default byte budget of a store's kept features
DEFAULT_BUDGET = 4 << 30
_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
           "complex64", "complex128")


#: a team's shared secret: searches of every user who sets it reuse each other's kept features
KEY_ENV = "MM_JUPYTER_FEATURE_KEY"
#: where the per-user secret lives (default: ``$XDG_CONFIG_HOME/mm_jupyter``, else ``~/.config/mm_jupyter``)
CONFIG_ENV = "MM_JUPYTER_CONFIG_DIR"
_KEY_FILE = "feature-key"
_PROCESS_KEY = secrets.token_bytes(32)  # where no per-user secret can be kept: this process's features only


def key_path() -> Path:
    """The file holding this user's secret (``writer_key``)."""
    chosen = os.environ.get(CONFIG_ENV)
    if chosen:
        return Path(chosen).expanduser() / _KEY_FILE
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "mm_jupyter" / _KEY_FILE


def writer_key() -> bytes:
    """The secret that seals the features this process keeps (see the module docstring):
    ``$MM_JUPYTER_FEATURE_KEY`` when set (a team's), else the user's own, made on first use in
    ``key_path()`` (owner-only). Without a usable home folder, a key of this process only: its
    features are reused by its own searches, never silently by others.

    Raises:
        StoreError: the key file exists but does not hold a key (delete it to make a new one).
    """
    shared = os.environ.get(KEY_ENV)
    if shared:
        return hashlib.sha256(b"mm-feature-key/1\n" + shared.encode()).digest()
    path = key_path()
    raw: bytes | None
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raw = _make_key(path)
    except OSError:
        raw = None
    if raw is None:
        return _PROCESS_KEY
    text = raw.strip()
    if len(text) != 64 or any(c not in b"0123456789abcdef" for c in text):
        raise StoreError(f"{path} does not hold a feature key (64 hex digits): delete it, and a new key "
                         "is made (features kept under the old one are then computed again)")
    return bytes.fromhex(text.decode())


def _make_key(path: Path) -> bytes | None:
    """Write a new key to ``path`` unless another process did first (then read theirs): the key is
    written to a private temp file and linked into place, so no reader sees a half-written key.
    None where the folder cannot hold it."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.write(fd, secrets.token_hex(32).encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, path)
        except FileExistsError:  # another process made the key first: theirs is read below
            pass
        finally:
            tmp.unlink()
        return path.read_bytes()
    except OSError:
        return None


def seal(secret: bytes, key: str, e: "Entry") -> str:
    """The seal of index entry ``e`` under ``key``: what it names (object, range, dtype, shape), so a
    sealed entry cannot be pointed at other bytes. Not its ``used`` time, which readers update."""
    msg = f"{key}|{e.oid}|{e.offset}|{e.nbytes}|{e.dtype}|{','.join(map(str, e.shape))}".encode()
    return hmac.digest(secret, msg, "sha256")[:16].hex()


def feature_key(path: Sequence[str], chunk: str, precision: str) -> str:
    """sha256 hex of a block path (content ids from the input), a chunk's content hash and the
    precision tag: equal keys mean bit-identical outputs."""
    h = path_hasher(path, precision)
    add_field(h, chunk)
    return str(h.hexdigest())


def path_hasher(path: Sequence[str], precision: str) -> Any:
    """The hash state of ``feature_key`` before its chunk (copy it to key many chunks of one path)."""
    h = hashlib.sha256(b"mm-feature/2\n")
    for part in (precision, "|", *path, "|"):
        add_field(h, part)
    return h


def add_field(h: Any, part: str) -> None:
    """A length-prefixed field (no two field sequences hash alike)."""
    raw = part.encode()
    h.update(len(raw).to_bytes(8, "little"))
    h.update(raw)


@dataclass
class Entry:
    """Where one feature lives: ``nbytes`` at ``offset`` of object ``oid``'s payload."""

    oid: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    used: float
    seal: str = ""  # see ``seal``; "" in an index written before entries were sealed (foreign)


def _check_entry(raw: Any) -> Entry:
    """An index entry, every field checked (an index is read from a store: trust nothing)."""
    if not isinstance(raw, list) or len(raw) not in (6, 7):
        raise IntegrityError("the feature index has a malformed entry")
    oid, offset, nbytes, dtype, shape, used = raw[:6]
    sealed = raw[6] if len(raw) == 7 else ""
    ok = (isinstance(oid, str) and is_oid(oid) and type(offset) is int and type(nbytes) is int
          and 0 <= offset and 0 <= nbytes and dtype in _DTYPES and isinstance(shape, list)
          and all(type(s) is int and s >= 0 for s in shape) and len(shape) <= 16
          and isinstance(used, (int, float)) and isinstance(sealed, str) and len(sealed) <= 64)
    if not ok:
        raise IntegrityError("the feature index has a malformed entry")
    return Entry(oid, offset, nbytes, dtype, tuple(shape), float(used), sealed)


def _torch_dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, name)  # type: ignore[no-any-return]  # name is one of _DTYPES


class FeatureStore:
    """The kept features of one store, for one search: ``get`` / ``put`` during it, ``flush`` at its
    end (eviction under ``budget`` bytes, then one index write)."""

    def __init__(self, store: Writable, budget: int | None = None) -> None:
        self.store = store
        self.objects: ObjectArea = store.objects
        self.budget = DEFAULT_BUDGET if budget is None else int(budget)
        self.entries = load_index(self.objects)
        self._secret = writer_key()
        self._trusting = bool(getattr(store, "trust_code", False))
        self._verdicts: dict[str, bool] = {}  # key -> whether its entry is this writer's (see ``_ours``)
        self._readers: dict[str, Reader] = {}
        self._bad: set[str] = set()
        self.added: set[str] = set()
        self.hits = self.misses = self.corrupt = self.written_bytes = 0
        #: entries met that another writer sealed (never read; see the module docstring)
        self.foreign = 0
        self._stamped: dict[str, bool] = {}  # object -> whether the bytes kept in memory are still its own
        self.touched = False
        # a search's feature objects are made durable together at ``flush`` (one journal commit, not
        # a file and folder fsync per put); until then they are readable, and a crash leaves at worst
        # objects that fail verification or are missing: features are only a cache, dropped and recomputed
        self._deferred = ExitStack()
        self._deferred.enter_context(self.objects.deferred_durability())

    def __contains__(self, key: str) -> bool:
        e = self.entries.get(key)
        return e is not None and e.oid not in self._bad and self._ours(key, e)

    def _ours(self, key: str, e: Entry) -> bool:
        """Whether ``e`` may be read: sealed with this writer's secret, or the store is trusted."""
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._trusting or self._sealed_here(key, e)
            self._verdicts[key] = verdict
            self.foreign += not verdict
        return verdict

    def get(self, key: str) -> "torch.Tensor | None":
        """The verified feature, or None (absent, another writer's, or its object is missing or
        corrupt: dropped)."""
        import torch

        e = self.entries.get(key)
        if e is None or e.oid in self._bad or not self._ours(key, e):
            self.misses += 1
            return None
        try:
            size = 1
            for s in e.shape:
                size *= s
            dtype = _torch_dtype(e.dtype)
            if size * dtype.itemsize != e.nbytes:
                raise IntegrityError(f"feature object {e.oid[:12]}… does not match its index entry")
            out = torch.empty(e.nbytes, dtype=torch.uint8)
            kept = self._recall(e)
            if kept is not None:
                out.copy_(kept)
            else:
                reader = self._readers.get(e.oid)
                if reader is None:
                    reader = self._readers[e.oid] = self.objects.open(e.oid)
                if e.offset + e.nbytes > reader.size:
                    raise IntegrityError(f"feature object {e.oid[:12]}… does not match its index entry")
                if e.nbytes:
                    out.copy_(reader.tensor(e.offset, e.nbytes))
        except (IntegrityError, StoreError, OSError):
            self._drop(e.oid)
            self.misses += 1
            return None
        now = time.time()
        if now - e.used > TOUCH_S:  # recency is kept to the minute: a search that only reads rarely writes
            e.used = now
            self.touched = True
        self.hits += 1
        return out.view(dtype).reshape(e.shape)

    def _recall(self, e: Entry) -> "torch.Tensor | None":
        """The bytes of ``e`` as this process wrote them, while its object's stamp is the one they
        were written under (checked once per object and search); None otherwise."""
        with _RECENT_LOCK:
            held = _RECENT.get(e.oid)
            part = None if held is None else held[1].get((e.offset, e.nbytes))
            if part is None:
                return None
            _RECENT.move_to_end(e.oid)
        if e.oid not in self._stamped:
            self._stamped[e.oid] = self.objects.stamp(e.oid) == held[0]  # type: ignore[index]
        return part if self._stamped[e.oid] else None

    def _drop(self, oid: str) -> None:
        """Forget every feature of a damaged or missing object (recomputed; the object is deleted)."""
        global _RECENT_HELD
        with _RECENT_LOCK:
            held = _RECENT.pop(oid, None)
            _RECENT_HELD -= 0 if held is None else held[2]
        self.corrupt += 1
        self._bad.add(oid)
        reader = self._readers.pop(oid, None)
        if reader is not None:
            reader.close()
        for key in [k for k, e in self.entries.items() if e.oid == oid]:
            del self.entries[key]

    def put(self, items: Iterable[tuple[str, "torch.Tensor"]]) -> None:
        """Keep features (one object for all of them). Keys already kept are skipped, and so are
        tensors of a dtype or layout the index does not describe (they are simply recomputed)."""
        import torch

        todo = [(k, t.detach().cpu().contiguous()) for k, t in items
                if k not in self and str(t.dtype).removeprefix("torch.") in _DTYPES and t.layout == torch.strided]
        if not todo:
            return
        placed = []
        at = _ALIGN
        for key, t in todo:
            nbytes = t.numel() * t.element_size()
            placed.append((key, at, nbytes, str(t.dtype).removeprefix("torch."), tuple(t.shape)))
            at += nbytes + (-nbytes % _ALIGN)
        magic = torch.tensor(list(PAYLOAD_MAGIC), dtype=torch.uint8)

        def fill(dst: "torch.Tensor", progress: Callable[[int], None]) -> None:
            """The payload written once, straight into the object (no joined copy of it in memory)."""
            dst[:_ALIGN].zero_()
            dst[: len(magic)].copy_(magic)
            for (_, offset, nbytes, _, _), (_, t) in zip(placed, todo):
                end = offset + nbytes + (-nbytes % _ALIGN)
                if nbytes:
                    dst[offset : offset + nbytes].copy_(t.reshape(-1).view(torch.uint8))
                dst[offset + nbytes : end].zero_()
                progress(end)

        try:
            with self.store.writing("search features"):
                oid = self.objects.put_filled(at, fill).oid
        except StoreError:
            return  # a read-only store: the features are simply not kept
        now = time.time()
        self._bad.discard(oid)
        for key, offset, nbytes, dtype, shape in placed:
            e = self.entries[key] = Entry(oid, offset, nbytes, dtype, shape, now)
            e.seal = seal(self._secret, key, e)
            self._verdicts[key] = True
            self.added.add(key)
            self.written_bytes += nbytes
        stamp = self.objects.stamp(oid)
        if stamp is not None:
            _remember(oid, stamp, [(offset, t) for (_, offset, _, _, _), (_, t) in zip(placed, todo)])

    def _prefer(self, key: str, new: Entry, old: Entry) -> bool:
        """Whether the index keeps ``new`` rather than ``old`` for ``key``: this writer's entry over
        another's (whose ``used`` time could claim any date), else the later used."""
        if new.seal != old.seal:  # (equal seals: the same claim, no secret needed to compare)
            mine, theirs = self._sealed_here(key, new), self._sealed_here(key, old)
            if mine != theirs:
                return mine
        return old.used < new.used

    def _sealed_here(self, key: str, e: Entry) -> bool:
        return hmac.compare_digest(e.seal, seal(self._secret, key, e))

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def flush(self) -> None:
        """Make this search's feature objects durable, merge with the index as stored now (another
        search may have written since), evict the least recently used objects down to the budget,
        and write the index."""
        self.close()
        try:
            self._deferred.close()  # fsyncs what ``put`` published
        except (StoreError, OSError):  # not durable (and maybe removed): never named by the index
            lost = {self.entries[k].oid for k in self.added if k in self.entries}
            self._bad |= lost
            self.entries = {k: e for k, e in self.entries.items() if e.oid not in lost}
            self.added.clear()
        if not (self.added or self.touched or self._bad) and not over_budget(self.entries, self.budget):
            return
        try:
            with self.store.writing("the feature index"):
                stored = load_index(self.objects)
                merged = {k: e for k, e in stored.items() if e.oid not in self._bad}
                for k, e in self.entries.items():
                    old = merged.get(k)
                    if old is None or self._prefer(k, e, old):
                        merged[k] = e
                doomed = over_budget(merged, self.budget)
                for oid in doomed:
                    self.objects.delete(oid)
                merged = {k: e for k, e in merged.items() if e.oid not in doomed}
                write_index(self.objects, merged)
                self.entries = merged
        except StoreError:
            return


def over_budget(entries: dict[str, Entry], budget: int) -> set[str]:
    """Objects to evict, least recently used first, until the rest fit ``budget`` bytes."""
    size: dict[str, int] = {}
    used: dict[str, float] = {}
    for e in entries.values():
        size[e.oid] = max(size.get(e.oid, 0), e.offset + e.nbytes)
        used[e.oid] = max(used.get(e.oid, 0.0), e.used)
    total = sum(size.values())
    doomed: set[str] = set()
    for oid in sorted(size, key=lambda o: (used[o], o)):
        if total <= budget:
            break
        doomed.add(oid)
        total -= size[oid]
    return doomed


def load_index(objects: "ObjectArea") -> dict[str, Entry]:
    """The stored index (empty when there is none or it is damaged: features are only a cache).
    An index object parsed before in this process is not parsed again: its id is the hash of its
    bytes, so the same id is the same index (every search of a store starts with this read)."""
    oid = objects.read_ref(KIND, INDEX_NAME, 1)
    if oid is None:
        return {}
    with _INDEXES_LOCK:
        kept = _INDEXES.get(oid)
        if kept is not None:
            _INDEXES.move_to_end(oid)
    if kept is None:
        kept = _parse_index(objects, oid)
        if kept is None:  # (a failure is not remembered: the next read tries again)
            return {}
        if len(kept) <= INDEX_MEMO:
            with _INDEXES_LOCK:
                _INDEXES[oid] = kept
                while sum(len(v) for v in _INDEXES.values()) > INDEX_MEMO:
                    _INDEXES.popitem(last=False)
    return {k: Entry(e.oid, e.offset, e.nbytes, e.dtype, e.shape, e.used, e.seal) for k, e in kept.items()}


def _parse_index(objects: "ObjectArea", oid: str) -> dict[str, Entry] | None:
    try:
        payload = objects.get(oid)
        if not payload.startswith(INDEX_MAGIC):
            raise IntegrityError("not a feature index")
        raw = loads(payload[len(INDEX_MAGIC):], "the feature index")
        if not isinstance(raw, dict) or not isinstance(raw.get("entries"), dict):
            raise IntegrityError("the feature index is malformed")
        return {k: _check_entry(v) for k, v in raw["entries"].items() if isinstance(k, str) and len(k) == 64}
    except (MMError, ValueError, TypeError, OSError):
        return None


def _remember(oid: str, stamp: Hashable, parts: list[tuple[int, "torch.Tensor"]]) -> None:
    """Keep a copy of features this process just wrote into ``oid`` (stamped ``stamp``): a search
    run again in the same process reads them from memory instead of mapping and hashing the object
    (``FeatureStore._recall``); at most ``RECENT_BYTES`` in all, the least recently used go first."""
    import torch

    nbytes = sum(t.numel() * t.element_size() for _, t in parts)
    if nbytes > RECENT_BYTES:
        return
    copies = {(offset, t.numel() * t.element_size()): t.reshape(-1).view(torch.uint8).clone() for offset, t in parts}
    global _RECENT_HELD
    with _RECENT_LOCK:
        old = _RECENT.pop(oid, None)
        _RECENT_HELD -= 0 if old is None else old[2]
        _RECENT[oid] = (stamp, copies, nbytes)
        _RECENT_HELD += nbytes
        while _RECENT_HELD > RECENT_BYTES:
            _, (_, _, freed) = _RECENT.popitem(last=False)
            _RECENT_HELD -= freed


#: bytes of recently written features kept in memory (``_remember``)
RECENT_BYTES = 256 << 20
_RECENT: "OrderedDict[str, tuple[Hashable, dict[tuple[int, int], torch.Tensor], int]]" = OrderedDict()
_RECENT_HELD = 0
_RECENT_LOCK = threading.Lock()


#: index entries remembered by ``load_index`` (by the index object's id), at most this many in all
INDEX_MEMO = 100_000
_INDEXES: "OrderedDict[str, dict[str, Entry]]" = OrderedDict()
_INDEXES_LOCK = threading.Lock()


def write_index(objects: "ObjectArea", entries: dict[str, Entry]) -> None:
    """Store the index as an object, point the ref at it, and delete the index it replaces."""
    old = objects.read_ref(KIND, INDEX_NAME, 1)
    body = {"entries": {k: [e.oid, e.offset, e.nbytes, e.dtype, list(e.shape), e.used, e.seal]
                        for k, e in sorted(entries.items())}}
    oid = objects.put(INDEX_MAGIC + json.dumps(body, separators=(",", ":")).encode()).oid
    objects.write_ref(KIND, INDEX_NAME, 1, oid)
    if old is not None and old != oid and is_oid(old):
        objects.delete(old)


def live_objects(objects: "ObjectArea") -> set[str]:
    """The index and every object it names (what ``gc`` keeps unless asked to free features)."""
    oid = objects.read_ref(KIND, INDEX_NAME, 1)
    if oid is None:
        return set()
    return {oid} | {e.oid for e in load_index(objects).values()}


def drop_all(objects: "ObjectArea") -> None:
    """Forget every kept feature (``gc(features=True)``: their objects are then collected)."""
    objects.remove_ref(KIND, INDEX_NAME, 1)


__all__ = ["DEFAULT_BUDGET", "KEY_ENV", "Entry", "FeatureStore", "add_field", "drop_all", "feature_key", "key_path",
           "live_objects", "load_index", "path_hasher", "seal", "writer_key"]
