"""The commit log: now cache_format.log (transfer.py still imports it here)."""

# shim: removed by the structure issue's last step, once transfer.py imports cache_format.log
from .log import DIGEST, digest, hasher

__all__ = ["DIGEST", "digest", "hasher"]
