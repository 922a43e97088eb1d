"""Creating a cache root crash-safely: now in cache_format.write."""

# shim: removed by the structure issue's last step
from .write import CacheExistsError

__all__ = ["CacheExistsError"]
