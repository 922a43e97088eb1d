"""Writing: create a cache, append segments (backfill.py adds a layer; commit_unit.py,
array_writer.py, hashing_store.py and validation.py hold the pieces).

A segment writer buffers rows per layer and writes only whole shards (one object each,
never chunk by chunk into a shard), hashing every object as zarr hands it to the store.
On a clean exit it writes the token rows, the sequences table and the per-layer running
statistics, then commits one record that lists every object with its size and BLAKE2b-256 checksum.
Nothing is visible before that record exists, so a killed writer leaves only unreferenced
objects that `gc` removes after the grace period.
"""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from . import commits, conflicts, creation, layout, leases, provenance, seq_ranges
from .array_writer import LayerBuffer, write_rows
from .backfill import LayerBackfill
from .codecs import check as check_codec
from .commit_unit import CommitUnit, discard
from .errors import CacheError, UserError
from .layout import ROW_COLUMNS, TOKENIZER_DIR, sequences_table
from .reader import Cache
from .sequences import sequences_bytes
from .stores import Location
from .validation import check_json, check_rows, refuse_duplicates, residual_bits

__all__ = [
    "CacheWriter",
    "SegmentWriter",
    "LayerBackfill",
    "create_cache",
    "ROW_COLUMNS",
    "sequences_table",
    "TOKENIZER_DIR",
]
_LAYER_POOL = ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="actcache-layer")


def _new_id() -> str:
    """Sortable by creation time (gc reads its age from it too) and unique without coordination."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:12]


class _ColumnSink:
    """Token-row columns of one segment, kept in memory (14 bytes a row) until commit."""

    def __init__(self):
        self.parts: dict[str, list] = {k: [] for k in ROW_COLUMNS}

    def add(self, rows: dict) -> None:
        for k, v in rows.items():
            self.parts[k].append(v)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: (np.concatenate(v) if v else np.zeros(0, ROW_COLUMNS[k])) for k, v in self.parts.items()}


class SegmentWriter(CommitUnit):
    """One writer's rows, committed atomically when the `with` block exits cleanly."""

    def __init__(
        self, writer: CacheWriter, meta: dict | None, turn=None, defer: bool = False, once: bool = False, claim=None
    ):
        check_json(meta or {}, "segment meta")
        self.id = _new_id()
        super().__init__(writer, layout.segment_dir(self.id))
        self.turn, self.defer = turn, defer  # an ordering.Turn: commit only after the segments before it
        self.once, self.claim = once, claim
        self.prepared: dict | None = None  # defer: the record, for CacheWriter.commit_prepared
        self.meta = dict(meta or {})
        self.layers = writer.layers
        root = writer.root
        hook = root["hook"]
        self.buffers = {
            L: LayerBuffer(self.store, layout.layer_array(self.unit, hook, L), L, root, hook) for L in self.layers
        }
        self.columns = _ColumnSink()
        self.records: list[dict] = []
        self.n_rows = 0
        self._open = False

    def _buffers(self) -> list:
        return list(self.buffers.values())

    def __enter__(self) -> SegmentWriter:
        self._open = True
        self._hold()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._open = False
        return super().__exit__(exc_type, exc, tb)

    def append(self, residuals, tokens=None, seq_ids=None, positions=None, labels=None, roles=None) -> None:
        """Add N rows: residuals {layer: N×d bf16} plus the aligned token-row columns."""
        if not self._open:
            raise UserError("append outside its `with cache.segment():` block; rows are committed by the block")
        bits, n = residual_bits(residuals, self.layers, self.w.d_model)
        rows = check_rows(n, tokens, seq_ids, positions, labels, roles)
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
            check_json(r, "a sequence record")
            self.records.append(dict(r))

    def commit(self) -> str | None:
        loc, root, base = self.loc, self.w.root, self.unit
        cols = self.columns.arrays()
        refuse_duplicates(cols)
        layers = {str(L): self._layer_entry(buf) for L, buf in self.buffers.items()}
        rows = write_rows(self.store, layout.rows_dir(base), cols, root["chunk_tokens"])
        seq = None
        if self.records:
            data = sequences_bytes(self.records)
            key = layout.sequences_key(base)
            loc.write(key, data)
            seq = {"path": key, "size": len(data), commits.DIGEST: commits.digest(data), "count": len(self.records)}
        record = {
            "kind": "segment",
            "segment": self.id,
            "n_rows": self.n_rows,
            "seq_ranges": seq_ranges.ranges_of(cols["seq_ids"]),
            "layers": layers,
            "rows": rows,
            "sequences": seq,
            "meta": self.meta,
            "provenance": provenance.record(),
        }
        if self.defer:  # the caller commits it in its place (objects stay leased until it does)
            self.prepared = record
            leases.KEEPER.release_keep(loc, base)
            return None
        return self._commit_record(record, self.w.once_check(record) if self.once else None)


class CacheWriter:
    """Appends to an existing cache. Many writers (threads, processes, machines) may append at once."""

    def __init__(self, loc: Location, root: dict):
        self.loc, self.root = loc, root
        self.url = loc.url
        self._records: dict = {}  # commit records are immutable: read each once
        self._checked: set = set()  # ...and check each one's chain once

    def _replay(self) -> commits.LogState:
        self._records = commits.load_records(self.loc, self._records, self.root, self._checked)
        return commits.replay(self.root, self._records)

    def commit_record(self, record: dict, refuse=None) -> str:
        """Append one record to the log (commits.commit), checked by `refuse` against every record before it."""
        return commits.commit(self.loc, record, refuse, self._records)

    def once_check(self, record: dict):
        """The check that makes a segment commit once: no live segment before it holds any of its sequences."""
        return conflicts.sequences_taken(self.root, record["seq_ranges"])

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
        self._replay()
        return Cache(self.loc, self.root, records=self._records, checked=self._checked)

    def segment(
        self, meta: dict | None = None, turn=None, defer: bool = False, once: bool = False, claim=None
    ) -> SegmentWriter:
        """A new segment. `turn` (ordering.CommitOrder.turn(k)) makes it commit in plan order;
        `defer` leaves its record in `seg.prepared` for `commit_prepared` (e.g. by a coordinator);
        `once` commits it only if no live segment holds any of its sequences yet (else it is
        abandoned and `seg.refused` says why); `claim` (claims.Claim) is released when it ends."""
        return SegmentWriter(self, meta, turn, defer, once, claim)

    def adopt(self, record: dict) -> None:
        """Keep a prepared segment's lease alive here until `commit_prepared`."""
        leases.hold(self.loc, layout.segment_dir(record["segment"]))

    def commit_prepared(self, record: dict, once: bool = False) -> str | None:
        """Commit a prepared segment; with `once`, a duplicate is discarded instead (None)."""
        unit = layout.segment_dir(record["segment"])
        try:
            name = self.commit_record(record, self.once_check(record) if once else None)
        except commits.Refused:
            leases.release(self.loc, unit)
            discard(self.loc, unit)
            return None
        leases.release(self.loc, unit)
        return name

    def add_layer(self, layer: int) -> LayerBackfill:
        """Declare `layer` (new segments must then carry it) and return its backfill helper."""
        layer = int(layer)
        if layer < 0:
            raise UserError(f"layer {layer}: layers are non-negative integers")
        if layer not in self.layers:
            record = {"kind": "add_layer", "layer": layer, "provenance": provenance.record()}
            try:
                self.commit_record(record, conflicts.layer_declared(self.root, layer))
            except commits.Refused:
                pass  # another process declared it first
        return LayerBackfill(self, layer)

    def retract(self, segment_id: str, reason: str = "") -> str:
        c = self.snapshot()
        if segment_id not in {s.id for s in c.segments}:
            raise CacheError(f"segment {segment_id!r} is not a live segment of {self.url}; list them with `info`")
        return commits.commit(
            self.loc, {"kind": "retract", "segment": segment_id, "reason": reason, "provenance": provenance.record()}
        )


def _tokenizer_payload(tokenizer_files) -> dict[str, bytes]:
    if tokenizer_files is None:
        return {}
    if isinstance(tokenizer_files, (str, Path)):
        d = Path(tokenizer_files)
        if not d.is_dir():
            raise UserError(f"tokenizer_files {d}: not a directory; pass a directory or a dict name → bytes")
        out = {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".")}
    elif isinstance(tokenizer_files, dict):
        out = {k: v if isinstance(v, bytes) else Path(v).read_bytes() for k, v in tokenizer_files.items()}
    else:
        out = {Path(p).name: Path(p).read_bytes() for p in tokenizer_files}
    for k in out:  # what every reader accepts (layout.check_root)
        if layout.name_problem(k) or k.startswith("."):
            raise UserError(f"tokenizer file name {k!r}: use a plain file name (letters, digits, '.', '_', '-')")
    return out


def create_cache(
    url,
    d_model: int,
    layers,
    meta: dict | None = None,
    hook: str = "resid_post",
    codec: str = "blosc-zstd1",
    chunk_tokens: int = 4096,
    shard_mib: int = 256,
    tokenizer_files=None,
    storage_options: dict | None = None,
) -> CacheWriter:
    """Create an empty cache at `url`; an error if one is already there (append with open_cache(url, mode="a")).

    Crash-safe (creation.py): a kill at any point leaves nothing, or an unfinished cache that
    the same call finishes."""
    if not isinstance(d_model, (int, np.integer)) or d_model <= 0:
        raise UserError(f"d_model must be a positive integer, got {d_model!r}")
    layers = sorted({int(x) for x in layers})
    if not layers or layers[0] < 0:
        raise UserError(f"layers must be a non-empty list of non-negative integers, got {layers!r}")
    if layout.name_problem(hook):
        raise UserError(f"hook {hook!r}: use a name like resid_post")
    check_codec(codec)
    if chunk_tokens <= 0 or shard_mib <= 0:
        raise UserError("chunk_tokens and shard_mib must be positive")
    meta = dict(meta or {})
    check_json(meta, "meta")
    tok = _tokenizer_payload(tokenizer_files)
    loc = Location(url, storage_options)
    if not loc.supports_writes:
        raise UserError(f"{url}: HTTP is read-only; create the cache locally or on S3 and `publish` it")
    chunk_bytes = chunk_tokens * d_model * 2
    shard_rows = max(1, round(shard_mib * 2**20 / chunk_bytes)) * chunk_tokens  # shard_mib may be fractional
    attrs = {
        "format": provenance.FORMAT_NAME,
        "format_version": provenance.FORMAT_VERSION,
        "d_model": int(d_model),
        "hook": hook,
        "layers": layers,
        "dtype": "bfloat16",
        "codec": codec,
        "chunk_tokens": int(chunk_tokens),
        "shard_rows": int(shard_rows),
        "shard_mib": shard_mib,
        "row_columns": ROW_COLUMNS,
        "meta": meta,
        "provenance": provenance.record(),
        "tokenizer": {k: {"size": len(v), commits.DIGEST: commits.digest(v)} for k, v in tok.items()},
    }
    try:
        root, status = creation.make_root(loc, attrs, tok.get)
    except UserError:
        raise
    except OSError as e:
        raise UserError(
            f"cannot write to {url} ({type(e).__name__}: {e}); choose a writable location "
            "(for S3: does the bucket exist?)"
        ) from None
    if status == creation.EXISTED or not creation.same_settings(root, attrs):
        raise creation.CacheExistsError(f"{url} already holds a cache; append to it with open_cache(url, mode='a')")
    return CacheWriter(loc, root)  # created, or an interrupted creation of the same cache finished
