"""The store a writer hands zarr: it records every object's size, BLAKE2b-256 and chunk digests.

What it records becomes the commit record's manifest, so nothing is hashed twice and no
object is ever read back to be hashed.
"""

from __future__ import annotations

import json
import threading

import numpy as np

from . import commits, integrity
from .stores import Location


def hashing_store(loc: Location):
    """A zarr store that records (size, BLAKE2b-256) of every object it writes.

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
            entry = {"size": int(view.nbytes), commits.DIGEST: commits.digest(view)}
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
                    raise loc.write_error(key, e) from None

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
