"""A cache in a local directory: the OS directly, atomic renames, `link` for exclusive create.

Shard files are memory-mapped once, so ranged reads are views into the page cache, not copies.
"""

from __future__ import annotations

import mmap
import os
import threading
import uuid

from ..atomic import write_atomic
from ..errors import CacheError, UserError
from . import faults
from .base import Location, ObjectInfo


class LocalLocation(Location):
    protocols = ("file", "local")
    transfers_can_tear = False
    parallel_reads = False
    zarr_writes_direct = True

    def __init__(self, url, storage_options: dict | None = None):
        super().__init__(url, storage_options)
        url = os.fspath(url)
        self.root = os.path.abspath(url.split("://", 1)[1] if "://" in url else url)
        self.fs = None
        self._mmaps: dict = {}  # local shard files mapped once: reads are views, not copies
        self._mmap_lock = threading.Lock()

    def _native_path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    # -- reads -------------------------------------------------------------------------

    def read(self, key: str, fresh: bool = False, size: int | None = None) -> bytes:
        with open(self.path(key), "rb") as f:
            return f.read()

    def read_range(self, key: str, start: int, end: int, fresh: bool = False) -> bytes:
        """Zero-copy: a view into the mapped (immutable) shard file; `fresh` re-reads the file itself."""
        if end <= start:
            return b""
        if fresh:  # re-read from the file itself, and map it anew next time
            with self._mmap_lock:
                self._mmaps.pop(key, None)
            with open(self.path(key), "rb") as f:
                out = os.pread(f.fileno(), end - start, start)
        else:
            m = self._mmap(key)
            out = memoryview(m)[start : min(end, len(m))]
        if len(out) != end - start:
            raise CacheError(
                f"{self.url}/{key}: short read ({len(out)} of {end - start} bytes); the object "
                "is truncated: run `python -m cache_format verify`"
            )
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
        return os.path.exists(self.path(key))

    def list(self, prefix: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(prefix)))
        except FileNotFoundError:
            return []

    def walk(self, prefix: str) -> list[ObjectInfo]:
        out = []
        for dirpath, _, files in os.walk(self.path(prefix)):
            for name in files:
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                out.append(ObjectInfo(rel, st.st_size, st.st_mtime))
        return out

    # -- writes ------------------------------------------------------------------------

    def write(self, key: str, data: bytes) -> None:
        """Via a temporary file and an atomic rename (atomic.py; a failed write leaves no temporary)."""
        p = self.path(key)
        self._mkdirs(os.path.dirname(p))
        faults.point(key, "before")
        try:
            write_atomic(p, data)
        except OSError as e:
            raise self.write_error(key, e) from None
        faults.point(key, "after")

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write a temporary file, then `link` it into place (atomic, fails on an existing name,
        and the object is complete when it appears)."""
        p = self.path(key)
        self._mkdirs(os.path.dirname(p))
        faults.point(key, "before")
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
        except FileExistsError:
            return False
        finally:
            _unlink(tmp)
        faults.point(key, "after")
        return True

    def delete(self, keys: list[str]) -> None:
        for k in keys:
            faults.point(k, "before")
            _unlink(self.path(k))
            faults.point(k, "after")

    def is_nonempty_dir(self) -> bool:
        """Something besides the temporaries a killed write leaves (`.tmp-*`, `.NAME.tmp-*`)."""
        return os.path.isdir(self.root) and any(not (n.startswith(".") and ".tmp-" in n) for n in os.listdir(self.root))

    def remove_empty_dirs(self, prefix: str) -> None:
        for dirpath, _, _ in sorted(os.walk(self.path(prefix)), key=lambda t: -len(t[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass

    def _mkdirs(self, d: str) -> None:
        try:
            os.makedirs(d, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            raise UserError(
                f"cannot write to {self.url}: {e.filename} is not a directory; choose a writable location"
            ) from None
        except PermissionError as e:
            raise UserError(
                f"cannot write to {self.url}: permission denied ({e.filename}); choose a writable location"
            ) from None

    def zarr_store(self, read_only: bool = False):
        from zarr.storage import LocalStore

        return LocalStore(self.root, read_only=read_only)


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
