"""Bytes into sharded zarr objects, as a writer makes them: residuals a whole shard at a time
(never chunk by chunk into a shard), row columns at commit, and every object hashed as zarr
hands it to the store.

What the hashing store records (size, BLAKE2b-256 and the chunk digests of each object) is
the commit record's manifest, so nothing is hashed twice and no object is read back.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import integrity, log
from .codecs import zarr_compressors
from .layout import ROW_COLUMNS
from .stats import RunningStats
from .stores import Location, WriteFailed

ROW_CODEC = "zstd3"
_FLUSH_POOL = ThreadPoolExecutor(max(2, min(16, os.cpu_count() or 2)), thread_name_prefix="actcache-flush")


class LayerBuffer:
    """Rows of one layer on their way into one sharded array, written a whole shard at a time."""

    def __init__(self, store, path: str, layer: int, root: dict, hook: str):
        self.store, self.path, self.layer = store, path, layer
        self.d = root["d_model"]
        self.shard_rows = root["shard_rows"]
        self.chunk_rows = root["chunk_tokens"]
        self.codec = root["codec"]
        self.hook = hook
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.n_written = 0
        self.array = None
        self.inflight = None  # the previous shard's encode + write, running in the background
        self.stats = RunningStats(self.d)

    def add(self, bits: np.ndarray) -> None:
        self.stats.update_bits(bits)  # overlaps with the previous shard's encode in the background
        self.pending.append(bits)
        self.n_pending += len(bits)
        while self.n_pending >= self.shard_rows:
            self._flush(self.shard_rows)

    def finish(self) -> None:
        if self.array is None:
            # Everything fit in one partial shard: size the shard to the data, so that a
            # small segment does not carry the index of a full-size shard.
            self.shard_rows = max(1, -(-self.n_pending // self.chunk_rows)) * self.chunk_rows
        self._ensure_array()
        if self.n_pending:
            self._flush(self.n_pending)
        self.wait()

    def wait(self) -> None:
        """Until the shard write in flight (if any) has landed; re-raises its failure."""
        if self.inflight is not None:
            f, self.inflight = self.inflight, None
            f.result()  # re-raises a failed background write

    def _ensure_array(self):
        if self.array is None:
            import zarr

            self.array = zarr.create_array(
                store=self.store,
                name=self.path,
                shape=(0, self.d),
                dtype="uint16",
                chunks=(self.chunk_rows, self.d),
                shards=(self.shard_rows, self.d),
                compressors=zarr_compressors(self.codec),
                filters=(),
                fill_value=0,
                attributes={"actcache_dtype": "bfloat16", "hook": self.hook, "layer": self.layer},
                dimension_names=["token", "d_model"],
                config={"write_empty_chunks": True},
            )  # skips zarr's per-chunk all-fill scan (~half the write time)

    def _flush(self, n: int) -> None:
        self._ensure_array()
        data = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        block, rest = data[:n], data[n:]
        self.pending = [rest] if len(rest) else []
        self.n_pending = len(rest)
        s = self.n_written
        self.wait()  # one shard in flight per layer: bounded memory, shards land in order

        def write():
            self.array.resize((s + n, self.d))
            self.array[s : s + n] = block

        self.inflight = _FLUSH_POOL.submit(write)
        self.n_written += n

    def entry(self) -> dict:
        prefix = self.path + "/"
        objects = {k[len(prefix) :]: v for k, v in self.store.written.items() if k.startswith(prefix)}
        return {"array": self.path, "n_rows": self.n_written, "objects": objects}


def write_rows(store, prefix: str, cols: dict, chunk_rows: int) -> dict:
    import zarr

    for name, a in cols.items():
        n = len(a)
        shard = max(1, -(-n // chunk_rows)) * chunk_rows
        arr = zarr.create_array(
            store=store,
            name=f"{prefix}/{name}",
            shape=(n,),
            dtype=ROW_COLUMNS[name],
            chunks=(chunk_rows,),
            shards=(shard,),
            compressors=zarr_compressors(ROW_CODEC),
            filters=(),
            fill_value=0,
            dimension_names=["token"],
            config={"write_empty_chunks": True},
        )
        if n:
            arr[:] = a
    p = prefix + "/"
    return {"path": prefix, "objects": {k[len(p) :]: v for k, v in store.written.items() if k.startswith(p)}}


def hashing_store(loc: Location, digest: str):
    """A zarr store that records the manifest entry (size, checksum `digest`) of every object it writes.

    Where the backend allows (`zarr_writes_direct`: a local directory) it writes through zarr's
    own store. Otherwise zarr only sees an in-memory store for metadata and every object is PUT
    once through the Location (with retries):
    a segment's paths are unique to its writer, so zarr's existence checks never need
    the network, and each shard costs exactly one request.
    """
    import asyncio

    from zarr.storage import MemoryStore, WrapperStore

    via_location = not loc.zarr_writes_direct

    class HashingStore(WrapperStore):
        def __init__(self, store):
            super().__init__(store)
            self.written: dict[str, dict] = {}
            self.per_shard: dict[str, int] = {}  # array path → inner chunks per shard
            self.lock = threading.Lock()

        def _record(self, key, value):
            view = memoryview(np.ascontiguousarray(value.as_numpy_array())).cast("B")
            entry = log.entry(view, digest)
            if key.endswith("/zarr.json"):
                m = integrity.per_shard_of(json.loads(bytes(view)))
                if m:
                    with self.lock:
                        self.per_shard[key[: -len("/zarr.json")]] = m
            elif "/c/" in key:
                m = self.per_shard.get(key.rsplit("/c/", 1)[0])
                if m:  # what readers check every chunk against
                    entry["chunks"] = integrity.shard_chunk_digests(view, m, key)
            with self.lock:
                self.written[key] = entry

        async def set(self, key, value):
            self._record(key, value)
            if via_location:
                await asyncio.to_thread(loc.write, key, value.to_bytes())
                if key.endswith("zarr.json"):
                    await self._store.set(key, value)
            else:
                try:
                    await self._store.set(key, value)
                except OSError as e:  # a full disk: one line naming the object, not zarr's traceback
                    raise WriteFailed(loc, key, e) from None

        async def set_if_not_exists(self, key, value):
            # Only parent group metadata goes through here; it is shared, so never in a manifest.
            if key == "zarr.json":
                return  # the cache root: never touched by a segment writer
            if via_location:
                if not await self._store.exists(key):
                    await self._store.set(key, value)
                    await asyncio.to_thread(loc.write, key, value.to_bytes())
            else:
                await self._store.set_if_not_exists(key, value)

        async def delete(self, key):
            with self.lock:
                self.written.pop(key, None)
            if via_location:
                await asyncio.to_thread(loc.delete, [key])
                if await self._store.exists(key):
                    await self._store.delete(key)
            else:
                await self._store.delete(key)

    return HashingStore(MemoryStore() if via_location else loc.zarr_store())
