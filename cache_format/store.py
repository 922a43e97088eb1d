"""Where a cache lives: a local directory or an fsspec URL, behind one small interface.

Local paths use the OS directly (atomic renames, `link` for exclusive create). Remote
stores go through fsspec with capped exponential backoff on transient errors, then a
clear RemoteError. S3 listings bypass s3fs's listings cache, so a reader never misses a
commit, and exclusive create uses a conditional put (`If-None-Match: *`). HTTP is
read-only and has no listings: readers use the `index.json` that `publish` writes.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass

from .errors import CacheError, RemoteError, UserError

# Retry policy for remote calls; tests shorten it through the environment.
RETRIES = int(os.environ.get("ACTCACHE_RETRIES", "5"))
BACKOFF_S = float(os.environ.get("ACTCACHE_BACKOFF_S", "0.25"))
BACKOFF_CAP_S = 8.0

_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
              FileExistsError, UserError, KeyError, ValueError, TypeError)


class ReadOnlyError(UserError):
    """A write was attempted on a read-only location (HTTP)."""


class ShortRead(ConnectionError):
    """A body shorter than asked for (truncated response, reset mid-body): transient, retried."""


@dataclass
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch


class Location:
    """A cache root: keys are '/'-separated paths relative to it."""

    def __init__(self, url: str, storage_options: dict | None = None):
        url = os.fspath(url)
        self.url = url.rstrip("/") or url
        self.storage_options = dict(storage_options or {})
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        self.protocol = protocol
        self.local = protocol in ("file", "local")
        self._mmaps: dict = {}  # local shard files mapped once: reads are views, not copies
        self._mmap_lock = threading.Lock()
        self.http = protocol in ("http", "https")
        if self.local:
            self.root = os.path.abspath(url.split("://", 1)[1] if "://" in url else url)
            self.fs = None
        else:
            import fsspec

            opts = dict(self.storage_options)
            if protocol in ("s3", "s3a"):
                opts.setdefault("use_listings_cache", False)
            self.fs, self.root = fsspec.core.url_to_fs(url, **opts)
            self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    # -- helpers -----------------------------------------------------------------------

    def path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/")) if self.local else f"{self.root}/{key}"

    def _retry(self, what: str, fn, *args, **kwargs):
        if self.local:
            return fn(*args, **kwargs)
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
                        "check that the endpoint is reachable and retry") from e
                time.sleep(min(BACKOFF_CAP_S, delay) * (0.5 + random.random() / 2))
                delay *= 2

    def _writable(self) -> None:
        if self.http:
            raise ReadOnlyError(f"{self.url}: HTTP caches are read-only; write to a local path or s3:// URL and publish it")

    # -- reads -------------------------------------------------------------------------

    def read(self, key: str, fresh: bool = False, size: int | None = None) -> bytes:
        """A whole object. `size` (when the manifest knows it) turns a short body into a retry;
        `fresh` is a re-read after a failed check (locally: not through a cached mapping)."""
        if self.local:
            with open(self.path(key), "rb") as f:
                return f.read()

        def cat():
            out = self.fs.cat_file(self.path(key))
            if size is not None and len(out) < size:
                raise ShortRead(f"got {len(out)} of {size} bytes")
            return out

        return self._retry(f"reading {key}", cat)

    def read_range(self, key: str, start: int, end: int, fresh: bool = False) -> bytes:
        """Bytes [start, end) of an object; thread-safe. A short body is retried like a 5xx."""
        if end <= start:
            return b""
        if self.local:  # zero-copy: a view into the mapped (immutable) shard file
            if fresh:  # re-read from the file itself, and map it anew next time
                with self._mmap_lock:
                    self._mmaps.pop(key, None)
                with open(self.path(key), "rb") as f:
                    out = os.pread(f.fileno(), end - start, start)
            else:
                m = self._mmap(key)
                out = memoryview(m)[start:min(end, len(m))]
            if len(out) != end - start:
                raise CacheError(f"{self.url}/{key}: short read ({len(out)} of {end - start} bytes); the object "
                                 "is truncated: run `python -m cache_format verify`")
            return out

        def cat():
            out = self.fs.cat_file(self.path(key), start=start, end=end)
            if len(out) < end - start:
                raise ShortRead(f"got {len(out)} of {end - start} bytes")
            return out

        out = self._retry(f"reading {key}", cat)
        if len(out) != end - start:  # a server that ignores Range returns the whole object
            raise RemoteError(f"{self.url}/{key}: the server returned {len(out)} bytes for a {end - start}-byte "
                              "range request; serve the cache with a server that honours HTTP Range")
        return out

    def _mmap(self, key: str):
        with self._mmap_lock:
            m = self._mmaps.get(key)
        if m is None:
            fd = os.open(self.path(key), os.O_RDONLY)
            try:
                m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if os.fstat(fd).st_size else b""
            finally:
                os.close(fd)
            with self._mmap_lock:
                m = self._mmaps.setdefault(key, m)
        return m

    def exists(self, key: str) -> bool:
        if self.local:
            return os.path.exists(self.path(key))
        return self._retry(f"checking {key}", self.fs.exists, self.path(key))

    def list(self, prefix: str) -> list[str]:
        """Names directly under `prefix` (fresh: never from a listings cache)."""
        if self.local:
            try:
                return sorted(os.listdir(self.path(prefix)))
            except FileNotFoundError:
                return []
        if self.http:
            raise ReadOnlyError(f"{self.url}: HTTP has no listings; read it through its published index.json")

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
        """Every object under `prefix`, recursively, with size and modification time."""
        out = []
        if self.local:
            base = self.path(prefix)
            for dirpath, _, files in os.walk(base):
                for name in files:
                    full = os.path.join(dirpath, name)
                    try:
                        st = os.stat(full)
                    except FileNotFoundError:
                        continue
                    rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                    out.append(ObjectInfo(rel, st.st_size, st.st_mtime))
            return out
        if self.http:
            raise ReadOnlyError(f"{self.url}: HTTP has no listings")

        def find():
            p = self.path(prefix)
            self.fs.invalidate_cache(p)
            try:
                found = self.fs.find(p, detail=True, withdirs=False)
            except FileNotFoundError:
                return {}
            return found

        for name, info in self._retry(f"listing {prefix}", find).items():
            rel = name[len(self.root) + 1:]
            mt = info.get("LastModified") or info.get("mtime") or info.get("created") or 0
            mt = mt.timestamp() if hasattr(mt, "timestamp") else float(mt)
            out.append(ObjectInfo(rel, int(info.get("size") or 0), mt))
        return out

    # -- writes ------------------------------------------------------------------------

    def write(self, key: str, data: bytes) -> None:
        """Write a whole object; locally via a temporary file and an atomic rename."""
        self._writable()
        if self.local:
            p = self.path(key)
            self._mkdirs(os.path.dirname(p))
            tmp = f"{p}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, p)
            except BaseException as e:
                _unlink(tmp)
                if isinstance(e, OSError):
                    raise self.write_error(key, e) from None
                raise
            return
        self._retry(f"writing {key}", self.fs.pipe_file, self.path(key), data)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create `key` only if it does not exist; False if someone else got there first.

        Local: write a temporary file, then `link` it into place (atomic, fails on an
        existing name, and the object is complete when it appears). S3: a conditional put.
        """
        self._writable()
        if self.local:
            p = self.path(key)
            self._mkdirs(os.path.dirname(p))
            tmp = f"{os.path.dirname(p)}/.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                _unlink(tmp)
                raise self.write_error(key, e) from None
            try:
                os.link(tmp, p)
                return True
            except FileExistsError:
                return False
            finally:
                _unlink(tmp)
        if self.protocol in ("s3", "s3a"):
            return self._s3_put_if_absent(key, data)
        # Other fsspec stores have no conditional put: check-then-write (documented race).
        if self.exists(key):
            return False
        self.write(key, data)
        return True

    def write_error(self, key: str, e: OSError) -> UserError:
        """One line for a refused or failed local write (a full disk, a read-only mount)."""
        return UserError(f"cannot write {self.path(key)} ({e.strerror or e}); free some space or choose a "
                         "writable location, then re-run (committed segments are kept)")

    def _s3_put_if_absent(self, key: str, data: bytes) -> bool:
        bucket, _, path = self.path(key).partition("/")

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

        return self._retry(f"committing {key}", put)

    def delete(self, keys: list[str]) -> None:
        self._writable()
        if self.local:
            for k in keys:
                _unlink(self.path(k))
            return
        if keys:
            self._retry("deleting objects", self.fs.rm, [self.path(k) for k in keys])

    def remove_empty_dirs(self, prefix: str) -> None:
        if not self.local:
            return
        for dirpath, _, _ in sorted(os.walk(self.path(prefix)), key=lambda t: -len(t[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass

    def _mkdirs(self, d: str) -> None:
        try:
            os.makedirs(d, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            raise UserError(f"cannot write to {self.url}: {e.filename} is not a directory; choose a writable location") from None
        except PermissionError as e:
            raise UserError(f"cannot write to {self.url}: permission denied ({e.filename}); choose a writable location") from None

    # -- zarr --------------------------------------------------------------------------

    def zarr_store(self, read_only: bool = False):
        """A zarr v3 store rooted at this location."""
        if self.local:
            from zarr.storage import LocalStore

            return LocalStore(self.root, read_only=read_only)
        from zarr.storage import FsspecStore

        opts = dict(self.storage_options)
        if self.protocol in ("s3", "s3a"):
            opts.setdefault("use_listings_cache", False)
        return FsspecStore.from_url(self.url, storage_options=opts, read_only=read_only or self.http)


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
