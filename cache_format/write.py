"""The segment write-and-commit protocol: create a cache, append a segment, add a layer to
rows already committed, commit or abandon.

**A unit** is one leased directory (`segments/<id>`, or `segments/<id>/backfill-<part>` for a
layer added later) that one writer fills and one commit record publishes (`CommitUnit`):

1. The writer takes a lease on the unit (concurrency.py) so that gc leaves it alone, and
   checks what it is handed before writing anything (`check_rows`, `residual_bits`: one
   `UserError` line naming what to pass instead).
2. It buffers rows per layer and writes only whole shards (shards.py), hashing every object
   as zarr hands it to the store; appends keep the running statistics per layer.
3. On a clean exit of its `with` block it writes the token rows, the sequences table and the
   statistics, then builds one record listing every object with its size and BLAKE2b-256.
4. In its turn (`turn`: commit order, concurrency.py) it appends the record to the log
   (log.py: created exclusively at the next number, chained). With `once` (and always for a
   backfill) the commit first checks that no record before it already holds the work
   (`log.sequences_taken` / `log.layer_taken`); if one does, the unit is abandoned quietly and
   `refused` says which. `defer` leaves the record for a coordinator (`commit_prepared`).
5. The record is the point of visibility: before it nothing is, so a writer that raises or
   is killed leaves only unreferenced objects. Abandoning drops the lease and deletes them
   (best effort); gc removes whatever is left after the grace period.

**Creating** a cache is crash-safe (`make_root`, which `sync` uses for a new destination too):

1. `zarr.json`, created exclusively: the point of no return. Nothing is written before it,
   so a kill before it leaves nothing (an empty directory, or one holding only a store's
   temporary files, counts as nothing).
2. The tokenizer files that zarr.json names, each checked against its digest there.
3. The root commit record `commits/0000000000.json`, created exclusively. It is a pure
   function of zarr.json, so whoever writes it writes the same bytes.

A root with zarr.json but no commit record is *unfinished*. Readers refuse it in one line that
says to re-run the command that created it; that command (harvest, import, sync,
`create_cache`) finishes it here: it writes the tokenizer files still missing, from bytes that
must match zarr.json's digests, then the root record. Finishing is idempotent, so two
processes creating one cache at the same moment agree on it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from . import concurrency, layout, log, provenance
from .codecs import check as check_codec
from .errors import CacheError, UserError
from .layout import ROW_COLUMNS, sequences_bytes, to_bits
from .read import Cache, SegmentInfo
from .shards import LayerBuffer, hashing_store, write_rows
from .stores import Location

__all__ = ["CacheWriter", "SegmentWriter", "LayerBackfill", "create_cache", "CacheExistsError"]
DEFAULT_CODEC = "blosc-zstd1"  # what create_cache, import and harvest's schema default to (codecs.py says why)
DEFAULT_CHUNK_TOKENS = 4096  # rows per storage chunk: the loader's read unit
DEFAULT_SHARD_MIB = 256  # the target size of one shard object
_LAYER_POOL = ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="actcache-layer")


# -- creating a cache root, crash-safely -------------------------------------------------

CREATED, FINISHED, EXISTED = "created", "finished", "existed"


class CacheExistsError(UserError):
    """The location already holds a (finished) cache."""


def root_document(attrs: dict) -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": {provenance.FORMAT_NAME: attrs}}


def same_settings(a: dict, b: dict) -> bool:
    """Whether two roots were asked for with the same settings (provenance records when and where)."""
    return {k: v for k, v in a.items() if k != "provenance"} == {k: v for k, v in b.items() if k != "provenance"}


def make_root(loc: Location, attrs: dict, tokenizer_bytes: Callable[[str], bytes | None]) -> tuple[dict, str]:
    """Create a cache root with `attrs` at `loc`, or finish an unfinished one (whoever began it).

    `tokenizer_bytes(name)` gives a tokenizer file's bytes (None if unknown). Returns the root
    attributes now at `loc` and CREATED, FINISHED (it was unfinished) or EXISTED (a finished
    cache was there: nothing was written)."""
    status = None
    if not loc.exists(log.ROOT_META):
        # non-empty only counts once zarr.json is still absent: nothing else is written before it,
        # so a directory another creator has just begun filling holds zarr.json already
        if loc.is_nonempty_dir() and not loc.exists(log.ROOT_META):
            raise UserError(
                f"{loc.url} is a non-empty directory that is not a cache; choose a new or empty location "
                "(nothing there was changed)"
            )
        if loc.create_exclusive(log.ROOT_META, log.dumps(root_document(attrs))):
            status, root = CREATED, attrs
    if status is None:  # there already, or another process created it a moment ago
        root = log.read_root(loc)  # a foreign zarr.json: "not a cache"
        names, _ = log.list_commits(loc)
        if names or root.get("format_version", 1) < 2:
            return root, EXISTED
        status = FINISHED
    _write_tokenizer(loc, root, tokenizer_bytes, check_existing=status == FINISHED)
    loc.create_exclusive(f"{log.COMMITS}/{log.ROOT_RECORD}", log.dumps(log.root_record(root)))
    return root, status


def _write_tokenizer(loc: Location, root: dict, tokenizer_bytes, check_existing: bool) -> None:
    for name, want in root.get("tokenizer", {}).items():
        key = layout.tokenizer_key(name)
        if check_existing:
            try:
                if log.matches(want, loc.read(key)):
                    continue
            except FileNotFoundError:
                pass
        data = tokenizer_bytes(name)
        if data is None or not log.matches(want, data):
            raise UserError(
                f"{loc.url}: its creation stopped before tokenizer file {name} was written, and this command "
                "has another tokenizer; re-run the command that created it, or delete the unfinished cache"
            )
        loc.write(key, data)


# -- what a writer accepts ---------------------------------------------------------------


def check_json(obj, what: str) -> None:
    try:
        log.dumps(obj)
    except (TypeError, ValueError) as e:
        raise UserError(
            f"{what} must be JSON-serializable ({e}); pass plain dicts, lists, str, int, float, bool"
        ) from None


def int_column(x, dtype: str, what: str) -> np.ndarray:
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


def check_rows(n_expected, tokens, seq_ids, positions, labels, roles) -> dict[str, np.ndarray]:
    cols = {"tokens": tokens, "seq_ids": seq_ids, "positions": positions, "labels": labels, "roles": roles}
    out = {}
    for name, x in cols.items():
        if x is None:
            if name in ("labels", "roles"):
                out[name] = np.full(n_expected, -1 if name == "labels" else 0, np.int8)
                continue
            raise UserError(f"append: {name} is required (one value per residual row)")
        out[name] = int_column(x, ROW_COLUMNS[name], name)
        if len(out[name]) != n_expected:
            raise UserError(
                f"append: {name} has {len(out[name])} rows but the residuals have {n_expected}; pass one value per row"
            )
    if out["roles"].size and (out["roles"].min() < 0 or out["roles"].max() > 3):
        raise UserError("append: roles must be 0 text, 1 prompt, 2 thinking or 3 answer")
    if out["labels"].size and (out["labels"].min() < -1 or out["labels"].max() > 1):
        raise UserError("append: labels must be 1 correct, 0 wrong or -1 none")
    return out


def residual_bits(residuals, layers: list[int], d: int, what: str = "append") -> tuple[dict, int]:
    if not isinstance(residuals, dict):
        raise UserError(f"{what}: residuals must be a dict {{layer: N×d_model bf16}}")
    got = {int(k) for k in residuals}
    if got != set(layers):
        missing, extra = sorted(set(layers) - got), sorted(got - set(layers))
        raise UserError(
            f"{what}: residuals must cover exactly layers {layers}"
            + (f"; missing {missing}" if missing else "")
            + (f"; not in the cache {extra}" if extra else "")
            + (" (add a layer with add_layer first)" if extra else "")
        )
    out, n = {}, None
    for k, x in residuals.items():
        bits = to_bits(x, f"residuals[{k}]")
        if bits.ndim != 2 or bits.shape[1] != d:
            raise UserError(
                f"{what}: residuals[{k}] has shape {tuple(bits.shape)} but the cache's d_model is {d}; "
                "d_model mismatch: append to a cache made for this model"
            )
        if n is not None and len(bits) != n:
            raise UserError(f"{what}: layers have different row counts ({n} vs {len(bits)})")
        n = len(bits)
        out[int(k)] = bits
    return out, n or 0


def refuse_repeated_rows(cols: dict) -> None:
    """A (seq_id, position) pair locates one row: a segment holding one twice is refused."""
    pairs = np.stack([cols["seq_ids"].astype(np.int64), cols["positions"].astype(np.int64)], axis=1)
    if not len(pairs):
        return
    uniq, counts = np.unique(pairs, axis=0, return_counts=True)
    if len(uniq) != len(pairs):
        sid, pos = uniq[np.argmax(counts > 1)]
        raise UserError(
            f"append: row (seq_id {int(sid)}, position {int(pos)}) was appended twice "
            "to one segment; each (seq_id, position) must be one row (nothing was committed)"
        )


# -- the commit protocol a segment and a backfilled layer share ----------------------------


def discard(loc: Location, unit: str) -> None:
    """Best effort: delete what a writer wrote under `unit` (gc catches anything left)."""
    try:
        loc.delete([o.key for o in loc.walk(unit)])
        loc.remove_empty_dirs(unit)
    except Exception:
        pass


class CommitUnit:
    """Base of SegmentWriter and the backfill's segment writer: lease, layer entries, commit, abandon."""

    committed: str | None = None
    refused: str | None = None  # why the commit's check refused it (the work was already committed)
    turn = None  # a concurrency.Turn: commit only after the units before it in the plan
    claim = None  # a concurrency.Claim this unit's work was done under: released when the unit ends

    def __init__(self, writer: CacheWriter, unit: str):
        self.w, self.loc, self.unit = writer, writer._loc, unit
        self.store = hashing_store(self.loc, log.object_digest(writer._root))
        self.committed = self.refused = None

    def _buffers(self) -> list:
        """The unit's LayerBuffers (a background shard write must land before abandon deletes)."""
        raise NotImplementedError

    def _hold(self) -> None:
        concurrency.hold(self.loc, self.unit)

    def _layer_entry(self, buf) -> dict:
        """Finish one layer's array and write its running stats: the layer's manifest entry."""
        buf.finish()
        entry = buf.entry()
        stats_key = layout.stats_key(self.unit, buf.layer)
        data = log.dumps(buf.stats.to_json())
        self.loc.write(stats_key, data)
        entry["stats"] = {"path": stats_key, **log.entry(data, log.object_digest(self.w._root))}
        return entry

    def _commit_record(self, record: dict, refuse=None) -> str | None:
        """Publish the unit with one commit record (in its turn, if it has one), then drop its
        lease. If `refuse` (log.py) finds the work committed already, abandon instead."""
        if self.turn is not None:
            self.turn.wait()
        try:
            self.committed = self.w._append(record, refuse)
        except log.CommitRefused as e:
            self.refused = str(e)
            if self.turn is not None:
                self.turn.done()  # its place in the plan is filled (by the other commit)
                self.turn = None
            self.abandon()
            return None
        if self.turn is not None:
            self.turn.done()
        concurrency.release(self.loc, self.unit)
        self._release_claim()
        return self.committed

    def _release_claim(self) -> None:
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    def abandon(self) -> None:
        """Best effort: delete what this writer wrote (gc catches anything left)."""
        if self.turn is not None:
            self.turn.fail()
        concurrency.release(self.loc, self.unit)
        self._release_claim()
        for buf in self._buffers():
            try:
                buf.wait()  # let a background shard write land before deleting
            except Exception:
                pass
        discard(self.loc, self.unit)

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


# -- a new segment ------------------------------------------------------------------------


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
        self.turn, self.defer = turn, defer  # a concurrency.Turn: commit only after the segments before it
        self.once, self.claim = once, claim
        self.prepared: dict | None = None  # defer: the record, for CacheWriter.commit_prepared
        self.meta = dict(meta or {})
        self.layers = writer.layers
        root = writer._root
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
        loc, root, base = self.loc, self.w._root, self.unit
        cols = self.columns.arrays()
        refuse_repeated_rows(cols)
        layers = {str(L): self._layer_entry(buf) for L, buf in self.buffers.items()}
        rows = write_rows(self.store, layout.rows_dir(base), cols, root["chunk_tokens"])
        seq = None
        if self.records:
            data = sequences_bytes(self.records)
            key = layout.sequences_key(base)
            loc.write(key, data)
            seq = {"path": key, **log.entry(data, log.object_digest(root)), "count": len(self.records)}
        record = {
            "kind": "segment",
            "segment": self.id,
            "n_rows": self.n_rows,
            "seq_ranges": log.ranges_of(cols["seq_ids"]),
            "layers": layers,
            "rows": rows,
            "sequences": seq,
            "meta": self.meta,
            "provenance": provenance.record(),
        }
        if self.defer:  # the caller commits it in its place (objects stay leased until it does)
            self.prepared = record
            concurrency.KEEPER.release_keep(loc, base)
            return None
        return self._commit_record(record, self.w._once_check(record) if self.once else None)


# -- a layer added to rows already committed ---------------------------------------------


class LayerBackfill:
    """Adds one layer to rows already committed, segment by segment, each atomically.

    The caller re-runs the model over each pending segment's rows in the same order and
    hands them back with their tokens, seq_ids and positions, which must match the stored
    rows exactly; anything else is refused, so a layer can never be misaligned.
    """

    def __init__(self, writer: CacheWriter, layer: int):  # the CacheWriter whose add_layer made this
        self.w, self.layer = writer, int(layer)

    def pending(self) -> list[SegmentInfo]:
        """Committed segments that lack this layer, in commit order."""
        c = self.w.snapshot()
        return [s for s in c.segments if self.layer not in s.layers]

    def segment(self, segment_id: str, claim=None) -> _BackfillSegment:
        """One segment's new layer; `claim` (concurrency.Claim) is released when it ends."""
        return _BackfillSegment(self, segment_id, claim)

    def write(self, segment_id: str, residuals, tokens, seq_ids, positions, claim=None) -> str | None:
        """Commit the segment's rows of this layer; None if another writer committed them first."""
        with self.segment(segment_id, claim) as s:
            s.append(residuals, tokens=tokens, seq_ids=seq_ids, positions=positions)
        return s.committed


class _BackfillSegment(CommitUnit):
    """One segment's rows of the new layer, in their own leased backfill directory."""

    def __init__(self, bf: LayerBackfill, segment_id: str, claim=None):
        w = bf.w
        self.bf, self.claim = bf, claim
        self.cache = w.snapshot()
        infos = {s.id: s for s in self.cache.segments}
        if segment_id not in infos:
            raise CacheError(f"segment {segment_id!r} is not a committed segment of {w.url}; see `info`")
        self.info = infos[segment_id]
        if bf.layer in self.info.layers:
            raise UserError(f"segment {segment_id} already has layer {bf.layer}")
        a, b = self.info.row_start, self.info.row_start + self.info.n_rows
        self.stored = {k: getattr(self.cache, k)[a:b] for k in ("tokens", "seq_ids", "positions")}
        self.part = uuid.uuid4().hex[:12]
        super().__init__(w, layout.backfill_dir(segment_id, self.part))
        path = layout.layer_array(self.unit, w._root["hook"], bf.layer)
        self.buf = LayerBuffer(self.store, path, bf.layer, w._root, w._root["hook"])
        self.n = 0

    def _buffers(self) -> list:
        return [self.buf]

    def __enter__(self):
        self._hold()
        return self

    def append(self, residuals, tokens, seq_ids, positions) -> None:
        if not isinstance(residuals, dict):
            residuals = {self.bf.layer: residuals}
        bits, n = residual_bits(residuals, [self.bf.layer], self.w.d_model, "backfill")
        s, e = self.n, self.n + n
        if e > self.info.n_rows:
            raise UserError(
                f"backfill of segment {self.info.id}: {e} rows exceed its {self.info.n_rows}; "
                "the rows must match the segment exactly"
            )
        for name, x in (("tokens", tokens), ("seq_ids", seq_ids), ("positions", positions)):
            got = int_column(x, ROW_COLUMNS[name], name)
            if len(got) != n or not np.array_equal(got, self.stored[name][s:e]):
                raise UserError(
                    f"backfill of segment {self.info.id}: {name} of rows {s}..{e} differ from the "
                    "stored rows; re-run over the same rows in the same order (misaligned layer refused)"
                )
        self.buf.add(bits[self.bf.layer])
        self.n = e

    def commit(self) -> None:
        if self.n != self.info.n_rows:
            raise UserError(
                f"backfill of segment {self.info.id}: got {self.n} rows, the segment has "
                f"{self.info.n_rows}; nothing was committed"
            )
        entry = self._layer_entry(self.buf)
        record = {
            "kind": "layer",
            "segment": self.info.id,
            "layer": self.bf.layer,
            "entry": entry,
            "provenance": provenance.record(),
        }
        self._commit_record(record, log.layer_taken(self.w._root, self.info.id, self.bf.layer))


# -- the writer ---------------------------------------------------------------------------


class CacheWriter:
    """Appends to an existing cache (open one with `open_cache(url, mode="a")` or `create_cache`).
    Many writers (threads, processes, machines) may append at once."""

    def __init__(self, loc: Location, root: dict):
        self._loc, self._root = loc, root
        self.url = loc.url
        self._log: log.LogSnapshot | None = None  # commit records are immutable: each is read and checked once

    def _replay(self) -> log.LogSnapshot:
        self._log = log.load(self._loc, self._log, self._root)
        return self._log

    def _append(self, record: dict, refuse=None) -> str:
        """Append one record to the log (log.commit), checked by `refuse` against every record before it."""
        return log.commit(self._loc, record, refuse, self._log.records if self._log is not None else {})

    def _once_check(self, record: dict):
        """The check that makes a segment commit once: no live segment before it holds any of its sequences."""
        return log.sequences_taken(self._root, record["seq_ranges"])

    @property
    def d_model(self) -> int:
        return self._root["d_model"]

    @property
    def hook(self) -> str:
        return self._root["hook"]

    @property
    def layers(self) -> list[int]:
        """Layers every new segment must carry (declared at create time or by add_layer)."""
        return list(self._replay().declared)

    def snapshot(self) -> Cache:
        """A Cache of what is committed now."""
        return Cache(self._replay())

    def segment(
        self, meta: dict | None = None, turn=None, defer: bool = False, once: bool = False, claim=None
    ) -> SegmentWriter:
        """A new segment. `turn` (concurrency.CommitOrder.turn(k)) makes it commit in plan order;
        `defer` leaves its record in `seg.prepared` for `commit_prepared` (e.g. by a coordinator);
        `once` commits it only if no live segment holds any of its sequences yet (else it is
        abandoned and `seg.refused` says why); `claim` (concurrency.Claim) is released when it ends."""
        return SegmentWriter(self, meta, turn, defer, once, claim)

    def adopt(self, record: dict) -> None:
        """Keep a prepared segment's lease alive here until `commit_prepared`."""
        concurrency.hold(self._loc, layout.segment_dir(record["segment"]))

    def commit_prepared(self, record: dict, once: bool = False) -> str | None:
        """Commit a prepared segment; with `once`, a duplicate is discarded instead (None)."""
        unit = layout.segment_dir(record["segment"])
        try:
            name = self._append(record, self._once_check(record) if once else None)
        except log.CommitRefused:
            concurrency.release(self._loc, unit)
            discard(self._loc, unit)
            return None
        concurrency.release(self._loc, unit)
        return name

    def add_layer(self, layer: int) -> LayerBackfill:
        """Declare `layer` (new segments must then carry it) and return its backfill helper."""
        layer = int(layer)
        if layer < 0:
            raise UserError(f"layer {layer}: layers are non-negative integers")
        if layer not in self.layers:
            record = {"kind": "add_layer", "layer": layer, "provenance": provenance.record()}
            try:
                self._append(record, log.layer_declared(self._root, layer))
            except log.CommitRefused:
                pass  # another process declared it first
        return LayerBackfill(self, layer)

    def retract(self, segment_id: str, reason: str = "") -> str:
        c = self.snapshot()
        if segment_id not in {s.id for s in c.segments}:
            raise CacheError(f"segment {segment_id!r} is not a live segment of {self.url}; list them with `info`")
        return log.commit(
            self._loc, {"kind": "retract", "segment": segment_id, "reason": reason, "provenance": provenance.record()}
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
    codec: str = DEFAULT_CODEC,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    shard_mib: int = DEFAULT_SHARD_MIB,
    tokenizer_files=None,
    storage_options: dict | None = None,
) -> CacheWriter:
    """Create an empty cache at `url`; an error if one is already there (append with open_cache(url, mode="a")).

    Crash-safe (`make_root`): a kill at any point leaves nothing, or an unfinished cache that
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
        "object_digest": log.DIGEST,
        "tokenizer": {k: log.entry(v, log.DIGEST) for k, v in tok.items()},
    }
    try:
        root, status = make_root(loc, attrs, tok.get)
    except UserError:
        raise
    except OSError as e:
        raise UserError(
            f"cannot write to {url} ({type(e).__name__}: {e}); choose a writable location "
            "(for S3: does the bucket exist?)"
        ) from None
    if status == EXISTED or not same_settings(root, attrs):
        raise CacheExistsError(f"{url} already holds a cache; append to it with open_cache(url, mode='a')")
    return CacheWriter(loc, root)  # created, or an interrupted creation of the same cache finished
