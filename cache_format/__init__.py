"""The on-disk contract between harvest and train: a shareable, verifiable, append-only
zarr v3 activation cache. See docs/cache-format.md for the format and this API."""

from __future__ import annotations

from . import log
from .errors import CacheError, RemoteError, UserError
from .integrity import IntegrityError
from .layout import (
    LABEL_CORRECT,
    LABEL_NONE,
    LABEL_WRONG,
    ROLE_ANSWER,
    ROLE_CODES,
    ROLE_NAMES,
    ROLE_PROMPT,
    ROLE_TEXT,
    ROLE_THINKING,
)
from .read import Cache, SegmentInfo
from .split import Split
from .stores import Location
from .write import CacheWriter, LayerBackfill, SegmentWriter, create_cache


def open_cache(url, mode: str = "r", storage_options: dict | None = None):
    """mode "r": a `Cache` (a snapshot of what is committed now); mode "a": a `CacheWriter`
    to append segments or layers. `url` may also be a `stores.Location`."""
    loc = url if isinstance(url, Location) else Location(url, storage_options)
    if mode == "r":
        return Cache(log.load(loc))
    if mode == "a":
        root = log.read_root(loc)
        if not loc.supports_writes:
            raise UserError(f"{loc.url}: HTTP caches are read-only; open with mode='r'")
        if root.get("format_version", 1) >= 2 and not log.list_commits(loc)[0]:
            raise log.UnfinishedCacheError(loc.url)  # never append record 1 without record 0
        return CacheWriter(loc, root)
    raise UserError(f"open_cache mode {mode!r}: use 'r' to read or 'a' to append")


__all__ = [
    "create_cache",
    "open_cache",
    "Cache",
    "CacheWriter",
    "SegmentWriter",
    "LayerBackfill",
    "SegmentInfo",
    "Split",
    "UserError",
    "CacheError",
    "RemoteError",
    "IntegrityError",
    "ROLE_TEXT",
    "ROLE_PROMPT",
    "ROLE_THINKING",
    "ROLE_ANSWER",
    "LABEL_CORRECT",
    "LABEL_WRONG",
    "LABEL_NONE",
    "ROLE_CODES",
    "ROLE_NAMES",
]
