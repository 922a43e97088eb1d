"""Chunk-granular, checked reads of one sharded zarr v3 array, without zarr.

The array's zarr.json gives its codecs, each shard's index (at the end of the object) the
byte range of every inner chunk; numcodecs decodes it. Every index is checked against its
CRC32C and every chunk against its committed digest before it is decoded (integrity.py).
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import commits, integrity
from .codecs import decoder, index_nbytes, inner_chunk_rows, parse_index
from .stores import Location

_EMPTY = np.uint64(2**64 - 1)
_POOL = ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="actcache-read")


class _ArrayReader:
    """Chunk-granular reads of one sharded zarr v3 array (1-D rows or 2-D residuals)."""

    def __init__(self, loc: Location, path: str, objects: dict):
        self.loc, self.path, self.objects = loc, path, objects
        meta = json.loads(integrity.read_checked(loc, f"{path}/zarr.json", objects.get("zarr.json"), commits.digest))
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.shard_rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        self.chunk_rows = inner_chunk_rows(meta)
        self.per_shard = self.shard_rows // self.chunk_rows
        self.decode = decoder(meta)
        self.row_shape = self.shape[1:]
        self._index: dict[int, np.ndarray | None] = {}
        self._lock = threading.Lock()

    @property
    def n_chunks(self) -> int:
        return -(-self.shape[0] // self.chunk_rows)

    def shard_key(self, s: int) -> str:
        return "c/" + "/".join([str(s)] + ["0"] * len(self.row_shape))

    def _shard_index(self, s: int, fresh: bool = False):
        with self._lock:
            if s in self._index and not fresh:
                return self._index[s]
        key = self.shard_key(s)
        obj = self.objects.get(key)
        if obj is None:
            idx = None  # zarr writes no object for an all-fill-value shard
        else:
            n = index_nbytes(self.per_shard)
            for attempt in range(2):
                tail = self.loc.read_range(
                    f"{self.path}/{key}", obj["size"] - n, obj["size"], fresh=fresh or attempt > 0
                )
                if not integrity.CHECK_READS or integrity.index_ok(tail, self.per_shard):
                    break
            else:
                raise integrity.fail(self.loc.url, f"{self.path}/{key}", "the shard index fails its CRC32C")
            idx = parse_index(tail, self.per_shard)
        with self._lock:
            self._index[s] = idx
        return idx

    def chunk(self, k: int, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk k's rows as stored (uint16 bits for residuals); into `out` (rows of this chunk) if given.

        A full chunk decodes straight into `out`; an edge chunk (stored padded to the chunk
        shape) or an all-fill one is decoded or made aside and copied."""
        rows = min(self.chunk_rows, self.shape[0] - k * self.chunk_rows)
        if out is not None and (
            out.shape != (rows, *self.row_shape)
            or out.dtype.itemsize != self.dtype.itemsize
            or not out.flags.c_contiguous
        ):
            raise ValueError(f"out must be a C-contiguous {(rows, *self.row_shape)} array of {self.dtype}")
        s, j = divmod(k, self.per_shard)
        idx = self._shard_index(s)
        if idx is not None and idx[j, 0] == _EMPTY and self._recorded(s, j):
            idx = self._shard_index(s, fresh=True)  # the index says absent, the commit recorded bytes
            if idx[j, 0] == _EMPTY:
                raise integrity.fail(
                    self.loc.url,
                    f"{self.path}/{self.shard_key(s)}",
                    f"the shard index marks inner chunk {j} absent, but it was written",
                )
        if idx is None or idx[j, 0] == _EMPTY:
            a = np.zeros((rows, *self.row_shape), self.dtype)
        else:
            off, nb = int(idx[j, 0]), int(idx[j, 1])
            nbytes = self.chunk_rows * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
            blob = self._blob(s, j, off, nb)
            if out is not None and rows == self.chunk_rows:
                self.decode(blob, nbytes, out.reshape(-1).view(np.uint8))
                return out
            a = self.decode(blob, nbytes).view(self.dtype).reshape(self.chunk_rows, *self.row_shape)[:rows]
        if out is None:
            return a
        out.view(self.dtype)[...] = a
        return out

    def _recorded(self, s: int, j: int) -> bool:
        """Whether the committed manifest holds a digest for inner chunk j of shard s (it was written)."""
        want = self.objects.get(self.shard_key(s), {}).get("chunks")
        return bool(integrity.CHECK_READS and want is not None and j < len(want) and want[j] is not None)

    def _blob(self, s: int, j: int, off: int, nb: int):
        """Chunk j of shard s's encoded bytes, checked against its committed digest (re-read once)."""
        key = f"{self.path}/{self.shard_key(s)}"
        want = self.objects.get(self.shard_key(s), {}).get("chunks")
        for attempt in range(2):
            blob = self.loc.read_range(key, off, off + nb, fresh=attempt > 0)
            if want is None or not integrity.CHECK_READS or (j < len(want) and want[j] == integrity.chunk_digest(blob)):
                return blob
        raise integrity.fail(self.loc.url, key, f"inner chunk {j} does not match its digest")

    def rows(self, a: int, b: int) -> np.ndarray:
        if b <= a:
            return np.zeros((0, *self.row_shape), self.dtype)
        k0, k1 = a // self.chunk_rows, (b - 1) // self.chunk_rows
        parts = list(_POOL.map(self.chunk, range(k0, k1 + 1))) if k1 > k0 else [self.chunk(k0)]
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        off = k0 * self.chunk_rows
        return out[a - off : b - off]
