"""The on-disk contract between harvest and train: a shareable, verifiable, append-only
zarr v3 activation cache. See docs/cache-format.md for the format."""

from .errors import CacheError, RemoteError, UserError
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
from .opener import open_cache
from .reader import Cache, SegmentInfo
from .writer import CacheWriter, LayerBackfill, SegmentWriter, create_cache

__all__ = [
    "create_cache",
    "open_cache",
    "Cache",
    "CacheWriter",
    "SegmentWriter",
    "LayerBackfill",
    "SegmentInfo",
    "UserError",
    "CacheError",
    "RemoteError",
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
