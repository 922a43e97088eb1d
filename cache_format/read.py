"""Reading: a snapshot of the committed rows (`Cache`), its row views, and checked chunk reads.

A `Cache` is a `log.LogSnapshot` (what was committed when it was opened) plus what it takes
to serve rows: global row offsets, the chunk map and one `ArrayReader` per segment array.
The reader needs no zarr: `ArrayReader` reads chunks straight from the shards with numcodecs.
That is the loader's fast path (`read_chunk`: one range read and one decode), and it is
thread-safe. Everything it serves is checked first (see integrity.py): the commit log's
chain, the shard index's CRC32C, each chunk's digest, and the BLAKE2b of every small object.
The row views (`c.residuals(layer)[i:j]`, `c.tokens[i:j]`) index it like arrays.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import integrity, log
from .codecs import decoder, index_nbytes, inner_chunk_rows, parse_index
from .errors import CacheError, UserError
from .layout import ROW_COLUMNS, bits_to_numpy, bits_to_torch, sequences_table, tokenizer_key
from .stats import RunningStats
from .stores import Location

_EMPTY = np.uint64(2**64 - 1)
_POOL = ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="actcache-read")


@dataclass
class SegmentInfo:
    id: str
    row_start: int
    n_rows: int
    meta: dict
    layers: list[int]
    commit: str = ""
    provenance: dict = field(default_factory=dict)
    seq_ranges: list | None = None  # runs [a, b) of its rows' seq_ids (log.py); None: not recorded


class Cache:
    """A snapshot of a cache's committed segments (open one with `open_cache`); `refresh()` picks
    up later commits. Rows never move under it."""

    def __init__(self, snapshot: log.LogSnapshot):
        self._arrays: dict = {}
        self._lock = threading.Lock()
        self._install(snapshot)

    # -- snapshot ----------------------------------------------------------------------

    def refresh(self) -> Cache:
        """Swap in the log as it is now (only records committed since are read)."""
        return self._install(log.load(self._log.loc, self._log))

    def _install(self, snap: log.LogSnapshot) -> Cache:
        _note_unverified(snap.url, snap.segments)
        self._log = snap
        self._segs = snap.segments
        n = np.array([s.record["n_rows"] for s in self._segs], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
        self._layers = snap.layers
        ct = snap.root["chunk_tokens"]
        bounds = [np.arange(self._starts[i], self._starts[i + 1], ct, dtype=np.int64) for i in range(len(self._segs))]
        self._bounds = np.concatenate(bounds + [self._starts[-1:]]).astype(np.int64)
        none = [np.zeros(0, np.int64)]
        self._chunk_seg = np.concatenate([np.full(len(b), i, np.int64) for i, b in enumerate(bounds)] + none)
        self._chunk_local = np.concatenate([np.arange(len(b), dtype=np.int64) for b in bounds] + none)
        self._fingerprint = None
        return self

    @property
    def log(self) -> log.LogSnapshot:
        """The commit log this snapshot shows: records, segment entries, root attributes
        (for record-level tools: verify, sync, info, stats)."""
        return self._log

    @property
    def url(self) -> str:
        return self._log.url

    @property
    def d_model(self) -> int:
        return self._log.root["d_model"]

    @property
    def hook(self) -> str:
        return self._log.root["hook"]

    @property
    def layers(self) -> list[int]:
        """Layers present in every committed segment."""
        return list(self._layers)

    @property
    def declared_layers(self) -> list[int]:
        return list(self._log.declared)

    @property
    def n_tokens(self) -> int:
        return int(self._starts[-1])

    @property
    def chunk_tokens(self) -> int:
        return self._log.root["chunk_tokens"]

    @property
    def codec(self) -> str:
        return self._log.root["codec"]

    @property
    def shard_rows(self) -> int:
        return self._log.root["shard_rows"]

    @property
    def meta(self) -> dict:
        """The creator's meta as given, plus `cache_format`: format/code/package versions, hardware."""
        root = self._log.root
        out = json.loads(json.dumps(root["meta"]))
        out["cache_format"] = dict(
            root["provenance"],
            codec=self.codec,
            chunk_tokens=self.chunk_tokens,
            shard_rows=self.shard_rows,
            hook=self.hook,
        )
        return out

    @property
    def segments(self) -> list[SegmentInfo]:
        return [
            SegmentInfo(
                s.id,
                int(self._starts[i]),
                s.record["n_rows"],
                s.record.get("meta", {}),
                sorted(s.layers),
                s.commit,
                s.record.get("provenance", {}),
                log.seq_ranges_of(s.record),
            )
            for i, s in enumerate(self._segs)
        ]

    @property
    def retracted(self) -> list[str]:
        return [s.id for s in self._log.retracted]

    @property
    def copy_of(self) -> dict | None:
        """A partial copy's source and selection, {url, root, layers, segments} (see `sync`); None otherwise."""
        return self._log.copy_of

    def layer_coverage(self) -> dict[int, int]:
        """Declared layer → how many live segments hold it (partial backfills show as fewer)."""
        return self._log.coverage()

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = log.cache_fingerprint(self._log.root, self._segs, self._layers)
        return self._fingerprint

    def layer_fingerprint(self, layer: int) -> str:
        return log.layer_fingerprint(self._log.root, self._segs, self._check_layer(layer))

    def _check_layer(self, layer) -> int:
        """`layer` as an int if every live segment holds it, else the snapshot's one-line CacheError."""
        layer = int(layer)
        if layer not in self._layers:
            self._log.check_layer(layer)  # raises: backfill pending, or not in the cache
        return layer

    # -- rows --------------------------------------------------------------------------

    def residuals(self, layer: int) -> ResidualView:
        return ResidualView(self, self._check_layer(layer))

    @property
    def tokens(self) -> ColumnView:
        return ColumnView(self, "tokens")

    @property
    def seq_ids(self) -> ColumnView:
        return ColumnView(self, "seq_ids")

    @property
    def positions(self) -> ColumnView:
        return ColumnView(self, "positions")

    @property
    def labels(self) -> ColumnView:
        return ColumnView(self, "labels")

    @property
    def roles(self) -> ColumnView:
        return ColumnView(self, "roles")

    def _layer_reader(self, si: int, layer: int) -> ArrayReader:
        """The chunk reader of segment `si`'s array of `layer` (made once, shared by threads)."""
        s = self._segs[si]
        key = (s.id, layer)
        with self._lock:
            r = self._arrays.get(key)
        if r is None:
            e = s.layers[layer]
            r = ArrayReader(self._log.loc, e["array"], e["objects"])
            with self._lock:
                self._arrays[key] = r
        return r

    def _column_reader(self, si: int, name: str) -> ArrayReader:
        """The chunk reader of segment `si`'s token-row column `name` (made once, shared by threads)."""
        s = self._segs[si]
        key = (s.id, name)
        with self._lock:
            r = self._arrays.get(key)
        if r is None:
            r = column_array(self._log.loc, s, name)
            with self._lock:
                self._arrays[key] = r
        return r

    def _gather(self, reader_of, i: int, j: int, row_shape: tuple, dtype) -> np.ndarray:
        """Global rows [i, j) as one array, from `reader_of(segment index)` of each segment they span."""
        if j <= i:
            return np.zeros((0, *row_shape), dtype)
        s0 = int(np.searchsorted(self._starts, i, side="right") - 1)
        s1 = int(np.searchsorted(self._starts, j, side="left") - 1)
        parts = []
        for si in range(s0, s1 + 1):
            a = max(i, self._starts[si]) - self._starts[si]
            b = min(j, self._starts[si + 1]) - self._starts[si]
            if b > a:
                parts.append(reader_of(si).rows(int(a), int(b)))
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return out.astype(dtype, copy=False)

    # -- the loader's fast path ----------------------------------------------------------

    def chunk_bounds(self) -> np.ndarray:
        """Global row boundaries: rows [b[i], b[i+1]) are exactly storage chunk i, for every layer."""
        return self._bounds.copy()

    @property
    def n_chunks(self) -> int:
        return len(self._bounds) - 1

    def read_chunk(self, layer: int, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk i of a layer as an ml_dtypes.bfloat16 array: one range read and one decode.

        `out` (a C-contiguous (rows, d_model) array of 2-byte items, e.g. a slice of a reused
        buffer) receives the decoded rows without an allocation or a copy; it is returned as bf16."""
        layer = self._check_layer(layer)
        arr = self._layer_reader(int(self._chunk_seg[i]), layer)
        return bits_to_numpy(arr.chunk(int(self._chunk_local[i]), None if out is None else out.view(np.uint16)))

    def read_chunk_rows(self, i: int) -> dict[str, np.ndarray]:
        """Token-row columns of chunk i (cheap: small arrays, decoded per segment)."""
        a, b = int(self._bounds[i]), int(self._bounds[i + 1])
        return {n: ColumnView(self, n)[a:b] for n in ("tokens", "seq_ids", "positions", "labels", "roles")}

    # -- tables, stats, tokenizer ----------------------------------------------------------

    def sequences(self):
        """The per-sequence table (pyarrow.Table): seq_id int64, token_ids list<int32>, then record fields."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for s in self._segs:
            q = s.record.get("sequences")
            if q:
                data = integrity.read_checked(self._log.loc, q["path"], q)
                tables.append(pq.read_table(pa.BufferReader(data)))
        if not tables:
            return sequences_table([])
        return pa.concat_tables(tables, promote_options="permissive")

    def stats(self, layer: int) -> dict:
        """count, mean, var, std (float64 per dimension) and mean_norm, merged across segments."""
        layer = self._check_layer(layer)
        total = RunningStats(self.d_model)
        for s in self._segs:
            st = s.layers[layer]["stats"]
            data = integrity.read_checked(self._log.loc, st["path"], st)
            total.merge(RunningStats.from_json(json.loads(data)))
        return total.summary()

    @functools.cached_property
    def tokenizer_files(self) -> dict[str, bytes]:
        return {
            name: integrity.read_checked(self._log.loc, tokenizer_key(name), want)
            for name, want in self._log.tokenizer().items()
        }

    def tokenizer(self):
        """A `tokenizers.Tokenizer` built offline from the cache's tokenizer.json."""
        if "tokenizer.json" not in self.tokenizer_files:
            raise CacheError(f"{self.url} stores no tokenizer.json; pass tokenizer_files= to create_cache")
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.tokenizer_files["tokenizer.json"].decode())

    def __repr__(self) -> str:
        return (
            f"Cache({self.url!r}, d_model={self.d_model}, layers={self.layers}, n_tokens={self.n_tokens}, "
            f"segments={len(self._segs)})"
        )


_NOTED: set = set()


def _note_unverified(url: str, segments: list) -> None:
    """Once per process and cache: say in one line that some chunks cannot be verified."""
    n = sum(1 for s in segments if log.unverified_parts(s))
    if n and url not in _NOTED:
        _NOTED.add(url)
        print(
            f"note: {n} of {len(segments)} segments of {url} have no chunk digests (written by cache format 1), "
            f"so their chunks are read unchecked; add them with `python -m cache_format upgrade {url}`",
            file=sys.stderr,
        )


# -- row views ------------------------------------------------------------------------


def row_range(key, n: int) -> tuple[int, int]:
    if isinstance(key, (int, np.integer)):
        i = int(key) + (n if key < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"row {key} out of range for {n} rows")
        return i, i + 1
    if not isinstance(key, slice) or key.step not in (None, 1):
        raise UserError("index the cache with a contiguous slice [i:j] (or one row)")
    a, b, _ = key.indices(n)
    return a, max(a, b)


class ResidualView:
    """`c.residuals(layer)[i:j]` → torch.bfloat16 (j-i, d_model); `.numpy(i, j)` → ml_dtypes bf16."""

    def __init__(self, cache: Cache, layer: int):
        self.cache, self.layer = cache, layer

    def __len__(self) -> int:
        return self.cache.n_tokens

    @property
    def shape(self) -> tuple[int, int]:
        return (self.cache.n_tokens, self.cache.d_model)

    def bits(self, i: int, j: int) -> np.ndarray:
        c = self.cache
        return c._gather(lambda s: c._layer_reader(s, self.layer), i, j, (c.d_model,), np.uint16)

    def numpy(self, i: int = 0, j: int | None = None) -> np.ndarray:
        i, j = row_range(slice(i, j), self.cache.n_tokens)
        return bits_to_numpy(self.bits(i, j))

    def __getitem__(self, key):
        i, j = row_range(key, self.cache.n_tokens)
        out = bits_to_torch(self.bits(i, j))
        return out[0] if isinstance(key, (int, np.integer)) else out


class ColumnView:
    """`c.tokens[i:j]` etc. → numpy, aligned row for row with the residuals."""

    def __init__(self, cache: Cache, name: str):
        self.cache, self.name = cache, name

    def __len__(self) -> int:
        return self.cache.n_tokens

    def __getitem__(self, key):
        i, j = row_range(key, self.cache.n_tokens)
        c = self.cache
        out = c._gather(lambda s: c._column_reader(s, self.name), i, j, (), ROW_COLUMNS[self.name])
        return out[0] if isinstance(key, (int, np.integer)) else out

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)


# -- chunk reads of one array ---------------------------------------------------------


class ArrayReader:
    """Chunk-granular, checked reads of one sharded zarr v3 array (1-D rows or 2-D residuals), without zarr.

    The array's zarr.json gives its codecs, each shard's index (at the end of the object) the
    byte range of every inner chunk; numcodecs decodes it. Every index is checked against its
    CRC32C and every chunk against its committed digest before it is decoded (integrity.py)."""

    def __init__(self, loc: Location, path: str, objects: dict):
        self.loc, self.path, self.objects = loc, path, objects
        meta = json.loads(integrity.read_checked(loc, f"{path}/zarr.json", objects.get("zarr.json")))
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

    def _shard_index(self, s: int, reread: bool = False):
        with self._lock:
            if s in self._index and not reread:
                return self._index[s]
        key = self.shard_key(s)
        obj = self.objects.get(key)
        if obj is None:
            idx = None  # zarr writes no object for an all-fill-value shard
        else:
            n = index_nbytes(self.per_shard)
            for attempt in range(2):
                tail = self.loc.read_range(
                    f"{self.path}/{key}", obj["size"] - n, obj["size"], reread=reread or attempt > 0
                )
                if not integrity.CHECK_READS or integrity.index_ok(tail, self.per_shard):
                    break
            else:
                raise integrity.CorruptObject(self.loc.url, f"{self.path}/{key}", "the shard index fails its CRC32C")
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
            idx = self._shard_index(s, reread=True)  # the index says absent, the commit recorded bytes
            if idx[j, 0] == _EMPTY:
                raise integrity.CorruptObject(
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
            blob = self.loc.read_range(key, off, off + nb, reread=attempt > 0)
            if want is None or not integrity.CHECK_READS or (j < len(want) and want[j] == integrity.chunk_digest(blob)):
                return blob
        raise integrity.CorruptObject(self.loc.url, key, f"inner chunk {j} does not match its digest")

    def rows(self, a: int, b: int) -> np.ndarray:
        if b <= a:
            return np.zeros((0, *self.row_shape), self.dtype)
        k0, k1 = a // self.chunk_rows, (b - 1) // self.chunk_rows
        parts = list(_POOL.map(self.chunk, range(k0, k1 + 1))) if k1 > k0 else [self.chunk(k0)]
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        off = k0 * self.chunk_rows
        return out[a - off : b - off]


def column_array(loc: Location, seg: log.SegmentState, name: str) -> ArrayReader:
    """The reader of segment `seg`'s token-row column `name`."""
    rows = seg.record["rows"]
    p = f"{name}/"
    return ArrayReader(
        loc, f"{rows['path']}/{name}", {k[len(p) :]: v for k, v in rows["objects"].items() if k.startswith(p)}
    )
