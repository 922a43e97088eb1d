"""The parts a segment (or a backfilled layer) is made of, and the commit protocol both share.

Rows are validated here (`_rows`, `_residual_bits`); residuals go into sharded zarr arrays a
whole shard at a time (`_LayerBuffer`), through a store that records every object's size,
BLAKE2b-256 and per-chunk XXH3 digests as zarr hands it over (`_hashing_store`); row columns
and the sequences table are written at commit. `_CommitOnExit` commits a clean `with` block
and abandons (deletes) what a failed one wrote.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import commits, integrity
from .bf16 import to_bits
from .codecs import zarr_compressors
from .errors import UserError
from .layout import ROW_COLUMNS, sequences_table
from .stats import RunningStats
from .store import Location

ROW_CODEC = "zstd3"
_FLUSH_POOL = ThreadPoolExecutor(max(2, min(16, os.cpu_count() or 2)), thread_name_prefix="actcache-flush")


def _hashing_store(loc: Location):
    """A zarr store that records (size, BLAKE2b-256) of every object it writes.

    Locally it writes through zarr's LocalStore. Remotely, zarr only sees an in-memory
    store for metadata and every object is PUT once through the Location (with retries):
    a segment's paths are unique to its writer, so zarr's existence checks never need
    the network, and each shard costs exactly one request.
    """
    import asyncio

    from zarr.storage import MemoryStore, WrapperStore

    remote = not loc.local

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
            if remote:
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
            if remote:
                if not await self._store.exists(key):
                    await self._store.set(key, value)
                    await asyncio.to_thread(loc.write, key, value.to_bytes())
            else:
                await self._store.set_if_not_exists(key, value)

        async def delete(self, key):
            with self.lock:
                self.written.pop(key, None)
            if remote:
                await asyncio.to_thread(loc.delete, [key])
                if await self._store.exists(key):
                    await self._store.delete(key)
            else:
                await self._store.delete(key)

    return HashingStore(MemoryStore() if remote else loc.zarr_store())


class _LayerBuffer:
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
        self._wait()

    def _wait(self) -> None:
        if self.inflight is not None:
            f, self.inflight = self.inflight, None
            f.result()  # re-raises a failed background write

    def _ensure_array(self):
        if self.array is None:
            import zarr

            self.array = zarr.create_array(
                store=self.store, name=self.path, shape=(0, self.d), dtype="uint16",
                chunks=(self.chunk_rows, self.d), shards=(self.shard_rows, self.d),
                compressors=zarr_compressors(self.codec), filters=(), fill_value=0,
                attributes={"actcache_dtype": "bfloat16", "hook": self.hook, "layer": self.layer},
                dimension_names=["token", "d_model"],
                config={"write_empty_chunks": True})  # skips zarr's per-chunk all-fill scan (~half the write time)

    def _flush(self, n: int) -> None:
        self._ensure_array()
        data = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        block, rest = data[:n], data[n:]
        self.pending = [rest] if len(rest) else []
        self.n_pending = len(rest)
        s = self.n_written
        self._wait()  # one shard in flight per layer: bounded memory, shards land in order

        def write():
            self.array.resize((s + n, self.d))
            self.array[s:s + n] = block

        self.inflight = _FLUSH_POOL.submit(write)
        self.n_written += n

    def entry(self) -> dict:
        prefix = self.path + "/"
        objects = {k[len(prefix):]: v for k, v in self.store.written.items() if k.startswith(prefix)}
        return {"array": self.path, "n_rows": self.n_written, "objects": objects}


def _as_numpy(x, dtype: str, what: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise UserError(f"{what}: expected a 1-D array, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise UserError(f"{what}: expected integers, got {a.dtype}")
    out = a.astype(dtype)
    if a.size and not np.array_equal(out, a):
        raise UserError(f"{what}: values do not fit {dtype}")
    return out


def _rows(n_expected, tokens, seq_ids, positions, labels, roles) -> dict[str, np.ndarray]:
    cols = {"tokens": tokens, "seq_ids": seq_ids, "positions": positions, "labels": labels, "roles": roles}
    out = {}
    for name, x in cols.items():
        if x is None:
            if name in ("labels", "roles"):
                out[name] = np.full(n_expected, -1 if name == "labels" else 0, np.int8)
                continue
            raise UserError(f"append: {name} is required (one value per residual row)")
        out[name] = _as_numpy(x, ROW_COLUMNS[name], name)
        if len(out[name]) != n_expected:
            raise UserError(f"append: {name} has {len(out[name])} rows but the residuals have {n_expected}; "
                            "pass one value per row")
    if out["roles"].size and (out["roles"].min() < 0 or out["roles"].max() > 3):
        raise UserError("append: roles must be 0 text, 1 prompt, 2 thinking or 3 answer")
    if out["labels"].size and (out["labels"].min() < -1 or out["labels"].max() > 1):
        raise UserError("append: labels must be 1 correct, 0 wrong or -1 none")
    return out


def _residual_bits(residuals, layers: list[int], d: int, what: str = "append") -> tuple[dict, int]:
    if not isinstance(residuals, dict):
        raise UserError(f"{what}: residuals must be a dict {{layer: N×d_model bf16}}")
    got = {int(k) for k in residuals}
    if got != set(layers):
        missing, extra = sorted(set(layers) - got), sorted(got - set(layers))
        raise UserError(f"{what}: residuals must cover exactly layers {layers}"
                        + (f"; missing {missing}" if missing else "") + (f"; not in the cache {extra}" if extra else "")
                        + (" (add a layer with add_layer first)" if extra else ""))
    out, n = {}, None
    for k, x in residuals.items():
        bits = to_bits(x, f"residuals[{k}]")
        if bits.ndim != 2 or bits.shape[1] != d:
            raise UserError(f"{what}: residuals[{k}] has shape {tuple(bits.shape)} but the cache's d_model is {d}; "
                            "d_model mismatch: append to a cache made for this model")
        if n is not None and len(bits) != n:
            raise UserError(f"{what}: layers have different row counts ({n} vs {len(bits)})")
        n = len(bits)
        out[int(k)] = bits
    return out, n or 0


def _write_rows(store, prefix: str, cols: dict, chunk_rows: int) -> dict:
    import zarr

    for name, a in cols.items():
        n = len(a)
        shard = max(1, -(-n // chunk_rows)) * chunk_rows
        arr = zarr.create_array(store=store, name=f"{prefix}/{name}", shape=(n,), dtype=ROW_COLUMNS[name],
                                chunks=(chunk_rows,), shards=(shard,), compressors=zarr_compressors(ROW_CODEC),
                                filters=(), fill_value=0, dimension_names=["token"],
                                config={"write_empty_chunks": True})
        if n:
            arr[:] = a
    p = prefix + "/"
    return {"path": prefix, "objects": {k[len(p):]: v for k, v in store.written.items() if k.startswith(p)}}


def _sequences_bytes(records: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = sequences_table(records)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()


class _CommitOnExit:
    """Commits when the `with` block exits cleanly; abandons what was written when it raises, or
    when the commit itself fails before its record landed."""

    committed: str | None = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                if self.committed is None:
                    self.abandon()
                raise
        else:
            self.abandon()
        return False
