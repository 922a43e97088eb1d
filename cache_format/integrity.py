"""Checks that make every read serve exactly the committed bytes, or fail in one line.

A whole-object BLAKE2b (the manifest's) is too coarse for ranged reads of one inner chunk,
so writers also record, per shard object, the XXH3-64 of every inner chunk's encoded bytes
(`"chunks": [hex | null, ...]` in index order). Readers check the shard index's own
CRC32C (zarr v3 sharding), then each chunk against its digest before decoding it, and
small objects (array metadata, stats, sequences, tokenizer files) against their BLAKE2b.
A mismatch is re-read once from the store (a flipped bit in transit or a torn cache),
then raised as a `CorruptObject` (an IntegrityError) naming the object.
"""

from __future__ import annotations

import google_crc32c
import numpy as np
import xxhash

from .errors import CacheError
from .log import matches

CHECK_READS = True  # bench/bench_loader.py turns it off to measure what the checks cost; nothing else should
CHUNK_DIGEST = "xxh3_64"  # name recorded in the format docs; the key in a manifest entry is "chunks"
_EMPTY = 2**64 - 1


class IntegrityError(CacheError):
    """Stored bytes do not match what was committed."""


def chunk_digest(data) -> str:
    """XXH3-64 hex of one encoded inner chunk (bytes or any buffer; no copy)."""
    return xxhash.xxh3_64_hexdigest(data)


def index_ok(tail, per_shard: int) -> bool:
    """True if a shard index (16·m bytes of offsets/sizes, then a little-endian CRC32C) is intact."""
    body = bytes(tail[: 16 * per_shard])
    return len(tail) == 16 * per_shard + 4 and google_crc32c.value(body) == int.from_bytes(bytes(tail[-4:]), "little")


def shard_chunk_digests(data, per_shard: int, key: str = "shard") -> list[str | None]:
    """The chunk digests of a whole shard object (None for an absent chunk); checks its index."""
    mv = memoryview(data).cast("B")
    n = 16 * per_shard + 4
    tail = mv[len(mv) - n :]
    if not index_ok(tail, per_shard):
        raise IntegrityError(f"{key}: the shard index fails its CRC32C; the object is corrupt")
    idx = np.frombuffer(bytes(tail[: 16 * per_shard]), "<u8").reshape(per_shard, 2)
    return [None if int(off) == _EMPTY else chunk_digest(mv[int(off) : int(off) + int(nb)]) for off, nb in idx]


def per_shard_of(array_meta: dict) -> int | None:
    """Inner chunks per shard of a sharded zarr v3 array's metadata (None if it is not sharded)."""
    try:
        outer = array_meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        (shard,) = [c for c in array_meta["codecs"] if c["name"] == "sharding_indexed"]
        return outer // shard["configuration"]["chunk_shape"][0]
    except (KeyError, TypeError, ValueError, IndexError):
        return None


class CorruptObject(IntegrityError):
    """An object that fails its check again after a re-read from the store: the stored bytes are bad."""

    def __init__(self, url: str, key: str, what: str):
        super().__init__(
            f"{url}/{key}: {what} after re-reading it from the store: the stored object is "
            "corrupt; run `python -m cache_format verify` and retract the segment or re-sync it "
            "from a good copy"
        )


def read_checked(loc, key: str, want: dict | None) -> bytes:
    """A whole small object, checked against its manifest entry (re-read once)."""
    for attempt in range(2):
        data = loc.read(key, reread=attempt > 0, size=want["size"] if want else None)
        if want is None or matches(want, data):
            return data
    raise CorruptObject(loc.url, key, "size or checksum mismatch")
