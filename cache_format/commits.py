"""The commit log: now cache_format.log (transfer.py and stores/local.py still import it here)."""

# shim: removed by the structure issue's last step
from .log import (
    COMMITS,
    DIGEST,
    INDEX,
    ROOT_META,
    ROOT_RECORD,
    NotACacheError,
    UnfinishedCacheError,
    commit,
    digest,
    dumps,
    hasher,
    list_commits,
    load_records,
    read_root,
    replay,
    root_digest,
)

__all__ = [
    "COMMITS",
    "DIGEST",
    "INDEX",
    "ROOT_META",
    "ROOT_RECORD",
    "NotACacheError",
    "UnfinishedCacheError",
    "commit",
    "digest",
    "dumps",
    "hasher",
    "list_commits",
    "load_records",
    "read_root",
    "replay",
    "root_digest",
]
