"""Commits in plan order: now in cache_format.concurrency."""

# shim: removed by the structure issue's last step
from .concurrency import CommitOrder, OrderBroken, Turn

__all__ = ["CommitOrder", "OrderBroken", "Turn"]
