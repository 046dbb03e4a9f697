"""Content-addressed object area: ``objects/<2 hex>/<64 hex>``, written atomically, verified on read.

File format (little endian)::

    magic "MMOBJ\\x01\\0\\0" | u64 payload bytes | u32 chunk bytes | u32 chunks
    | chunks x 16-byte sha256 prefixes of the payload chunks | zero padding to 64 | payload

The object id is the sha256 of that header, so it covers every payload byte through the chunk
digests. Chunks let a reader verify only the part it touches: recovering one model of a large set
hashes the chunk(s) holding that model, not the whole set. The chunk count is capped at 128 so the
header costs at most ~2 KiB per object; identical payloads always get identical ids (dedup).
"""
from __future__ import annotations

import hashlib
import mmap
import os
import stat
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable, Iterator

import numpy as np

from ..errors import IntegrityError, StoreError
from . import refs
from .basetypes import REF_KINDS, PutResult
from .contracts import ObjectArea
from .files import UNSUPPORTED, TempFile, clean_temp, fsync_path, open_regular, os_error

if TYPE_CHECKING:
    import torch

MAGIC = b"MMOBJ\x01\x00\x00"
FIXED = struct.Struct("<8sQII")
DIGEST_BYTES = 16
MAX_CHUNKS = 128
MIN_CHUNK = 64 * 1024
_PAGE = 4096
_PARALLEL_HASH_BYTES = 8 * 1024 * 1024
_MAP_AT_LEAST = 1024 * 1024
_COMPARE_WINDOW = 4 * 1024 * 1024


def align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def chunk_size_for(nbytes: int) -> int:
    """Chunk size for a payload: at least 64 KiB, at most 128 chunks, page aligned."""
    return max(MIN_CHUNK, align(-(-nbytes // MAX_CHUNKS), _PAGE))


def header_size_for(nbytes: int) -> int:
    chunks = -(-nbytes // chunk_size_for(nbytes))
    return align(FIXED.size + DIGEST_BYTES * chunks, 64)


def _chunk_digests(payload: memoryview, chunk: int) -> list[bytes]:
    n = len(payload)
    spans = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]

    def one(span: tuple[int, int]) -> bytes:
        return hashlib.sha256(payload[span[0] : span[1]]).digest()[:DIGEST_BYTES]

    if n >= _PARALLEL_HASH_BYTES and len(spans) > 1:
        # hashlib releases the GIL on large buffers: two cores hash twice as fast.
        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(one, spans))
    return [one(s) for s in spans]



def _durable_or_gone(path: Path, sync: Callable[[], None]) -> None:
    """Run ``sync`` (an fsync of the object at ``path``); when it fails, remove the object before the
    error goes on. A failed fsync (ENOSPC, EIO) may have dropped the file's pages while a later fsync
    of the same file reports success (Linux reports a write-back error once): left in place, the
    object could be taken by a save of the same bytes, which compares the cached bytes, fsyncs
    without an error and commits a reference to data the disk never got."""
    try:
        sync()
    except OSError:
        path.unlink(missing_ok=True)
        raise

class _ChunkHasher:
    """Hashes a payload's chunks on a worker thread as soon as the filler has passed them."""

    def __init__(self, payload: memoryview) -> None:
        self.payload = payload
        self.chunk = chunk_size_for(len(payload))
        self.count = -(-len(payload) // self.chunk)
        self._next = 0
        # payloads under 8 MiB are hashed inline: starting a thread costs more than it saves there
        self._pool = (ThreadPoolExecutor(max_workers=1)
                      if self.count > 1 and len(payload) >= _PARALLEL_HASH_BYTES else None)
        self._futures: list[Future[bytes]] = []

    def _one(self, c: int) -> bytes:
        view = self.payload[c * self.chunk : (c + 1) * self.chunk]
        try:
            return hashlib.sha256(view).digest()[:DIGEST_BYTES]
        finally:
            view.release()

    def advance(self, done: int) -> None:
        full = min(done // self.chunk, self.count)
        while self._next < full and self._pool is not None:
            self._futures.append(self._pool.submit(self._one, self._next))
            self._next += 1

    def finish(self) -> list[bytes]:
        if self._pool is None:
            return [self._one(c) for c in range(self.count)]
        self.advance(len(self.payload) + self.chunk)
        return [f.result() for f in self._futures]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def header_of(payload: memoryview) -> bytes:
    """The header of ``payload`` (its id is the header's sha256)."""
    n = len(payload)
    chunk = chunk_size_for(n)
    digests = _chunk_digests(payload, chunk)
    return _pack_header(n, chunk, digests, align(FIXED.size + DIGEST_BYTES * len(digests), 64))


def is_oid(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


class FolderObjects(ObjectArea):
    """The object area of one store folder. Thread- and process-safe by construction:
    every object is written to a unique, locked temp file and renamed into place.

    Creating the object store touches nothing on disk: reading a store never writes.
    """

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = Path(root)
        self.location = str(self.root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self._deferred = threading.local()  # .paths: objects published in a deferred_durability scope

    def prepare(self) -> None:
        """Create the folders a writer needs (on the first save of a store)."""
        for folder in (self.objects, self.tmp, *(refs.folder(self.root, k) for k in REF_KINDS)):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                raise StoreError(f"{folder} exists and is not a folder") from None
            except OSError as e:
                raise os_error(e, folder, 4096) from None

    def path(self, oid: str) -> Path:
        if not isinstance(oid, str) or not is_oid(oid):
            raise IntegrityError(f"not an object id: {oid!r}")
        return self.objects / oid[:2] / oid

    def exists(self, oid: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self.path(oid)).st_mode)
        except FileNotFoundError:
            return False

    def _already_stored(self, oid: str, header: bytes, payload: Callable[[int, int], bytes | memoryview]) -> bool:
        """True when an intact copy exists: skip the write. Intact means the same header (the id is
        its hash) and the same payload bytes as the caller's (``payload(offset, n)`` gives them),
        compared, not re-hashed: the caller's bytes were hashed moments ago. The comparison reads the
        copy window by window into one buffer and compares with numpy (memory speed: ~50 ms for
        100 MB, where fresh ``bytes`` per window took ~130 ms and a re-hash ~70 ms). The copy is then
        fsynced, since it may be a concurrent writer's, renamed into place before its own fsync
        (``_publish``). A damaged copy (wrong size, header or payload, or a special file in its
        place) is replaced by the caller's good bytes: re-saving repairs bit rot."""
        try:
            fd = open_regular(self.path(oid))
        except (FileNotFoundError, IntegrityError):
            return False
        try:
            nbytes = os.fstat(fd).st_size - len(header)
            if nbytes < 0 or os.pread(fd, len(header), 0) != header or nbytes != FIXED.unpack_from(header)[1]:
                return False
            stored = _window_reader(fd, len(header))
            for at in range(0, nbytes, _COMPARE_WINDOW):
                n = min(_COMPARE_WINDOW, nbytes - at)
                if not np.array_equal(np.frombuffer(stored(at, n), np.uint8), np.frombuffer(payload(at, n), np.uint8)):
                    return False
            os.fsync(fd)
            return True
        finally:
            os.close(fd)

    def _publish(self, tmp: TempFile, oid: str) -> None:
        """Rename a filled temp file into place, then make it durable: fsync the file, then its
        folder. Renaming first lets one journal commit carry the data, the inode and the new name
        (ext4, XFS: the folder's fsync then finds nothing left to commit), where fsync, rename,
        fsync paid two; a small save has several objects. Nothing refers to the object before the
        catalog commit, which comes after, and a concurrent writer that finds it early fsyncs it
        itself (``_already_stored``); a crash in between leaves an unreferenced object that fails
        verification, which the next save of the same bytes replaces and ``gc`` removes."""
        final = self.path(oid)
        folder = final.parent
        if not folder.is_dir():
            folder.mkdir(exist_ok=True)
            fsync_path(self.objects)
        os.replace(tmp.path, final)
        pending: list[Path] | None = getattr(self._deferred, "paths", None)
        if pending is not None:
            pending.append(final)  # made durable by make_durable, before the catalog commit
            return
        _durable_or_gone(final, lambda: os.fsync(tmp.fileno()))
        fsync_path(folder)

    @contextmanager
    def deferred_durability(self) -> Iterator[None]:
        """Objects published in this scope are fsynced together by ``make_durable`` (file by file,
        then each folder once): the first fsync's journal commit carries every object's data and
        name, the rest find nothing left to commit. A scope left by an exception syncs nothing: its
        objects are unreferenced (a concurrent writer relying on one fsyncs it, ``_already_stored``)."""
        if getattr(self._deferred, "paths", None) is not None:  # nested: the outer scope syncs
            yield
            return
        self._deferred.paths = []
        try:
            yield
            self.make_durable()
        finally:
            self._deferred.paths = None

    def make_durable(self) -> None:
        pending: list[Path] | None = getattr(self._deferred, "paths", None)
        if not pending:
            return
        try:
            for path in pending:
                _durable_or_gone(path, lambda: fsync_path(path))  # noqa: B023 - called at once
            for folder in dict.fromkeys(path.parent for path in pending):
                fsync_path(folder)
        except OSError as e:
            raise os_error(e, self.root, 0, "an object") from None
        pending.clear()

    def put(self, data: bytes | bytearray | memoryview) -> PutResult:
        """Store bytes; returns the existing object when the same payload is already stored."""
        payload = memoryview(data).cast("B")
        header = header_of(payload)
        oid = hashlib.sha256(header).hexdigest()
        total = len(header) + len(payload)
        if self._already_stored(oid, header, lambda at, n: payload[at : at + n]):
            return PutResult(oid, total, False)
        try:
            tmp = TempFile(self.tmp)
            try:
                tmp.file.write(header)
                tmp.file.write(payload)
                tmp.file.flush()
                self._publish(tmp, oid)
            finally:
                tmp.close()
        except OSError as e:
            raise os_error(e, self.root, total, "an object") from None
        return PutResult(oid, total, True)

    def put_filled(self, nbytes: int, fill: Callable[["torch.Tensor", Callable[[int], None]], None]) -> PutResult:
        """Store ``nbytes`` produced by ``fill(dst, progress)``: ``dst`` is a uint8 tensor mapped
        onto the temp file (the payload is written once, straight into the page cache), and
        ``fill`` calls ``progress(bytes_done)`` now and then so finished chunks are hashed on a
        second thread while it goes on filling.

        The file's blocks are allocated (``posix_fallocate``) before it is mapped: writing through
        a mapping of unallocated blocks would kill the process with SIGBUS when the disk is full.
        Where the file system cannot allocate ahead, ``dst`` is a memory buffer written with plain
        ``write()`` calls, whose failures are ordinary errors."""
        if nbytes == 0:
            return self.put(b"")
        hsize = header_size_for(nbytes)
        total = hsize + nbytes
        try:
            tmp = TempFile(self.tmp)
            try:
                if _allocate(tmp.fileno(), total):
                    header = self._fill_mapped(tmp, hsize, nbytes, fill)
                else:
                    header = self._fill_written(tmp, hsize, nbytes, fill)
                oid = hashlib.sha256(header).hexdigest()
                fd = tmp.fileno()
                if self._already_stored(oid, header, _window_reader(fd, hsize)):
                    return PutResult(oid, total, False)
                self._publish(tmp, oid)  # its fsync writes back the mapping's dirty pages too
            finally:
                tmp.close()
        except OSError as e:
            raise os_error(e, self.root, total, "an object") from None
        return PutResult(oid, total, True)

    @staticmethod
    def _fill_mapped(tmp: TempFile, hsize: int, nbytes: int, fill: Callable[..., None]) -> bytes:
        import torch

        with mmap.mmap(tmp.fileno(), hsize + nbytes) as mm:
            payload = memoryview(mm)[hsize:]
            hasher = _ChunkHasher(payload)
            try:
                dst = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=hsize)
                fill(dst, hasher.advance)
                del dst
                digests = hasher.finish()
            finally:
                hasher.close()
                payload.release()
            header = _pack_header(nbytes, hasher.chunk, digests, hsize)
            mm[:hsize] = header
        return header

    @staticmethod
    def _fill_written(tmp: TempFile, hsize: int, nbytes: int, fill: Callable[..., None]) -> bytes:
        buf = fill_buffer(nbytes, fill)
        tmp.file.write(buf)
        tmp.file.flush()
        return bytes(buf[:hsize])

    def open(self, oid: str) -> "ObjectReader":
        """Open an object for verified reads; raises IntegrityError when it is missing or is
        not a regular file."""
        p = self.path(oid)
        try:
            return FolderReader(p, oid, self)
        except FileNotFoundError:
            raise IntegrityError(f"object {oid[:12]}… is missing from {self.objects}") from None

    def size(self, oid: str) -> int:
        return os.lstat(self.path(oid)).st_size

    def stamp(self, oid: str) -> Hashable | None:
        try:
            st = os.lstat(self.path(oid))
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def delete(self, oid: str) -> bool:
        try:
            self.path(oid).unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            raise os_error(e, self.path(oid)) from None

    def clean_temp(self, exclusive: bool = False) -> tuple[int, int]:
        """Remove temp files of writers that are gone; (files, bytes). See ``files.clean_temp``
        (a temp file's lock tells whether its writer is alive, so this is safe at any time)."""
        return clean_temp(self.tmp)

    def scan(self) -> Iterator[tuple[str, int]]:
        """(oid, bytes on disk) of every regular file named like an object."""
        for oid, _, size in self.scan_paths():
            yield oid, size

    def scan_paths(self) -> Iterator[tuple[str, Path, int]]:
        """(oid, path, bytes on disk) of every regular file named like an object."""
        try:
            fans = sorted(os.scandir(self.objects), key=lambda e: e.name)
        except FileNotFoundError:
            return
        for fan in fans:
            if len(fan.name) != 2 or not fan.is_dir(follow_symlinks=False):
                continue
            for entry in sorted(os.scandir(fan.path), key=lambda e: e.name):
                if not is_oid(entry.name) or entry.name[:2] != fan.name:
                    continue
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    yield entry.name, Path(entry.path), st.st_blocks * 512

    def payload_prefix(self, oid: str, n: int) -> bytes:
        """The first ``n`` payload bytes of an object, unverified (to tell manifests apart)."""
        fd = open_regular(self.path(oid))
        with os.fdopen(fd, "rb") as f:
            fixed = f.read(FIXED.size)
            if len(fixed) < FIXED.size:
                return b""
            magic, _, _, chunks = FIXED.unpack(fixed)
            if magic != MAGIC:
                return b""
            f.seek(align(FIXED.size + DIGEST_BYTES * chunks, 64))
            return f.read(n)

    # -- refs: refs/<kind>/<name>@<version> files beside the objects -------------------------------
    def write_ref(self, kind: str, name: str, version: int, oid: str) -> None:
        refs.write(self.root, kind, name, version, oid)

    def ref_names(self, kind: str) -> set[tuple[str, int]]:
        return refs.names(self.root, kind)

    def read_ref(self, kind: str, name: str, version: int) -> str | None:
        return refs.read(self.root, kind, name, version)

    def remove_ref(self, kind: str, name: str, version: int) -> None:
        refs.remove(self.root, kind, name, version)



def _window_reader(fd: int, start: int) -> Callable[[int, int], memoryview]:
    """``read(at, n)``: the ``n`` bytes of file ``fd`` at ``start + at`` (fewer at its end), read into
    one reused buffer; valid until the next call. The buffer is made at the first read, as large as
    it asks (a window at most): most readers are never called (a save of new bytes), and 4 MiB of
    fresh memory costs ~3 ms in page faults, more than a small save's whole payload."""
    buf = memoryview(b"")

    def read(at: int, n: int) -> memoryview:
        nonlocal buf
        if len(buf) < n:
            buf = memoryview(bytearray(n))
        return buf[: os.preadv(fd, [buf[:n]], start + at)]

    return read


def _allocate(fd: int, nbytes: int) -> bool:
    """Allocate the file's blocks; False where the file system cannot (then write, do not map).
    ENOSPC/EDQUOT propagate as OSError: there is not enough room."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return True
    except AttributeError:  # no posix_fallocate on this platform
        return False
    except OSError as e:
        if e.errno in UNSUPPORTED:
            return False
        raise


def _pack_header(nbytes: int, chunk: int, digests: list[bytes], hsize: int) -> bytes:
    raw = FIXED.pack(MAGIC, nbytes, chunk, len(digests)) + b"".join(digests)
    return raw + b"\x00" * (hsize - len(raw))


def fill_buffer(nbytes: int, fill: Callable[["torch.Tensor", Callable[[int], None]], None]) -> bytearray:
    """A whole object — header, then the ``nbytes`` payload ``fill(dst, progress)`` writes — in
    memory (chunks are hashed on a second thread while ``fill`` goes on): what a file system that
    cannot allocate ahead, or an upload, writes in one piece."""
    import torch

    hsize = header_size_for(nbytes)
    buf = bytearray(hsize + nbytes)
    payload = memoryview(buf)[hsize:]
    hasher = _ChunkHasher(payload)
    try:
        dst = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=hsize)
        fill(dst, hasher.advance)
        del dst
        digests = hasher.finish()
    finally:
        hasher.close()
        payload.release()
    buf[:hsize] = _pack_header(nbytes, hasher.chunk, digests, hsize)
    return buf


def parse_header(oid: str, header: bytes, stored_size: int) -> tuple[int, int, int, list[bytes]]:
    """(payload bytes, chunk bytes, header bytes, chunk digests) of an object whose stored copy
    has ``stored_size`` bytes and starts with ``header`` (at least the whole header); checks magic,
    id and size, so a reader never trusts an object it did not verify."""
    if len(header) < FIXED.size:
        raise IntegrityError(f"object {oid[:12]}… is truncated (no header)")
    magic, n, chunk, chunks = FIXED.unpack(header[: FIXED.size])
    if magic != MAGIC:
        raise IntegrityError(f"object {oid[:12]}… has a bad magic number")
    hsize = align(FIXED.size + DIGEST_BYTES * chunks, 64)
    if len(header) < hsize or hashlib.sha256(header[:hsize]).hexdigest() != oid:
        raise IntegrityError(f"object {oid[:12]}… header does not match its id")
    if stored_size != hsize + n:
        raise IntegrityError(f"object {oid[:12]}… has {stored_size} bytes on disk, expected {hsize + n}")
    digests = [bytes(header[FIXED.size + i * DIGEST_BYTES: FIXED.size + (i + 1) * DIGEST_BYTES])
               for i in range(chunks)]
    return n, chunk, hsize, digests


#: bytes of the largest possible header (128 chunk digests)
MAX_HEADER = align(FIXED.size + DIGEST_BYTES * MAX_CHUNKS, 64)


class ObjectReader:
    """A verified view of one object. Chunks are hashed the first time any byte of them is read;
    a mismatch raises IntegrityError naming the object and the chunk. ``_buf`` holds the whole
    stored object (header + payload); a subclass whose bytes are remote fills the chunks a read
    needs in ``_fetch`` before they are hashed."""

    _buf: "mmap.mmap | bytearray | None"

    def __init__(self, oid: str, owner: ObjectArea, header: bytes, stored_size: int) -> None:
        self.oid = oid
        self._owner = owner
        self.size, self._chunk, self._hsize, self._digests = parse_header(oid, header, stored_size)
        self._verified = bytearray(len(self._digests))
        self._lock = threading.Lock()

    def _fetch(self, chunks: list[int]) -> None:
        """Make the payload bytes of ``chunks`` present in ``_buf`` (local objects: always are)."""

    def _verify_range(self, offset: int, nbytes: int) -> None:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise IntegrityError(
                f"read of bytes {offset}..{offset + nbytes} is outside object {self.oid[:12]}… "
                f"({self.size} bytes)"
            )
        if nbytes == 0:
            return
        first, last = offset // self._chunk, (offset + nbytes - 1) // self._chunk
        todo = [c for c in range(first, last + 1) if not self._verified[c]]
        if not todo:
            return
        self._fetch(todo)
        assert self._buf is not None
        view = memoryview(self._buf)
        try:
            for c in todo:
                a = self._hsize + c * self._chunk
                b = min(a + self._chunk, self._hsize + self.size)
                got = hashlib.sha256(view[a:b]).digest()[:DIGEST_BYTES]
                if got != self._digests[c]:
                    raise IntegrityError(
                        f"object {self.oid[:12]}… is corrupt: chunk {c} (bytes {a - self._hsize}.."
                        f"{b - self._hsize}) does not match its hash"
                    )
                with self._lock:
                    self._verified[c] = 1
                self._owner.count_bytes(verified=b - a)
        finally:
            view.release()

    def verify(self) -> None:
        """Hash every chunk (used by full-set recovery and store.verify())."""
        if self.size:
            pending = [c for c in range(len(self._digests)) if not self._verified[c]]
            self._fetch(pending)  # remote bytes: every missing chunk in one batch of ranged reads
            if len(pending) > 1 and self.size >= _PARALLEL_HASH_BYTES:
                with ThreadPoolExecutor(max_workers=2) as pool:
                    list(pool.map(lambda c: self._verify_range(c * self._chunk, 1), pending))
            self._verify_range(0, self.size)

    def tensor(self, offset: int = 0, nbytes: int | None = None) -> "torch.Tensor":
        """Verified zero-copy uint8 tensor over payload bytes (copy-on-write mapping: writes to
        it never reach the file)."""
        import torch

        if nbytes is None:
            nbytes = self.size - offset
        self._verify_range(offset, nbytes)
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._buf, dtype=torch.uint8, count=nbytes, offset=self._hsize + offset)

    def read(self, offset: int, nbytes: int) -> bytes:
        self._verify_range(offset, nbytes)
        if nbytes == 0:
            return b""
        assert self._buf is not None
        return bytes(self._buf[self._hsize + offset : self._hsize + offset + nbytes])

    def read_all(self) -> bytes:
        return self.read(0, self.size)

    def close(self) -> None:
        """Drop this reader's mapping. Tensors from ``tensor()`` keep the mapping alive (they hold
        a reference to it), so it is unmapped only when the last of them is gone — never under
        them, which would make reading those tensors crash."""
        self._buf = None


class FolderReader(ObjectReader):
    """An object file, memory-mapped copy-on-write (small ones read into memory)."""

    def __init__(self, path: Path, oid: str, owner: ObjectArea) -> None:
        with os.fdopen(open_regular(path), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            fixed = f.read(FIXED.size)
            chunks = FIXED.unpack(fixed)[3] if len(fixed) == FIXED.size else 0
            header = fixed + f.read(align(FIXED.size + DIGEST_BYTES * min(chunks, MAX_CHUNKS), 64) - len(fixed))
            super().__init__(oid, owner, header, size)
            if self.size == 0:
                self._buf = None
            elif size <= _MAP_AT_LEAST:
                # small objects are read into memory: a mapping would hold a file descriptor per
                # object, and a set of 5,000 per-model objects would exhaust the process's limit
                f.seek(0)
                self._buf = bytearray(f.read())
            else:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
