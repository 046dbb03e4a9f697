"""A save of bytes already stored keeps the stored copy only when it is intact — the same header and
every payload byte compared window by window (``_already_stored``) — and otherwise replaces it with
the caller's bytes (re-saving repairs bit rot), for ``put`` and ``put_filled`` alike. Objects span
several compare windows, so the windows' edges and the short last window are covered."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from mm_jupyter.store import objects as objs

NBYTES = 2 * objs._COMPARE_WINDOW + 12345  # two full windows and a short one
W = objs._COMPARE_WINDOW


@pytest.fixture()
def area(tmp_path: Path) -> objs.FolderObjects:
    a = objs.FolderObjects(tmp_path / "s")
    a.prepare()
    return a


def _data() -> bytes:
    return np.random.default_rng(0).integers(0, 256, NBYTES, dtype=np.uint8).tobytes()


def _put(area: objs.FolderObjects, data: bytes) -> Any:
    return area.put(data)


def _put_filled(area: objs.FolderObjects, data: bytes) -> Any:
    src = torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def fill(dst: torch.Tensor, progress: Callable[[int], None]) -> None:
        dst.copy_(src)
        progress(len(data))

    return area.put_filled(len(data), fill)


def _payload(area: objs.FolderObjects, oid: str) -> bytes:
    reader = area.open(oid)
    try:
        return reader.read_all()  # verified against the header's chunk digests
    finally:
        reader.close()


@pytest.mark.parametrize("put", [_put, _put_filled], ids=["put", "put_filled"])
def test_an_intact_copy_is_kept(area: objs.FolderObjects, put: Any) -> None:
    data = _data()
    first = put(area, data)
    mtime = os.stat(area.path(first.oid)).st_mtime_ns
    again = put(area, data)
    assert (again.oid, again.written, first.written) == (first.oid, False, True)
    assert os.stat(area.path(first.oid)).st_mtime_ns == mtime


@pytest.mark.parametrize("put", [_put, _put_filled], ids=["put", "put_filled"])
@pytest.mark.parametrize("damage", ["first byte", "last of window 1", "first of window 2", "last byte",
                                    "truncated", "grown"])
def test_a_damaged_copy_is_replaced(area: objs.FolderObjects, put: Any, damage: str) -> None:
    data = _data()
    oid = put(area, data).oid
    path = area.path(oid)
    hsize = os.path.getsize(path) - NBYTES
    at = {"first byte": 0, "last of window 1": W - 1, "first of window 2": W, "last byte": NBYTES - 1}.get(damage)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        if at is not None:
            f.seek(hsize + at)
            byte = f.read(1)
            f.seek(hsize + at)
            f.write(bytes([byte[0] ^ 0x10]))
        elif damage == "truncated":
            f.truncate(hsize + NBYTES - 1)
        else:
            f.seek(0, 2)
            f.write(b"\0")
    again = put(area, data)
    assert again.oid == oid and again.written  # the caller's good bytes replaced the damaged copy
    assert _payload(area, oid) == data


def test_window_reader_reads_any_window_and_makes_its_buffer_at_the_first_read(tmp_path: Path) -> None:
    """The compare reader allocates nothing until it is called (a save of new bytes never calls
    it), then reads windows of any size, growing its buffer when a later window is larger."""
    data = _data()[:100_000]
    path = tmp_path / "f"
    path.write_bytes(b"HEAD" + data)
    fd = os.open(path, os.O_RDONLY)
    try:
        read = objs._window_reader(fd, 4)
        assert read.__closure__ is not None
        assert [len(c.cell_contents) for c in read.__closure__ if isinstance(c.cell_contents, memoryview)] == [0]
        for at, n in ((0, 10), (5, 70_000), (99_990, 10), (99_995, 100)):  # growing, then past the end
            assert bytes(read(at, n)) == data[at : at + n]
    finally:
        os.close(fd)
