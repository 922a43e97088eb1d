"""Reading: a snapshot of the committed segments, with a fast chunk path.

The reader needs no zarr (arrays.py reads chunks straight from the shards with numcodecs):
that is the loader's fast path (`read_chunk`), and it is thread-safe. Everything it serves
is checked first (see integrity.py): the commit log's chain, the shard index's CRC32C,
each chunk's digest, and the BLAKE2b of every small object.

The row views (`c.residuals(layer)[i:j]`, `c.tokens[i:j]`) are in row_views.py.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from dataclasses import dataclass, field

import numpy as np

from . import commits, integrity, seq_ranges
from .arrays import _ArrayReader
from .bf16 import bits_to_numpy
from .errors import CacheError
from .layout import sequences_table, tokenizer_key
from .row_views import ColumnView, ResidualView
from .stats import RunningStats
from .stores import Location


@dataclass
class SegmentInfo:
    id: str
    row_start: int
    n_rows: int
    meta: dict
    layers: list[int]
    commit: str = ""
    provenance: dict = field(default_factory=dict)
    seq_ranges: list | None = None  # runs [a, b) of its rows' seq_ids (seq_ranges.py); None: not recorded


class Cache:
    """A snapshot of a cache's committed segments; `refresh()` picks up later commits."""

    def __init__(
        self, loc: Location, root: dict | None = None, records: dict | None = None, checked: set | None = None
    ):
        self._loc = loc
        self._root = root or commits.read_root(loc)
        self._records: dict = dict(records or {})
        self._checked: set = set(checked or ())
        self._arrays: dict = {}
        self._lock = threading.Lock()
        self.refresh()

    # -- snapshot ----------------------------------------------------------------------

    def refresh(self) -> Cache:
        try:
            self._records = commits.load_records(self._loc, self._records, self._root, self._checked)
        except CacheError:
            if not self._loc.transfers_can_tear:
                raise
            # a torn or corrupted transfer of the log (HTTP's index.json): once more from the store
            self._records = commits.load_records(self._loc, self._records, self._root, self._checked)
        st = commits.replay(self._root, self._records)
        _note_unverified(self._loc.url, st.segments)
        self._state = st
        self._segs = st.segments
        self._by_id = {s.id: i for i, s in enumerate(self._segs)}
        n = np.array([s.record["n_rows"] for s in self._segs], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
        self._layers = [L for L in st.declared if all(L in s.layers for s in self._segs)]
        ct = self._root["chunk_tokens"]
        bounds = [np.arange(self._starts[i], self._starts[i + 1], ct, dtype=np.int64) for i in range(len(self._segs))]
        self._bounds = np.concatenate(bounds + [self._starts[-1:]]).astype(np.int64)
        none = [np.zeros(0, np.int64)]
        self._chunk_seg = np.concatenate([np.full(len(b), i, np.int64) for i, b in enumerate(bounds)] + none)
        self._chunk_local = np.concatenate([np.arange(len(b), dtype=np.int64) for b in bounds] + none)
        self._fingerprint = None
        return self

    @property
    def url(self) -> str:
        return self._loc.url

    @property
    def d_model(self) -> int:
        return self._root["d_model"]

    @property
    def hook(self) -> str:
        return self._root["hook"]

    @property
    def layers(self) -> list[int]:
        """Layers present in every committed segment."""
        return list(self._layers)

    @property
    def declared_layers(self) -> list[int]:
        return list(self._state.declared)

    @property
    def n_tokens(self) -> int:
        return int(self._starts[-1])

    @property
    def chunk_tokens(self) -> int:
        return self._root["chunk_tokens"]

    @property
    def codec(self) -> str:
        return self._root["codec"]

    @property
    def meta(self) -> dict:
        """The creator's meta as given, plus `cache_format`: format/code/package versions, hardware."""
        out = json.loads(json.dumps(self._root["meta"]))
        out["cache_format"] = dict(
            self._root["provenance"],
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
                seq_ranges.of_record(s.record),
            )
            for i, s in enumerate(self._segs)
        ]

    @property
    def retracted(self) -> list[str]:
        return [s.id for s in self._state.retracted]

    @property
    def shard_rows(self) -> int:
        return self._root["shard_rows"]

    @property
    def location(self) -> Location:
        return self._loc

    @property
    def root(self) -> dict:
        """The root attributes as committed (shared, not a copy: do not modify)."""
        return self._root

    @property
    def committed_segments(self) -> list:
        """The live segments as replayed from the log (record, layers, commit ids), in row order."""
        return list(self._segs)

    @property
    def copy_of(self) -> dict | None:
        """A partial copy's source and selection, {url, root, layers, segments} (see `sync`); None otherwise."""
        return self._state.copy_of

    @property
    def tokenizer_manifest(self) -> dict[str, dict]:
        """Tokenizer file name → its {size, blake2b} entry in the root."""
        return self._root.get("tokenizer", {})

    def layer_coverage(self) -> dict[int, int]:
        """Declared layer → how many live segments hold it (partial backfills show as fewer)."""
        return {L: sum(L in s.layers for s in self._segs) for L in self._state.declared}

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = commits.cache_fingerprint(self._root, self._segs, self._layers)
        return self._fingerprint

    def layer_fingerprint(self, layer: int) -> str:
        self.check_layer(layer)
        return commits.layer_fingerprint(self._root, self._segs, int(layer))

    def check_layer(self, layer) -> int:
        """`layer` as an int if every live segment holds it, else a one-line CacheError saying why not."""
        layer = int(layer)
        if layer not in self._layers:
            cov = self.layer_coverage()
            if layer in cov:
                raise CacheError(
                    f"layer {layer} is only in {cov[layer]} of {len(self._segs)} segments of {self.url} "
                    "(backfill pending); finish it with add_layer before reading it"
                )
            have = ", ".join(map(str, self._layers)) or "none"
            raise CacheError(f"layer {layer} is not in the cache {self.url} (layers: {have}); harvest it first")
        return layer

    # -- rows --------------------------------------------------------------------------

    def residuals(self, layer: int) -> ResidualView:
        return ResidualView(self, self.check_layer(layer))

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

    def layer_reader(self, si: int, layer: int) -> _ArrayReader:
        """The chunk reader of segment `si`'s array of `layer` (made once, shared by threads)."""
        s = self._segs[si]
        key = (s.id, layer)
        with self._lock:
            r = self._arrays.get(key)
        if r is None:
            e = s.layers[layer]
            r = _ArrayReader(self._loc, e["array"], e["objects"])
            with self._lock:
                self._arrays[key] = r
        return r

    def column_reader(self, si: int, name: str) -> _ArrayReader:
        """The chunk reader of segment `si`'s token-row column `name` (made once, shared by threads)."""
        s = self._segs[si]
        key = (s.id, name)
        with self._lock:
            r = self._arrays.get(key)
        if r is None:
            rows = s.record["rows"]
            p = f"{name}/"
            r = _ArrayReader(
                self._loc,
                f"{rows['path']}/{name}",
                {k[len(p) :]: v for k, v in rows["objects"].items() if k.startswith(p)},
            )
            with self._lock:
                self._arrays[key] = r
        return r

    def segment_column(self, segment_id: str, name: str) -> np.ndarray:
        """All of one segment's token-row column `name` (a backfill checks its tokens against it)."""
        r = self.column_reader(self._by_id[segment_id], name)
        return r.rows(0, r.shape[0])

    def gather(self, reader_of, i: int, j: int, row_shape: tuple, dtype) -> np.ndarray:
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
        layer = self.check_layer(layer)
        arr = self.layer_reader(int(self._chunk_seg[i]), layer)
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
                data = integrity.read_checked(self._loc, q["path"], q, commits.digest)
                tables.append(pq.read_table(pa.BufferReader(data)))
        if not tables:
            return sequences_table([])
        return pa.concat_tables(tables, promote_options="permissive")

    def stats(self, layer: int) -> dict:
        """count, mean, var, std (float64 per dimension) and mean_norm, merged across segments."""
        layer = self.check_layer(layer)
        total = RunningStats(self.d_model)
        for s in self._segs:
            st = s.layers[layer]["stats"]
            data = integrity.read_checked(self._loc, st["path"], st, commits.digest)
            total.merge(RunningStats.from_json(json.loads(data)))
        return total.summary()

    @functools.cached_property
    def tokenizer_files(self) -> dict[str, bytes]:
        return {
            name: integrity.read_checked(self._loc, tokenizer_key(name), want, commits.digest)
            for name, want in self.tokenizer_manifest.items()
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
    n = sum(1 for s in segments if commits.unverified_parts(s))
    if n and url not in _NOTED:
        _NOTED.add(url)
        print(
            f"note: {n} of {len(segments)} segments of {url} have no chunk digests (written by cache format 1), "
            f"so their chunks are read unchecked; add them with `python -m cache_format upgrade {url}`",
            file=sys.stderr,
        )
