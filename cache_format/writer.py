"""Writing a cache: now cache_format.write."""

# shim: removed by the structure issue's last step
from .write import CacheWriter, LayerBackfill, SegmentWriter, create_cache

__all__ = ["CacheWriter", "LayerBackfill", "SegmentWriter", "create_cache"]
