"""Objects in an S3-compatible bucket (boto3), in the folder object area's format.

``s3://bucket/prefix`` holds ``prefix/objects/<2 hex>/<64 hex>`` (header + payload, exactly the
bytes an object file holds) and ``prefix/refs/<kind>/<name>@<version>``. Objects are immutable and
content-addressed and a PUT is atomic (a reader sees the whole object or none), so no temp files
are needed. A reader fetches the header with one ranged GET, then only the chunks a read touches
(ranged GETs, in parallel for large reads) and verifies each chunk against its digest: recovering
one model of a 5,000-model baseline set fetches that model's chunk(s), not the set. Objects above
``MULTIPART`` bytes are uploaded in parallel multipart parts (boto3's transfer manager).
``bytes_fetched`` counts every payload byte received.

Why boto3 (over obstore or s3fs): it is the reference client for every S3-compatible service
(AWS, MinIO, Ceph, moto), its transfer manager gives parallel multipart uploads, ranged GETs and
multipart clean-up are plain API calls, and it has no event loop or native extension to carry
into notebook kernels.
"""
from __future__ import annotations

import hashlib
import io
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import IntegrityError, StoreError
from .basetypes import PutResult
from .contracts import ObjectArea
from .objects import (
    DIGEST_BYTES,
    FIXED,
    MAGIC,
    MAX_HEADER,
    ObjectReader,
    align,
    fill_buffer,
    header_of,
    is_oid,
)
from .refs import REF_PATTERN

if TYPE_CHECKING:
    import torch

#: objects above this size are uploaded in parallel parts of PART bytes (S3 allows >= 5 MiB parts)
MULTIPART = 16 * 1024 * 1024
PART = 8 * 1024 * 1024
#: bytes of the first ranged GET of a reader: the header, and all of a small object
PROBE = 16 * 1024
#: a large read is split into ranged GETs of at most this size, fetched in parallel
RANGE = 8 * 1024 * 1024
THREADS = 8


def _missing(e: Exception) -> bool:
    code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


class _View(io.RawIOBase):
    """A read-only, seekable file over a buffer (the transfer manager reads parts from it)."""

    def __init__(self, view: memoryview) -> None:
        self._view, self._pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = [offset, self._pos + offset, len(self._view) + offset][whence]
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._view) - self._pos))
        b[:n] = self._view[self._pos: self._pos + n]
        self._pos += n
        return n


class S3Objects(ObjectArea):
    """The object area in ``s3://bucket/prefix``; ``?endpoint_url=…&region_name=…`` in the URL
    override boto3's settings (the credentials always come from boto3's usual sources)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise StoreError(f"objects URL {url!r} is not s3://bucket/prefix")
        options = dict(urllib.parse.parse_qsl(parts.query))
        unknown = set(options) - {"endpoint_url", "region_name"}
        if unknown:
            raise StoreError(f"objects URL {url!r}: unknown option(s) {', '.join(sorted(unknown))}")
        self.location = url
        self.bucket = parts.netloc
        prefix = parts.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StoreError("S3 objects need boto3: pip install 'mm_jupyter[team]'") from None
        config = Config(max_pool_connections=2 * THREADS, retries={"max_attempts": 5, "mode": "standard"},
                        s3={"addressing_style": "path"} if "endpoint_url" in options else None)
        self.client: Any = boto3.session.Session().client("s3", config=config,
                                                          endpoint_url=options.get("endpoint_url"),
                                                          region_name=options.get("region_name"))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def key(self, oid: str) -> str:
        if not isinstance(oid, str) or not is_oid(oid):
            raise IntegrityError(f"not an object id: {oid!r}")
        return f"{self.prefix}objects/{oid[:2]}/{oid}"

    def _fail(self, e: Exception, what: str) -> StoreError:
        """One StoreError naming what failed. boto3 and botocore raise errors of unrelated
        hierarchies (ClientError, BotoCoreError, boto3's S3UploadFailedError, the HTTP transport's
        own), so the S3 calls catch ``Exception`` and hand it here, or test it with ``_missing``."""
        return StoreError(f"{what} in {self.location}: {e}")

    def pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="mm-s3")
            return self._pool

    # -- writes ------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the bucket when it does not exist (as a folder store creates its folder)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if not _missing(e):
                raise self._fail(e, f"cannot use bucket {self.bucket!r}") from None
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except ClientError as e2:
                if "BucketAlready" not in str(e2):
                    raise self._fail(e2, f"cannot create bucket {self.bucket!r}") from None

    def _stored(self, oid: str, total: int) -> bool:
        """True when the object exists with its size (content addressing makes it identical)."""
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self.key(oid))["ContentLength"]) == total
        except Exception as e:  # noqa: BLE001 - any S3 client error (see _fail): missing, or a failure
            if _missing(e):
                return False
            raise self._fail(e, f"cannot check object {oid[:12]}…") from None

    def _upload(self, oid: str, whole: memoryview) -> None:
        from boto3.s3.transfer import TransferConfig

        try:
            if len(whole) <= MULTIPART:
                self.client.put_object(Bucket=self.bucket, Key=self.key(oid), Body=bytes(whole))
            else:
                config = TransferConfig(multipart_threshold=MULTIPART, multipart_chunksize=PART,
                                        max_concurrency=THREADS, use_threads=True)
                self.client.upload_fileobj(_View(whole), self.bucket, self.key(oid), Config=config)
        except Exception as e:  # noqa: BLE001 - any S3 client error (see _fail): nothing was published
            raise self._fail(e, f"cannot write object {oid[:12]}…") from None

    def put(self, data: bytes | bytearray | memoryview) -> PutResult:
        payload = memoryview(data).cast("B")
        header = header_of(payload)
        oid = hashlib.sha256(header).hexdigest()
        total = len(header) + len(payload)
        if self._stored(oid, total):
            return PutResult(oid, total, False)
        self._upload(oid, memoryview(header + bytes(payload)))
        return PutResult(oid, total, True)

    def put_filled(self, nbytes: int, fill: Callable[["torch.Tensor", Callable[[int], None]], None]) -> PutResult:
        if nbytes == 0:
            return self.put(b"")
        whole = fill_buffer(nbytes, fill)
        hsize = len(whole) - nbytes
        oid = hashlib.sha256(whole[:hsize]).hexdigest()
        if self._stored(oid, len(whole)):
            return PutResult(oid, len(whole), False)
        self._upload(oid, memoryview(whole))
        return PutResult(oid, len(whole), True)

    def delete(self, oid: str) -> bool:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(oid))
        except Exception as e:  # noqa: BLE001 - any S3 client error (see _fail)
            raise self._fail(e, f"cannot delete object {oid[:12]}…") from None
        return True

    def clean_temp(self, exclusive: bool = False) -> tuple[int, int]:
        """Multipart uploads of writers that died; only while no save is in flight (gc)."""
        if not exclusive:
            return 0, 0
        aborted = 0
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for upload in page.get("Uploads", []):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
        return aborted, 0

    # -- reads -------------------------------------------------------------------------------
    def get_range(self, key: str, start: int, end: int | None = None) -> tuple[bytes, int]:
        """(bytes start..end inclusive, total object size); IntegrityError when the key is missing."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key,
                                          Range=f"bytes={start}-{'' if end is None else end}")
            data = resp["Body"].read()
        except Exception as e:  # noqa: BLE001 - any S3 client error (see _fail)
            if _missing(e):
                raise IntegrityError(f"object {key.rsplit('/', 1)[-1][:12]}… is missing from {self.location}") from None
            raise self._fail(e, f"cannot read {key}") from None
        self.count_bytes(fetched=len(data))
        total = int(str(resp.get("ContentRange", "")).rpartition("/")[2] or len(data))
        return data, total

    def open(self, oid: str) -> ObjectReader:
        return S3Reader(self, oid)

    def exists(self, oid: str) -> bool:
        return self._size(oid) is not None

    def _size(self, oid: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self.key(oid))["ContentLength"])
        except Exception as e:  # noqa: BLE001 - any S3 client error (see _fail)
            if _missing(e):
                return None
            raise self._fail(e, f"cannot check object {oid[:12]}…") from None

    def size(self, oid: str) -> int:
        size = self._size(oid)
        if size is None:
            raise IntegrityError(f"object {oid[:12]}… is missing from {self.location}")
        return size

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    def scan(self) -> Iterator[tuple[str, int]]:
        try:
            for item in self._list(f"{self.prefix}objects/"):
                oid = item["Key"].rsplit("/", 1)[-1]
                if is_oid(oid) and item["Key"] == self.key(oid):
                    yield oid, int(item["Size"])
        except Exception as e:  # noqa: BLE001 - any S3 client error (see _fail)
            if _missing(e):  # no bucket yet: no objects
                return
            raise self._fail(e, "cannot list objects") from None

    def payload_prefix(self, oid: str, n: int) -> bytes:
        data, _ = self.get_range(self.key(oid), 0, MAX_HEADER + n - 1)
        if len(data) < FIXED.size or data[:8] != MAGIC:
            return b""
        hsize = align(FIXED.size + DIGEST_BYTES * FIXED.unpack(data[: FIXED.size])[3], 64)
        return data[hsize: hsize + n]

    # -- refs --------------------------------------------------------------------------------
    def _ref_key(self, kind: str, name: str, version: int) -> str:
        return f"{self.prefix}refs/{kind}/{name}@{version}"

    def write_ref(self, kind: str, name: str, version: int, oid: str) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._ref_key(kind, name, version), Body=f"{oid}\n".encode())
        except Exception as e:  # noqa: BLE001 - any S3 client error (see _fail)
            raise self._fail(e, f"cannot write ref {name}@{version}") from None

    def ref_names(self, kind: str) -> set[tuple[str, int]]:
        out = set()
        try:
            for item in self._list(f"{self.prefix}refs/{kind}/"):
                m = REF_PATTERN.match(item["Key"].rsplit("/", 1)[-1])
                if m is not None:
                    out.add((m.group(1), int(m.group(2))))
        except Exception as e:  # noqa: BLE001 - any S3 client error (see _fail)
            if not _missing(e):
                raise self._fail(e, "cannot list refs") from None
        return out

    def read_ref(self, kind: str, name: str, version: int) -> str | None:
        try:
            data, _ = self.get_range(self._ref_key(kind, name, version), 0, 199)
        except (IntegrityError, StoreError):
            return None
        text = data.decode("ascii", "replace").strip()
        return text if len(text) == 64 else None

    def remove_ref(self, kind: str, name: str, version: int) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._ref_key(kind, name, version))


class S3Reader(ObjectReader):
    """An object fetched chunk by chunk with ranged GETs into one buffer, each chunk verified."""

    def __init__(self, area: S3Objects, oid: str) -> None:
        key = area.key(oid)
        first, total = area.get_range(key, 0, PROBE - 1)
        super().__init__(oid, area, first, total)
        self._area, self._key = area, key
        self._buf = bytearray(total) if self.size else None
        self._have = bytearray(len(self._digests))
        self._fetching = threading.Lock()
        if self._buf is not None:
            self._buf[: len(first)] = first
            for c in range(len(self._digests)):
                self._have[c] = self._span(c)[1] <= len(first)

    def _span(self, c: int) -> tuple[int, int]:
        a = self._hsize + c * self._chunk
        return a, min(a + self._chunk, self._hsize + self.size)

    def _fetch(self, chunks: list[int]) -> None:
        """Ranged GETs for the missing chunks: contiguous runs merged, large runs split into
        RANGE-sized requests fetched in parallel."""
        with self._fetching:
            need = sorted(c for c in set(chunks) if not self._have[c])
            if not need or self._buf is None:
                return
            runs: list[tuple[int, int]] = []
            for c in need:
                a, b = self._span(c)
                if runs and runs[-1][1] == a:
                    runs[-1] = (runs[-1][0], b)
                else:
                    runs.append((a, b))
            ranges = [(x, min(x + RANGE, b)) for a, b in runs for x in range(a, b, RANGE)]
            buf = self._buf

            def one(r: tuple[int, int]) -> None:
                data, _ = self._area.get_range(self._key, r[0], r[1] - 1)
                if len(data) != r[1] - r[0]:
                    raise IntegrityError(f"object {self.oid[:12]}… is truncated in {self._area.location}")
                buf[r[0]: r[1]] = data

            if len(ranges) == 1:
                one(ranges[0])
            else:
                list(self._area.pool().map(one, ranges))
            for c in need:
                self._have[c] = 1
