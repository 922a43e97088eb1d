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

Large objects are copied in pieces (`reader` to read into the copier's buffers, `upload` to
write), so a copy holds a few blocks in memory whatever the object's size, and an `Upload`
killed half way resumes at the byte where it stopped (a partial file locally, a multipart
upload on S3).

Every writing backend also passes the test-only fault points below (`fault_point`), so a
test can stop a command at a chosen store write, without timing.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import signal
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..errors import CacheError, UserError


class ReadOnlyError(UserError):
    """A write was attempted on a read-only location (HTTP)."""


class WriteFailed(UserError):
    """A refused or failed local write (a full disk, a read-only mount), in one line."""

    def __init__(self, loc: Location, key: str, e: OSError):
        super().__init__(
            f"cannot write {loc.path(key)} ({e.strerror or e}); free some space or choose a "
            "writable location, then re-run (committed segments are kept)"
        )


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


class ObjectReader:
    """Bytes [start, end) of one object, read in order into the caller's buffers (a copy's
    reads: no allocation per block). This one asks for each block as a range."""

    def __init__(self, loc: Location, key: str, start: int, end: int):
        self.loc, self.key, self.pos, self.end = loc, key, start, end

    def readinto(self, buf) -> int:
        """Fill `buf` (fewer bytes only at the end); returns how many bytes it holds."""
        n = min(len(buf), self.end - self.pos)
        if n > 0:
            buf[:n] = self.loc.read_range(self.key, self.pos, self.pos + n)
            self.pos += n
        return max(n, 0)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Upload(ABC):
    """One object written in pieces, in order; invisible until `commit`.

    `offset` is where the next `append` goes: above 0 when an earlier, killed transfer of the
    same content left its bytes behind. `resumed` hands those bytes back for checksumming
    before anything is appended.
    """

    offset: int = 0

    def resumed(self, read_source: Callable[[int, int], bytes]) -> Iterator[bytes]:
        """The `offset` bytes already there, in order (`read_source(start, end)` reads the
        source where the store cannot read them back). Stops early, lowering `offset`, at
        the first piece that is not the source's."""
        return iter(())

    @abstractmethod
    def append(self, data) -> None: ...

    @abstractmethod
    def commit(self) -> None:
        """Publish the object whole."""

    @abstractmethod
    def discard(self) -> None:
        """Drop what was written (a checksum mismatch: start over)."""


class StreamUpload(Upload):
    """A plain file-like writer (any fsspec store): not resumable, visible when closed."""

    def __init__(self, open_file: Callable[[], object]):
        self._open, self._f = open_file, None

    def append(self, data) -> None:
        if self._f is None:
            self._f = self._open()
        self._f.write(data)
        self.offset += len(data)

    def commit(self) -> None:
        if self._f is None:
            self._f = self._open()
        self._f.close()

    def discard(self) -> None:
        if self._f is not None and hasattr(self._f, "discard"):
            self._f.discard()


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
    def read(self, key: str, reread: bool = False, size: int | None = None) -> bytes:
        """A whole object. `size` (when the manifest knows it) turns a short body into a retry;
        `reread`: a re-read after a failed check (locally: not through a cached mapping)."""

    @abstractmethod
    def read_range(self, key: str, start: int, end: int, reread: bool = False) -> bytes:
        """Bytes [start, end) of an object; thread-safe. A short body is retried like a 5xx."""

    def reader(self, key: str, start: int, end: int) -> ObjectReader:
        """Bytes [start, end) of an object, read in order into the caller's buffers."""
        return ObjectReader(self, key, start, end)

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether `key` is there (HTTP, without listings: a GET of it succeeds)."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Names directly under `prefix` (never from a listings cache)."""

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

    @abstractmethod
    def upload(self, key: str, tag: str, size: int, part: int) -> Upload:
        """Write `key` (`size` bytes, content named by `tag`, its checksum) in `part`-byte pieces,
        resuming an earlier transfer of the same content where the backend can."""

    def holds(self, key: str, size: int, tag: str) -> bool:
        """Whether `key` already holds exactly this content (a copy killed after the object
        landed but before its commit); False where the backend cannot tell cheaply."""
        return False

    def is_nonempty_dir(self) -> bool:
        """Whether the root is a directory with something in it (object stores have none)."""
        return False

    def remove_empty_dirs(self, prefix: str) -> None:
        """Directories left empty under `prefix` (object stores have none)."""
        return None

    # -- zarr --------------------------------------------------------------------------

    @abstractmethod
    def zarr_store(self, read_only: bool = False):
        """A zarr v3 store rooted at this location."""


# -- the fault points every writing backend passes -------------------------------------------
#
# Crash-safety claims ("a kill at any point leaves nothing, or something the same command
# finishes") are only as good as the points they were tested at. Every writing backend calls
# `fault_point(key, "before")` and `fault_point(key, "after")` around each `write`,
# `create_exclusive` and `delete` (one call per key), so a test can stop a command exactly
# before or after its Nth write, or its first write of a given key, and then check what a
# re-run makes of it. Armed two ways (nothing is armed otherwise, and an unarmed point costs
# one attribute test):
#
# - in-process: `with armed(Fault(n=3, when="after")): ...` raises `Killed` (a BaseException,
#   so no `except Exception` cleanup pretends the process survived) at that point;
# - in a subprocess: `ACTCACHE_FAULT="kill:after:3"` or `"kill:after:commits/0000000001.json"`
#   sends the process SIGKILL there (a real kill -9: no cleanup, no finally blocks).


class Killed(BaseException):
    """An in-process stand-in for kill -9 at a store write."""


@dataclass
class Fault:
    """Stop at the `n`th write (counting from 1) whose key matches `key` (a glob), `when` before or after it."""

    n: int = 1
    when: str = "before"
    key: str = "*"
    action: str = "raise"  # raise Killed, or "kill": SIGKILL this process
    seen: int = 0  # matching writes begun so far
    target: tuple | None = None  # (thread, key) of the nth one, once it has begun
    fired: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hit(self, key: str, when: str) -> bool:
        if self.fired or not fnmatch.fnmatchcase(key, self.key):
            return False
        me = (threading.get_ident(), key)
        with self.lock:
            if when == "before":
                self.seen += 1
                if self.seen == self.n:
                    self.target = me
            if when == self.when and self.target == me:
                self.fired = True
                return True
        return False


def parse_fault(spec: str) -> Fault:
    """`ACTCACHE_FAULT`'s form: ACTION:WHEN:N or ACTION:WHEN:KEY-GLOB (ACTION kill or raise)."""
    action, when, what = spec.split(":", 2)
    if action not in ("kill", "raise") or when not in ("before", "after"):
        raise ValueError(f"ACTCACHE_FAULT={spec!r}: expected kill|raise:before|after:N|KEY-GLOB")
    if what.isdigit():
        return Fault(n=int(what), when=when, action=action)
    return Fault(n=1, when=when, key=what, action=action)


ARMED: Fault | None = parse_fault(os.environ["ACTCACHE_FAULT"]) if os.environ.get("ACTCACHE_FAULT") else None


def fault_point(key: str, when: str) -> None:
    """Called by every writing backend before and after each mutation of `key`."""
    f = ARMED
    if f is not None and f.hit(key, when):
        if f.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise Killed(f"fault injected {when} writing {key}")


@contextlib.contextmanager
def armed(fault: Fault):
    """Arm `fault` for the block (in-process tests); yields it so a test can see whether it fired."""
    global ARMED
    old, ARMED = ARMED, fault
    try:
        yield fault
    finally:
        ARMED = old
