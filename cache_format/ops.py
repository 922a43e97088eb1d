"""The whole-cache operations behind the CLI, one module each; this module only gathers their names."""

from __future__ import annotations

from .card import card
from .gc import MIN_GRACE_S, gc, parse_age
from .importer import import_dump, load_dump
from .info import info, rows_by_source
from .publish import publish
from .shard_stats import dask_stats
from .sync import sync
from .verify import segment_objects, verify

__all__ = [
    "MIN_GRACE_S",
    "card",
    "dask_stats",
    "gc",
    "import_dump",
    "info",
    "load_dump",
    "parse_age",
    "publish",
    "rows_by_source",
    "segment_objects",
    "sync",
    "verify",
]
