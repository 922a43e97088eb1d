"""A cache behind an fsspec URL (S3 and any other fsspec filesystem), with retries.

Every call is retried with capped exponential backoff on transient errors (network, timeouts,
5xx, a short body), then raised as one clear RemoteError. S3 listings bypass s3fs's listings
cache, so a reader never misses a commit, and exclusive create is a conditional put
(`If-None-Match: *`); other fsspec stores have no conditional put and check, then write.
"""

from __future__ import annotations

import os
import random
import time

from ..errors import RemoteError, UserError
from . import faults
from .base import Location, ObjectInfo, ShortRead

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

    def read(self, key: str, fresh: bool = False, size: int | None = None) -> bytes:
        def cat():
            out = self.fs.cat_file(self.path(key))
            if size is not None and len(out) < size:
                raise ShortRead(f"got {len(out)} of {size} bytes")
            return out

        return self._retry(f"reading {key}", cat)

    def read_range(self, key: str, start: int, end: int, fresh: bool = False) -> bytes:
        if end <= start:
            return b""

        def cat():
            out = self.fs.cat_file(self.path(key), start=start, end=end)
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
        faults.point(key, "before")
        self._retry(f"writing {key}", self.fs.pipe_file, self.path(key), data)
        faults.point(key, "after")

    def create_exclusive(self, key: str, data: bytes) -> bool:
        # No conditional put: check-then-write (documented race).
        if self.exists(key):
            return False
        self.write(key, data)
        return True

    def delete(self, keys: list[str]) -> None:
        for k in keys:
            faults.point(k, "before")
        if keys:
            self._retry("deleting objects", self.fs.rm, [self.path(k) for k in keys])
        for k in keys:
            faults.point(k, "after")

    def zarr_store(self, read_only: bool = False):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(
            self.url, storage_options=self._fs_options(), read_only=read_only or not self.supports_writes
        )


class S3Location(FsspecLocation):
    """S3 (and S3-compatible endpoints): fresh listings and a conditional put for exclusive create."""

    protocols = ("s3", "s3a")

    def _fs_options(self) -> dict:
        opts = dict(self.storage_options)
        opts.setdefault("use_listings_cache", False)
        return opts

    def create_exclusive(self, key: str, data: bytes) -> bool:
        bucket, _, path = self.path(key).partition("/")
        faults.point(key, "before")

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
            faults.point(key, "after")
        return created
