"""The on-disk contract between harvest and train: a shareable, verifiable, append-only
zarr v3 activation cache. See docs/cache-format.md for the format."""

from .errors import CacheError, RemoteError, UserError
from .reader import Cache, SegmentInfo, open_cache
from .writer import CacheWriter, LayerBackfill, SegmentWriter, create_cache

ROLE_TEXT, ROLE_PROMPT, ROLE_THINKING, ROLE_ANSWER = 0, 1, 2, 3
LABEL_CORRECT, LABEL_WRONG, LABEL_NONE = 1, 0, -1

__all__ = [
    "create_cache", "open_cache", "Cache", "CacheWriter", "SegmentWriter", "LayerBackfill", "SegmentInfo",
    "UserError", "CacheError", "RemoteError",
    "ROLE_TEXT", "ROLE_PROMPT", "ROLE_THINKING", "ROLE_ANSWER", "LABEL_CORRECT", "LABEL_WRONG", "LABEL_NONE",
]
