"""File-system rules every path of a store goes through.

* Only regular files are ever opened: FIFOs, devices, sockets and symbolic links in place of an
  object, a ref, a temp file or the catalog raise a clear error instead of hanging or following.
* Temp files are *owned through a lock*: the writer holds an ``flock`` on its temp file while it
  writes. A lock outlives nothing but its holder's open file, so a temp file whose lock can be
  taken belongs to a writer that is gone — in this PID namespace, container or host alike
  (local PID liveness says nothing about a writer in another namespace).
* Store-wide locks: every save holds ``locks/save`` shared; garbage collection and catalog
  rebuilds hold it exclusively, so they never see a save half done.
* Out of space (``ENOSPC``/``EDQUOT``) becomes ``OutOfSpace``: which file system, how much was
  needed and how much is free.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import IntegrityError, OutOfSpace as OutOfSpace, StoreError, human_bytes as human_bytes

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
#: fallocate is not offered by this file system: write the bytes with plain write() calls
UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)

TEMP_NAME = re.compile(r"^([0-9a-f]{32})-[0-9a-f]{32}\.part$")

#: distinguishes this process's temp files from those of other processes (PIDs are not unique
#: across PID namespaces and hosts; on NFS, flock is emulated per process, so a cleaner must never
#: probe its own process's files)
_TOKEN = uuid.uuid4().hex


def _new_token() -> None:
    global _TOKEN
    _TOKEN = uuid.uuid4().hex


os.register_at_fork(after_in_child=_new_token)



def mount_point(path: Path) -> Path:
    """The mount point of the file system holding ``path`` (the folder where the device changes)."""
    p = Path(os.path.abspath(path))
    while not p.exists():
        p = p.parent
    dev = p.stat().st_dev
    while p.parent != p and p.parent.stat().st_dev == dev:
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    p = Path(path)
    while not p.exists() and p.parent != p:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize



def out_of_space(path: Path, needed: int, what: str = "the store") -> OutOfSpace:
    """The ``OutOfSpace`` for a write of ``needed`` bytes at ``path``, with the file system and its free bytes."""
    return OutOfSpace(path, needed, what, fs=mount_point(path), free=free_bytes(path))


def is_read_only(path: Path) -> bool:
    """True when ``path`` lies on a read-only mount or this process may not write there."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return True
    except OSError:
        return False
    return not os.access(path, os.W_OK)


def os_error(e: OSError, path: Path, needed: int = 0, what: str = "the store") -> StoreError:
    """The MMError for an OSError met while writing ``path``."""
    if e.errno in NO_SPACE:
        return out_of_space(path, needed, what)
    if e.errno in READ_ONLY:
        return StoreError(f"cannot write {what} at {path}: {os.strerror(e.errno)} (read-only store?)")
    return StoreError(f"cannot write {what} at {path}: {e.strerror or e}")


def open_regular(path: Path, flags: int = os.O_RDONLY) -> int:
    """A file descriptor of ``path``, which must be a regular file (never a FIFO, device, socket or
    symbolic link: opening a FIFO would block forever). Raises IntegrityError otherwise and
    FileNotFoundError when it is missing."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise IntegrityError(f"{path} is a symbolic link; the store only reads regular files") from None
        if e.errno in (errno.ENXIO, errno.EISDIR):
            raise IntegrityError(f"{path} is not a regular file") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise IntegrityError(f"{path} is not a regular file ({_kind(mode)})")
    os.set_blocking(fd, True)
    return fd


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def read_small(path: Path, limit: int = 1 << 20) -> bytes:
    """The bytes of a small regular file (a ref), refusing special files."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder after a rename, so the new name is durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TempFile:
    """A new file in ``tmp/``, exclusively flocked by this writer until ``close``.

    A cleaner may remove a temp file only while it holds that lock itself; a writer that finds its
    freshly created file already unlinked (the cleaner won the race before the lock) takes another
    name, so a live writer never loses its file.
    """

    def __init__(self, folder: Path) -> None:
        while True:
            path = folder / f"{_TOKEN}-{uuid.uuid4().hex}.part"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:
                break
            os.close(fd)
        self.path = path
        self.file = os.fdopen(fd, "w+b")

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        """Remove the temp file if it is still there (not published) and drop the lock."""
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self.file.close()


def clean_temp(folder: Path) -> tuple[int, int]:
    """Remove temp files of writers that are gone (their lock can be taken); (files, bytes).

    Files of this process, files not named like temp files and special files are left alone.
    """
    removed = freed = 0
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return 0, 0
    for entry in entries:
        m = TEMP_NAME.match(entry.name)
        if m is None or m.group(1) == _TOKEN:
            continue
        try:
            fd = open_regular(Path(entry.path))
        except (OSError, IntegrityError):
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            st = os.fstat(fd)
            try:
                same = os.lstat(entry.path).st_ino == st.st_ino
            except FileNotFoundError:
                same = False
            if same and st.st_nlink:
                os.unlink(entry.path)
                removed += 1
                freed += st.st_blocks * 512
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed, freed


class StoreLock:
    """``locks/save`` of one store: shared while saving, exclusive for gc and rebuilds.

    Re-entrant within one ``StoreLock`` (a save that calls another writing helper), thread-safe;
    waiting is bounded so a stuck holder gives a clear error instead of a hang.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._depth = 0
        self._mutex = threading.RLock()

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ENOENT:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                return self._open()
            raise os_error(e, self.path, 0, "the store's lock file") from None

    @contextmanager
    def hold(self, exclusive: bool, wait_s: float, why: str) -> Iterator[None]:
        with self._mutex:
            if self._depth == 0:
                fd = self._open()
                mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
                deadline = time.monotonic() + wait_s
                delay = 0.002
                while True:
                    try:
                        fcntl.flock(fd, mode | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            os.close(fd)
                            raise StoreError(f"{why}: the store at {self.path.parent.parent} is busy "
                                             f"(waited {wait_s:.0f} s for {self.path})") from None
                        time.sleep(delay)
                        delay = min(delay * 2, 0.1)
                self._fd = fd
            self._depth += 1
        try:
            yield
        finally:
            with self._mutex:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
