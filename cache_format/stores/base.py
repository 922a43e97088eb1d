"""The store interface every backend implements: keys are '/'-separated paths under a cache root.

`Location(url, storage_options)` picks the backend from the URL's protocol (backends register
the protocols they serve), so callers never branch on where a cache lives. What a backend can
do is declared, not tested for: `supports_listing` (HTTP has none: readers use the published
index.json), `supports_writes` (HTTP is read-only), `transfers_can_tear`, `parallel_reads` and
`zarr_writes_direct` (below); `exists` and `is_nonempty_dir` answer on every backend.

Every key reaches a backend through `Location.path`, which refuses a key that could leave the
root (`key_problem`): this is the one gate that reads, writes, listings and deletes of every
backend pass, whatever code built the key. The stricter rule for keys a cache's own records
name (within the format's layout) is `layout.py`'s, applied where records are parsed.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..errors import CacheError, UserError


class ReadOnlyError(UserError):
    """A write was attempted on a read-only location (HTTP)."""


class ShortRead(ConnectionError):
    """A body shorter than asked for (truncated response, reset mid-body): transient, retried."""


@dataclass
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch


_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


def key_problem(key) -> str | None:
    """Why `key` is not a key inside a root, or None: a '/'-separated relative path, normalized
    (no empty, '.' or '..' part), with no backslash or control character, and no scheme or
    drive (':' in its first part)."""
    if not isinstance(key, str) or not key:
        return "it is not a non-empty string"
    if key.startswith("/"):
        return "it is an absolute path"
    if _CONTROL.search(key):
        return "it holds a backslash or a control character"
    parts = key.split("/")
    if ":" in parts[0]:
        return "it names a scheme or a drive"
    if any(p in ("", ".", "..") for p in parts):
        return "it is not normalized (an empty, '.' or '..' part)"
    return None


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


class Location(ABC):
    """A cache root. `Location(url)` returns the backend for the URL's protocol."""

    supports_listing = True
    supports_writes = True
    # A read may come back damaged in transit (a torn or corrupted transfer), so a failed check
    # is worth one re-read; a local file read has no transfer to tear.
    transfers_can_tear = True
    # Each read waits on a round trip, so many small reads (commit records) go out at once.
    parallel_reads = True
    # zarr may write into `zarr_store()` itself (a local directory: existence checks cost no
    # request); otherwise a writer shows zarr memory and PUTs every object once through `write`.
    zarr_writes_direct = False
    protocols: tuple[str, ...] = ()  # the URL protocols a backend serves
    _backends: dict[str, type] = {}
    _fallback: type | None = None  # serves every protocol no backend claims (fsspec)

    def __init_subclass__(cls, fallback: bool = False, **kwargs):
        super().__init_subclass__(**kwargs)
        if "path" in cls.__dict__:  # the key gate stays one place that every backend goes through
            raise TypeError(f"{cls.__name__} overrides Location.path; implement _native_path instead")
        for p in cls.__dict__.get("protocols", ()):
            Location._backends[p] = cls
        if fallback:
            Location._fallback = cls

    def __new__(cls, url=None, storage_options: dict | None = None):  # no arguments: unpickling a backend
        if cls is Location:
            cls = Location._backends.get(protocol_of(os.fspath(url)), Location._fallback)
        return super().__new__(cls)

    def __init__(self, url, storage_options: dict | None = None):
        url = os.fspath(url)
        self.url = url.rstrip("/") or url
        self.storage_options = dict(storage_options or {})
        self.protocol = protocol_of(url)

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def path(self, key: str) -> str:
        """The backend's own path of `key`, once `key` is known to stay inside the root; every
        backend operation goes through here."""
        why = key_problem(key)
        if why is not None:
            raise CacheError(
                f"{self.url}: refused the key {key!r} ({why}): every key stays inside the root "
                "(docs/cache-format.md, *Keys*); nothing was read or written through it"
            )
        return self._native_path(key)

    @abstractmethod
    def _native_path(self, key: str) -> str:
        """The backend's own path of a checked key (backends call `path`, never this)."""

    # -- reads -------------------------------------------------------------------------

    @abstractmethod
    def read(self, key: str, fresh: bool = False, size: int | None = None) -> bytes:
        """A whole object. `size` (when the manifest knows it) turns a short body into a retry;
        `fresh` is a re-read after a failed check (locally: not through a cached mapping)."""

    @abstractmethod
    def read_range(self, key: str, start: int, end: int, fresh: bool = False) -> bytes:
        """Bytes [start, end) of an object; thread-safe. A short body is retried like a 5xx."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether `key` is there (HTTP, without listings: a GET of it succeeds)."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Names directly under `prefix` (fresh: never from a listings cache)."""

    @abstractmethod
    def walk(self, prefix: str) -> list[ObjectInfo]:
        """Every object under `prefix`, recursively, with size and modification time."""

    # -- writes ------------------------------------------------------------------------

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Write a whole object (a reader sees all of it or none)."""

    @abstractmethod
    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create `key` only if it does not exist; False if someone else got there first."""

    @abstractmethod
    def delete(self, keys: list[str]) -> None: ...

    def is_nonempty_dir(self) -> bool:
        """Whether the root is a directory with something in it (object stores have none)."""
        return False

    def remove_empty_dirs(self, prefix: str) -> None:
        """Directories left empty under `prefix` (object stores have none)."""
        return None

    def write_error(self, key: str, e: OSError) -> UserError:
        """One line for a refused or failed local write (a full disk, a read-only mount)."""
        return UserError(
            f"cannot write {self.path(key)} ({e.strerror or e}); free some space or choose a "
            "writable location, then re-run (committed segments are kept)"
        )

    # -- zarr --------------------------------------------------------------------------

    @abstractmethod
    def zarr_store(self, read_only: bool = False):
        """A zarr v3 store rooted at this location."""
