"""`open_cache`: now in the cache_format package itself."""

# shim: removed by the structure issue's last step
from . import open_cache

__all__ = ["open_cache"]
