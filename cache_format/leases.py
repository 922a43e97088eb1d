"""Writer leases: now in cache_format.concurrency."""

# shim: removed by the structure issue's last step
from .concurrency import KEEPER, LEASE, STALE_S, hold, hold_key, release, release_key

__all__ = ["KEEPER", "LEASE", "STALE_S", "hold", "hold_key", "release", "release_key"]
