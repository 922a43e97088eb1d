"""Writing: create a cache, append segments, backfill a layer.

A segment writer buffers rows per layer and writes only whole shards (one object each,
never chunk by chunk into a shard), hashing every object as zarr hands it to the store.
On a clean exit it writes the token rows, the sequences table and the per-layer running
statistics, then commits one record that lists every object with its size and BLAKE2b-256 checksum.
Nothing is visible before that record exists, so a killed writer leaves only unreferenced
objects that `gc` removes after the grace period.
"""

from __future__ import annotations

import json
import os
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import integrity, leases, log, provenance
from .bf16 import to_bits
from .codecs import check as check_codec
from .codecs import zarr_compressors
from .errors import CacheError, UserError
from .stats import RunningStats
from .store import Location

ROW_COLUMNS = {"tokens": "int32", "seq_ids": "int64", "positions": "int32", "labels": "int8", "roles": "int8"}
ROW_CODEC = "zstd3"
_LAYER_POOL = ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="actcache-layer")
_FLUSH_POOL = ThreadPoolExecutor(max(2, min(16, os.cpu_count() or 2)), thread_name_prefix="actcache-flush")
TOKENIZER_DIR = "tokenizer"


def _new_id() -> str:
    """Sortable by creation time (gc reads its age from it too) and unique without coordination."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:12]


def _check_json(obj, what: str) -> None:
    try:
        log.dumps(obj)
    except (TypeError, ValueError) as e:
        raise UserError(f"{what} must be JSON-serializable ({e}); pass plain dicts, lists, str, int, float, bool") from None


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
            entry = {"size": int(view.nbytes), log.DIGEST: log.digest(view)}
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


class _ColumnSink:
    """Token-row columns of one segment, kept in memory (14 bytes a row) until commit."""

    def __init__(self):
        self.parts: dict[str, list] = {k: [] for k in ROW_COLUMNS}

    def add(self, rows: dict) -> None:
        for k, v in rows.items():
            self.parts[k].append(v)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: (np.concatenate(v) if v else np.zeros(0, ROW_COLUMNS[k])) for k, v in self.parts.items()}


def _refuse_duplicates(cols: dict) -> None:
    """A (seq_id, position) pair locates one row: a segment holding one twice is refused."""
    key = (cols["seq_ids"].astype(np.int64) << 32) | (cols["positions"].astype(np.int64) & 0xFFFFFFFF)
    if len(key) and len(np.unique(key)) != len(key):
        k = np.sort(key)
        d = k[1:][k[1:] == k[:-1]][0]
        raise UserError(f"append: row (seq_id {int(d >> 32)}, position {int(d & 0xFFFFFFFF)}) was appended twice "
                        "to one segment; each (seq_id, position) must be one row (nothing was committed)")


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


def sequences_table(records: list[dict]):
    import pyarrow as pa

    if not records:
        return pa.table({"seq_id": pa.array([], pa.int64()), "token_ids": pa.array([], pa.list_(pa.int32()))})
    table = pa.Table.from_pylist(records)
    table = table.set_column(table.schema.get_field_index("seq_id"), "seq_id", table["seq_id"].cast(pa.int64()))
    table = table.set_column(table.schema.get_field_index("token_ids"), "token_ids",
                             table["token_ids"].cast(pa.list_(pa.int32())))
    return table


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


class SegmentWriter(_CommitOnExit):
    """One writer's rows, committed atomically when the `with` block exits cleanly."""

    def __init__(self, writer: "CacheWriter", meta: dict | None, turn=None, defer: bool = False):
        _check_json(meta or {}, "segment meta")
        self.w = writer
        self.turn, self.defer = turn, defer  # an ordering.Turn: commit only after the segments before it
        self.prepared: dict | None = None  # defer: the record, for CacheWriter.commit_prepared
        self.id = _new_id()
        self.meta = dict(meta or {})
        self.layers = writer.layers
        self.store = _hashing_store(writer.loc)
        root = writer.root
        self.buffers = {L: _LayerBuffer(self.store, f"segments/{self.id}/{root['hook']}/{L}", L, root, root["hook"])
                        for L in self.layers}
        self.columns = _ColumnSink()
        self.records: list[dict] = []
        self.n_rows = 0
        self.committed: str | None = None
        self._open = False

    def __enter__(self) -> "SegmentWriter":
        self._open = True
        leases.hold(self.w.loc, f"segments/{self.id}")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._open = False
        return super().__exit__(exc_type, exc, tb)

    def append(self, residuals, tokens=None, seq_ids=None, positions=None, labels=None, roles=None) -> None:
        """Add N rows: residuals {layer: N×d bf16} plus the aligned token-row columns."""
        if not self._open:
            raise UserError("append outside its `with cache.segment():` block; rows are committed by the block")
        bits, n = _residual_bits(residuals, self.layers, self.w.d_model)
        rows = _rows(n, tokens, seq_ids, positions, labels, roles)
        if len(bits) > 1 and n >= 1024:  # layers are independent: stats, encode and hash them in parallel
            list(_LAYER_POOL.map(lambda kv: self.buffers[kv[0]].add(kv[1]), bits.items()))
        else:
            for L, b in bits.items():
                self.buffers[L].add(b)
        self.columns.add(rows)
        self.n_rows += n

    def add_sequences(self, records) -> None:
        """Per-sequence source records: each needs seq_id and token_ids; other fields are kept as given."""
        for r in records:
            if not isinstance(r, dict) or "seq_id" not in r or "token_ids" not in r:
                raise UserError("add_sequences: each record is a dict with at least seq_id and token_ids")
            _check_json(r, "a sequence record")
            self.records.append(dict(r))

    def commit(self) -> str | None:
        loc, root = self.w.loc, self.w.root
        base = f"segments/{self.id}"
        cols = self.columns.arrays()
        _refuse_duplicates(cols)
        layers = {}
        for L, buf in self.buffers.items():
            buf.finish()
            entry = buf.entry()
            stats_key = f"{base}/stats/{L}.json"
            data = log.dumps(buf.stats.to_json())
            loc.write(stats_key, data)
            entry["stats"] = {"path": stats_key, "size": len(data), log.DIGEST: log.digest(data)}
            layers[str(L)] = entry
        rows = _write_rows(self.store, f"{base}/rows", cols, root["chunk_tokens"])
        seq = None
        if self.records:
            data = _sequences_bytes(self.records)
            key = f"{base}/sequences.parquet"
            loc.write(key, data)
            seq = {"path": key, "size": len(data), log.DIGEST: log.digest(data), "count": len(self.records)}
        record = {"kind": "segment", "segment": self.id, "n_rows": self.n_rows, "layers": layers, "rows": rows,
                  "sequences": seq, "meta": self.meta, "provenance": provenance.record()}
        if self.defer:  # the caller commits it in its place (objects stay leased until it does)
            self.prepared = record
            leases.KEEPER.release_keep(loc, f"segments/{self.id}")
            return None
        if self.turn is not None:
            self.turn.wait()
        self.committed = log.commit(loc, record)
        if self.turn is not None:
            self.turn.done()
        leases.release(loc, f"segments/{self.id}")
        return self.committed

    def abandon(self) -> None:
        """Best effort: delete what this writer wrote (gc catches anything left)."""
        if self.turn is not None:
            self.turn.fail()
        leases.release(self.w.loc, f"segments/{self.id}")
        for buf in self.buffers.values():
            try:
                buf._wait()  # let a background shard write land before deleting
            except Exception:
                pass
        try:
            objs = self.w.loc.walk(f"segments/{self.id}")
            self.w.loc.delete([o.key for o in objs])
            self.w.loc.remove_empty_dirs(f"segments/{self.id}")
        except Exception:
            pass


class LayerBackfill:
    """Adds one layer to rows already committed, segment by segment, each atomically.

    The caller re-runs the model over each pending segment's rows in the same order and
    hands them back with their tokens, seq_ids and positions, which must match the stored
    rows exactly; anything else is refused, so a layer can never be misaligned.
    """

    def __init__(self, writer: "CacheWriter", layer: int):
        self.w, self.layer = writer, int(layer)

    def pending(self) -> list:
        """Committed segments that lack this layer, in commit order."""
        c = self.w.snapshot()
        return [s for s in c.segments if self.layer not in s.layers]

    def segment(self, segment_id: str) -> "_BackfillSegment":
        return _BackfillSegment(self, segment_id)

    def write(self, segment_id: str, residuals, tokens, seq_ids, positions) -> str:
        with self.segment(segment_id) as s:
            s.append(residuals, tokens=tokens, seq_ids=seq_ids, positions=positions)
        return s.committed


class _BackfillSegment(_CommitOnExit):
    def __init__(self, bf: LayerBackfill, segment_id: str):
        w = bf.w
        self.bf, self.w = bf, w
        self.cache = w.snapshot()
        infos = {s.id: s for s in self.cache.segments}
        if segment_id not in infos:
            raise CacheError(f"segment {segment_id!r} is not a committed segment of {w.url}; see `info`")
        self.info = infos[segment_id]
        if bf.layer in self.info.layers:
            raise UserError(f"segment {segment_id} already has layer {bf.layer}")
        self.stored = {k: self.cache._segment_column(self.cache._seg_index(segment_id), k)
                       for k in ("tokens", "seq_ids", "positions")}
        self.store = _hashing_store(w.loc)
        self.part = uuid.uuid4().hex[:12]
        path = f"segments/{segment_id}/backfill-{self.part}/{w.root['hook']}/{bf.layer}"
        self.buf = _LayerBuffer(self.store, path, bf.layer, w.root, w.root["hook"])
        self.n = 0
        self.committed = None

    def __enter__(self):
        leases.hold(self.w.loc, self._unit)
        return self

    @property
    def _unit(self) -> str:
        return f"segments/{self.info.id}/backfill-{self.part}"

    def abandon(self) -> None:
        leases.release(self.w.loc, self._unit)
        try:
            self.buf._wait()
        except Exception:
            pass
        try:
            base = f"segments/{self.info.id}/backfill-{self.part}"
            self.w.loc.delete([o.key for o in self.w.loc.walk(base)])
            self.w.loc.remove_empty_dirs(base)
        except Exception:
            pass  # gc removes whatever is left

    def append(self, residuals, tokens, seq_ids, positions) -> None:
        if not isinstance(residuals, dict):
            residuals = {self.bf.layer: residuals}
        bits, n = _residual_bits(residuals, [self.bf.layer], self.w.d_model, "backfill")
        s, e = self.n, self.n + n
        if e > self.info.n_rows:
            raise UserError(f"backfill of segment {self.info.id}: {e} rows exceed its {self.info.n_rows}; "
                            "the rows must match the segment exactly")
        for name, x in (("tokens", tokens), ("seq_ids", seq_ids), ("positions", positions)):
            got = _as_numpy(x, ROW_COLUMNS[name], name)
            if len(got) != n or not np.array_equal(got, self.stored[name][s:e]):
                raise UserError(f"backfill of segment {self.info.id}: {name} of rows {s}..{e} differ from the "
                                "stored rows; re-run over the same rows in the same order (misaligned layer refused)")
        self.buf.add(bits[self.bf.layer])
        self.n = e

    def commit(self) -> None:
        if self.n != self.info.n_rows:
            raise UserError(f"backfill of segment {self.info.id}: got {self.n} rows, the segment has "
                            f"{self.info.n_rows}; nothing was committed")
        self.buf.finish()
        entry = self.buf.entry()
        loc = self.w.loc
        stats_key = f"segments/{self.info.id}/backfill-{self.part}/stats/{self.bf.layer}.json"
        data = log.dumps(self.buf.stats.to_json())
        loc.write(stats_key, data)
        entry["stats"] = {"path": stats_key, "size": len(data), log.DIGEST: log.digest(data)}
        record = {"kind": "layer", "segment": self.info.id, "layer": self.bf.layer, "entry": entry,
                  "provenance": provenance.record()}
        self.committed = log.commit(loc, record)
        leases.release(loc, self._unit)


class CacheWriter:
    """Appends to an existing cache. Many writers (threads, processes, machines) may append at once."""

    def __init__(self, loc: Location, root: dict):
        self.loc, self.root = loc, root
        self.url = loc.url
        self._records: dict = {}  # commit records are immutable: read each once
        self._checked: set = set()  # ...and check each one's chain once

    def _replay(self) -> log.LogState:
        self._records = log.load_records(self.loc, self._records, self.root, self._checked)
        return log.replay(self.root, self._records)

    @property
    def d_model(self) -> int:
        return self.root["d_model"]

    @property
    def hook(self) -> str:
        return self.root["hook"]

    @property
    def layers(self) -> list[int]:
        """Layers every new segment must carry (declared at create time or by add_layer)."""
        return self._replay().declared

    def snapshot(self):
        """A fresh Cache of what is committed now."""
        from .reader import Cache

        self._replay()
        return Cache(self.loc, self.root, records=self._records, checked=self._checked)

    def segment(self, meta: dict | None = None, turn=None, defer: bool = False) -> SegmentWriter:
        """A new segment. `turn` (ordering.CommitOrder.turn(k)) makes it commit in plan order;
        `defer` leaves its record in `seg.prepared` for `commit_prepared` (e.g. by a coordinator)."""
        return SegmentWriter(self, meta, turn, defer)

    def adopt(self, record: dict) -> None:
        """Keep a prepared segment's lease alive here until `commit_prepared`."""
        leases.hold(self.loc, f"segments/{record['segment']}")

    def commit_prepared(self, record: dict) -> str:
        name = log.commit(self.loc, record)
        leases.release(self.loc, f"segments/{record['segment']}")
        return name

    def add_layer(self, layer: int) -> LayerBackfill:
        """Declare `layer` (new segments must then carry it) and return its backfill helper."""
        layer = int(layer)
        if layer < 0:
            raise UserError(f"layer {layer}: layers are non-negative integers")
        if layer not in self.layers:
            log.commit(self.loc, {"kind": "add_layer", "layer": layer, "provenance": provenance.record()})
        return LayerBackfill(self, layer)

    def retract(self, segment_id: str, reason: str = "") -> str:
        c = self.snapshot()
        if segment_id not in {s.id for s in c.segments}:
            raise CacheError(f"segment {segment_id!r} is not a live segment of {self.url}; list them with `info`")
        return log.commit(self.loc, {"kind": "retract", "segment": segment_id, "reason": reason,
                                     "provenance": provenance.record()})


def _tokenizer_payload(tokenizer_files) -> dict[str, bytes]:
    if tokenizer_files is None:
        return {}
    if isinstance(tokenizer_files, (str, Path)):
        d = Path(tokenizer_files)
        if not d.is_dir():
            raise UserError(f"tokenizer_files {d}: not a directory; pass a directory or a dict name → bytes")
        return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}
    if isinstance(tokenizer_files, dict):
        out = {}
        for k, v in tokenizer_files.items():
            if "/" in k or k.startswith("."):
                raise UserError(f"tokenizer file name {k!r}: use a plain file name")
            out[k] = v if isinstance(v, bytes) else Path(v).read_bytes()
        return out
    return {Path(p).name: Path(p).read_bytes() for p in tokenizer_files}


def create_cache(url, d_model: int, layers, meta: dict | None = None, hook: str = "resid_post",
                 codec: str = "blosc-zstd1", chunk_tokens: int = 4096, shard_mib: int = 256,
                 tokenizer_files=None, storage_options: dict | None = None) -> CacheWriter:
    """Create an empty cache at `url`; an error if one is already there (append with open_cache(url, mode="a"))."""
    if not isinstance(d_model, (int, np.integer)) or d_model <= 0:
        raise UserError(f"d_model must be a positive integer, got {d_model!r}")
    layers = sorted({int(x) for x in layers})
    if not layers or layers[0] < 0:
        raise UserError(f"layers must be a non-empty list of non-negative integers, got {layers!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", hook or ""):
        raise UserError(f"hook {hook!r}: use a name like resid_post")
    check_codec(codec)
    if chunk_tokens <= 0 or shard_mib <= 0:
        raise UserError("chunk_tokens and shard_mib must be positive")
    meta = dict(meta or {})
    _check_json(meta, "meta")
    tok = _tokenizer_payload(tokenizer_files)
    loc = Location(url, storage_options)
    if loc.http:
        raise UserError(f"{url}: HTTP is read-only; create the cache locally or on S3 and `publish` it")
    chunk_bytes = chunk_tokens * d_model * 2
    shard_rows = max(1, round(shard_mib * 2**20 / chunk_bytes)) * chunk_tokens  # shard_mib may be fractional
    attrs = {"format": provenance.FORMAT_NAME, "format_version": provenance.FORMAT_VERSION,
             "d_model": int(d_model), "hook": hook, "layers": layers, "dtype": "bfloat16",
             "codec": codec, "chunk_tokens": int(chunk_tokens), "shard_rows": int(shard_rows),
             "shard_mib": shard_mib, "row_columns": ROW_COLUMNS,
             "meta": meta, "provenance": provenance.record(),
             "tokenizer": {k: {"size": len(v), log.DIGEST: log.digest(v)} for k, v in tok.items()}}
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {provenance.FORMAT_NAME: attrs}}
    try:
        if loc.exists(log.ROOT_META):
            log.read_root(loc)  # raises "not a cache" for a foreign zarr.json
            raise UserError(f"{url} already holds a cache; append to it with open_cache(url, mode='a')")
        if loc.local and os.path.isdir(loc.root) and os.listdir(loc.root):
            raise UserError(f"{url} is a non-empty directory that is not a cache; choose a new or empty location "
                            "(nothing there was changed)")
        for name, data in tok.items():
            loc.write(f"{TOKENIZER_DIR}/{name}", data)
        if not loc.create_exclusive(log.ROOT_META, log.dumps(doc)):
            raise UserError(f"{url} already holds a cache; append to it with open_cache(url, mode='a')")
        loc.create_exclusive(f"{log.COMMITS}/{log.ROOT_RECORD}", log.dumps(log.root_record(attrs)))
    except UserError:
        raise
    except OSError as e:
        raise UserError(f"cannot write to {url} ({type(e).__name__}: {e}); choose a writable location "
                        "(for S3: does the bucket exist?)") from None
    return CacheWriter(loc, attrs)
