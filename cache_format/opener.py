"""`open_cache`: the one entry point that picks a reader (a snapshot) or a writer (to append).

It lives apart from reader.py and writer.py so that neither imports the other back: the
writer builds on the reader's snapshots, and only this module knows both.
"""

from __future__ import annotations

from . import commits
from .errors import CacheError, UserError
from .reader import Cache
from .stores import Location
from .writer import CacheWriter


def open_cache(url, mode: str = "r", storage_options: dict | None = None):
    """mode "r": a Cache snapshot; mode "a": a CacheWriter to append segments or layers."""
    loc = url if isinstance(url, Location) else Location(url, storage_options)
    try:
        root = commits.read_root(loc)
    except CacheError:
        if not loc.transfers_can_tear:
            raise
        root = commits.read_root(loc)  # a torn transfer of zarr.json reads as "not a cache": once more
    if mode == "r":
        try:
            return Cache(loc, root)
        except CacheError:
            if not loc.transfers_can_tear:
                raise
            return Cache(loc, commits.read_root(loc))  # root and log re-read: a corrupted transfer of either
    if mode == "a":
        if not loc.supports_writes:
            raise UserError(f"{loc.url}: HTTP caches are read-only; open with mode='r'")
        if root.get("format_version", 1) >= 2 and not commits.list_commits(loc)[0]:
            raise commits.unfinished(loc.url)  # never append record 1 without record 0
        return CacheWriter(loc, root)
    raise UserError(f"open_cache mode {mode!r}: use 'r' to read or 'a' to append")
