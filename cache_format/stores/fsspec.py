"""A cache behind an fsspec URL (S3 and any other fsspec filesystem), with retries.

Every call is retried with capped exponential backoff on transient errors (network, timeouts,
5xx, a short body), then raised as one clear RemoteError. S3 listings bypass s3fs's listings
cache, so a reader never misses a commit, and exclusive create is a conditional put
(`If-None-Match: *`); other fsspec stores have no conditional put and check, then write.
Large objects go to S3 as multipart uploads that a later copy finds and continues.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import threading
import time
from collections.abc import Iterator

from ..errors import RemoteError, UserError
from .base import Location, ObjectInfo, ObjectReader, ShortRead, StreamUpload, Upload, fault_point

# S3 object metadata: the tag (log.tag) of the entry a copy was made against (named in format 2)
CHECKSUM_META = "actcache-blake2b"

# Retry policy for remote calls; tests shorten it through the environment.
RETRIES = int(os.environ.get("ACTCACHE_RETRIES", "5"))
BACKOFF_S = float(os.environ.get("ACTCACHE_BACKOFF_S", "0.25"))
BACKOFF_CAP_S = 8.0

_PERMANENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
    UserError,
    KeyError,
    ValueError,
    TypeError,
)


class FsspecLocation(Location, fallback=True):
    """Any fsspec URL no other backend claims."""

    def __init__(self, url, storage_options: dict | None = None):
        super().__init__(url, storage_options)
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(os.fspath(url), **self._fs_options())
        self.root = self.root.rstrip("/")

    def _fs_options(self) -> dict:
        return dict(self.storage_options)

    def _native_path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _retry(self, what: str, fn, *args, **kwargs):
        delay = BACKOFF_S
        for attempt in range(RETRIES + 1):
            try:
                return fn(*args, **kwargs)
            except _PERMANENT:
                raise
            except Exception as e:  # network, timeouts, 5xx: transient until proven otherwise
                if attempt == RETRIES:
                    raise RemoteError(
                        f"{self.url}: {what} failed after {RETRIES + 1} attempts ({type(e).__name__}: {e}); "
                        "check that the endpoint is reachable and retry"
                    ) from e
                time.sleep(min(BACKOFF_CAP_S, delay) * (0.5 + random.random() / 2))
                delay *= 2

    # -- reads -------------------------------------------------------------------------

    def read(self, key: str, reread: bool = False, size: int | None = None) -> bytes:
        def cat():
            out = self._checked_body(key, self.fs.cat_file(self.path(key)))
            if size is not None and len(out) < size:
                raise ShortRead(f"got {len(out)} of {size} bytes")
            return out

        return self._retry(f"reading {key}", cat)

    def read_range(self, key: str, start: int, end: int, reread: bool = False) -> bytes:
        if end <= start:
            return b""

        def cat():
            out = self._checked_body(key, self._cat_range(key, start, end))
            if len(out) < end - start:
                raise ShortRead(f"got {len(out)} of {end - start} bytes")
            return out

        out = self._retry(f"reading {key}", cat)
        if len(out) != end - start:  # a server that ignores Range returns the whole object
            raise RemoteError(
                f"{self.url}/{key}: the server returned {len(out)} bytes for a {end - start}-byte "
                "range request; serve the cache with a server that honours HTTP Range"
            )
        return out

    def _cat_range(self, key: str, start: int, end: int) -> bytes:
        return self.fs.cat_file(self.path(key), start=start, end=end)

    # A backend that can stream a copy's reads (S3, HTTP) defines `_open_stream(key, start, end)`:
    # one request for bytes [start, end), returned as a body with `readinto(view) -> int` (what
    # it could read; 0 at the end) and `close()`.
    _open_stream = None

    def reader(self, key: str, start: int, end: int) -> ObjectReader:
        if self._open_stream is None:
            return super().reader(key, start, end)
        return StreamReader(self, key, start, end)

    def _checked_body(self, key: str, out: bytes) -> bytes:
        """A body as received (HTTP refuses a web page served in an object's place)."""
        return out

    def exists(self, key: str) -> bool:
        return self._retry(f"checking {key}", self.fs.exists, self.path(key))

    def list(self, prefix: str) -> list[str]:
        def ls():
            p = self.path(prefix)
            self.fs.invalidate_cache(p)
            try:
                entries = self.fs.ls(p, detail=False, refresh=True)
            except FileNotFoundError:
                return []
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

        return self._retry(f"listing {prefix}", ls)

    def walk(self, prefix: str) -> list[ObjectInfo]:
        def find():
            p = self.path(prefix)
            self.fs.invalidate_cache(p)
            try:
                found = self.fs.find(p, detail=True, withdirs=False)
            except FileNotFoundError:
                return {}
            return found

        out = []
        for name, info in self._retry(f"listing {prefix}", find).items():
            rel = name[len(self.root) + 1 :]
            mt = info.get("LastModified") or info.get("mtime") or info.get("created") or 0
            mt = mt.timestamp() if hasattr(mt, "timestamp") else float(mt)
            out.append(ObjectInfo(rel, int(info.get("size") or 0), mt))
        return out

    # -- writes ------------------------------------------------------------------------

    def write(self, key: str, data: bytes) -> None:
        fault_point(key, "before")
        data = bytes(data)  # a view of a copy's buffer: the client wants bytes
        self._retry(f"writing {key}", self.fs.pipe_file, self.path(key), data)
        fault_point(key, "after")

    def create_exclusive(self, key: str, data: bytes) -> bool:
        # No conditional put: check-then-write (documented race).
        if self.exists(key):
            return False
        self.write(key, data)
        return True

    def delete(self, keys: list[str]) -> None:
        for k in keys:
            fault_point(k, "before")
        if keys:
            self._retry("deleting objects", self.fs.rm, [self.path(k) for k in keys])
        for k in keys:
            fault_point(k, "after")

    def upload(self, key: str, tag: str, size: int, part: int) -> Upload:
        return StreamUpload(lambda: self.fs.open(self.path(key), "wb", block_size=max(part, 5 << 20)))

    def zarr_store(self, read_only: bool = False):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(
            self.url, storage_options=self._fs_options(), read_only=read_only or not self.supports_writes
        )


class StreamReader(ObjectReader):
    """One request from where the copy stands to the end, read off into the caller's buffers (a
    request per block would make the server find the object again for each); a stream that
    breaks is re-opened at the last whole block, with the retries of any read."""

    def __init__(self, loc: FsspecLocation, key: str, start: int, end: int):
        super().__init__(loc, key, start, end)
        self.body = None
        self.attempt, self.delay = 0, BACKOFF_S

    def readinto(self, buf) -> int:
        loc = self.loc
        n = min(len(buf), self.end - self.pos)
        if n <= 0:
            return 0
        view = memoryview(buf)[:n]
        while True:
            try:
                if self.body is None:
                    self.body = loc._open_stream(self.key, self.pos, self.end)
                got = 0
                while got < n and (k := self.body.readinto(view[got : min(n, got + PIECE)])):
                    got += k
                loc._checked_body(self.key, view[:64])
                if got < n:
                    raise ShortRead(f"the stream of {self.key} ended at byte {self.pos + got} of {self.end}")
                self.pos += n
                return n
            except _PERMANENT:
                raise
            except Exception as e:  # a broken stream: open it again where the block began
                self.close()
                if self.attempt == RETRIES:
                    raise RemoteError(
                        f"{loc.url}: reading {self.key} failed after {RETRIES + 1} attempts "
                        f"({type(e).__name__}: {e}); check that the endpoint is reachable and retry"
                    ) from e
                self.attempt += 1
                time.sleep(min(BACKOFF_CAP_S, self.delay) * (0.5 + random.random() / 2))
                self.delay *= 2

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None


# A stream is read in pieces of at most this: clients hand back what they have buffered as one
# new bytes object, and large ones linger in malloc's heap.
PIECE = 1 << 20


class _LoopBody:
    """An aiobotocore body (on fsspec's event loop) read from a copying thread."""

    def __init__(self, loop, body):
        self.loop, self.body = loop, body

    def readinto(self, view) -> int:
        from fsspec.asyn import sync

        return sync(self.loop, _read_into, self.body, view)

    def close(self) -> None:
        self.body.close()


async def _read_into(body, view) -> int:
    piece = await body.read(len(view))
    view[: len(piece)] = piece
    return len(piece)


class S3Location(FsspecLocation):
    """S3 (and S3-compatible endpoints): fresh listings and a conditional put for exclusive create."""

    protocols = ("s3", "s3a")

    def __init__(self, url, storage_options: dict | None = None):
        super().__init__(url, storage_options)
        self._uploads: dict | None = None
        self._uploads_lock = threading.Lock()

    def _fs_options(self) -> dict:
        opts = dict(self.storage_options)
        opts.setdefault("use_listings_cache", False)
        return opts

    def create_exclusive(self, key: str, data: bytes) -> bool:
        bucket, _, path = self.path(key).partition("/")
        fault_point(key, "before")

        def put():
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=path, Body=data, IfNoneMatch="*")
                return True
            except Exception as e:
                text = f"{type(e).__name__} {e} {getattr(e, '__cause__', '')}"
                if "PreconditionFailed" in text or "412" in text or "Precondition" in text:
                    return False
                if "ConditionalRequestConflict" in text or "409" in text:
                    raise ConnectionError("conditional put conflict; retrying") from e
                raise

        created = self._retry(f"committing {key}", put)
        if created:
            fault_point(key, "after")
        return created

    def _open_stream(self, key: str, start: int, end: int):
        bucket, _, path = self.path(key).partition("/")
        r = self.fs.call_s3("get_object", Bucket=bucket, Key=path, Range=f"bytes={start}-{end - 1}")
        return _LoopBody(self.fs.loop, r["Body"])

    def upload(self, key: str, tag: str, size: int, part: int) -> Upload:
        return MultipartUpload(self, key, tag, part)

    def unfinished_uploads(self) -> dict[str, str]:
        """Object path → id of the newest multipart upload left open under this root, listed once
        per Location (what a killed copy left; uploads begun after the listing are this process's)."""
        with self._uploads_lock:
            if self._uploads is None:
                bucket, _, prefix = self.root.partition("/")
                found, kw = {}, {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else ""}
                while True:
                    r = self._retry("listing multipart uploads", self.fs.call_s3, "list_multipart_uploads", **kw)
                    for u in sorted(r.get("Uploads", []), key=lambda u: u["Initiated"]):
                        found[f"{bucket}/{u['Key']}"] = u["UploadId"]
                    if not r.get("IsTruncated"):
                        break
                    kw.update(KeyMarker=r["NextKeyMarker"], UploadIdMarker=r["NextUploadIdMarker"])
                self._uploads = found
            return self._uploads

    def holds(self, key: str, size: int, tag: str) -> bool:
        """From the checksum a multipart upload records in the object's metadata: no read."""
        bucket, _, path = self.path(key).partition("/")
        try:
            head = self._retry(f"checking {key}", self.fs.call_s3, "head_object", Bucket=bucket, Key=path)
        except FileNotFoundError:
            return False
        return head.get("ContentLength") == size and head.get("Metadata", {}).get(CHECKSUM_META) == tag


class _ViewFile(io.RawIOBase):
    """A read-only, seekable file over a buffer: a part is sent from the copy's block, not a copy of it."""

    def __init__(self, data):
        super().__init__()
        self.view, self.pos = memoryview(data).cast("B"), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), len(self.view) - self.pos)
        b[:n] = self.view[self.pos : self.pos + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, (0, self.pos, len(self.view))[whence] + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos


class MultipartUpload(Upload):
    """An S3 multipart upload of fixed-size parts. A killed copy leaves the upload open; the
    next one lists it, keeps the leading parts whose MD5 (their ETag) matches the source's
    bytes, and uploads the rest. A bucket lifecycle rule (AbortIncompleteMultipartUpload)
    reclaims uploads nobody comes back for."""

    def __init__(self, loc: S3Location, key: str, tag: str, part: int):
        self.loc, self.key, self.part = loc, key, part
        self.bucket, _, self.path = loc.path(key).partition("/")
        self.done: list[dict] = []
        self.found: dict[int, dict] = {}
        self.id = loc.unfinished_uploads().get(loc.path(key))
        if self.id is not None:
            self.found = self._parts()
        else:
            self.id = self._call(
                "create_multipart_upload", Bucket=self.bucket, Key=self.path, Metadata={CHECKSUM_META: tag}
            )["UploadId"]

    def _call(self, op: str, **kw):
        return self.loc._retry(f"{op} {self.key}", self.loc.fs.call_s3, op, **kw)

    def _parts(self) -> dict[int, dict]:
        out, marker = {}, 0
        while True:
            r = self._call("list_parts", Bucket=self.bucket, Key=self.path, UploadId=self.id, PartNumberMarker=marker)
            out.update({p["PartNumber"]: p for p in r.get("Parts", [])})
            if not r.get("IsTruncated"):
                return out
            marker = r["NextPartNumberMarker"]

    def resumed(self, read_source) -> Iterator[bytes]:
        """The leading parts that hold the source's bytes (read from the source: S3 cannot read
        an unfinished upload back), each checked against its ETag; the rest is uploaded anew."""
        self.offset = 0
        n = 1
        while n in self.found and self.found[n]["Size"] == self.part:
            data = read_source(self.offset, self.offset + self.part)
            etag = self.found[n]["ETag"].strip('"')
            if len(data) != self.part or hashlib.md5(data, usedforsecurity=False).hexdigest() != etag:
                break
            self.done.append({"PartNumber": n, "ETag": self.found[n]["ETag"]})
            self.offset += self.part
            yield data
            n += 1

    def append(self, data) -> None:
        n = self.offset // self.part + 1
        r = self._call(
            "upload_part", Bucket=self.bucket, Key=self.path, UploadId=self.id, PartNumber=n, Body=_ViewFile(data)
        )
        self.done.append({"PartNumber": n, "ETag": r["ETag"]})
        self.offset += len(data)

    def commit(self) -> None:
        fault_point(self.key, "before")
        self._call(
            "complete_multipart_upload",
            Bucket=self.bucket,
            Key=self.path,
            UploadId=self.id,
            MultipartUpload={"Parts": self.done},
        )
        fault_point(self.key, "after")

    def discard(self) -> None:
        try:
            self._call("abort_multipart_upload", Bucket=self.bucket, Key=self.path, UploadId=self.id)
        except (RemoteError, FileNotFoundError):
            pass  # already gone: nothing to drop
