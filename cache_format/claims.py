"""Work claims: now in cache_format.concurrency."""

# shim: removed by the structure issue's last step
from .concurrency import CLAIMS, POLL_S, Claim, Claims, safe_name, wait_for

__all__ = ["CLAIMS", "POLL_S", "Claim", "Claims", "safe_name", "wait_for"]
