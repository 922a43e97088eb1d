"""Adding a layer to rows already committed: one `layer` commit per segment, checked row by row,
and committed only if the segment lacks the layer still (so two processes never add it twice)."""

from __future__ import annotations

import uuid

import numpy as np

from . import conflicts, layout, provenance
from .array_writer import LayerBuffer
from .commit_unit import CommitUnit
from .errors import CacheError, UserError
from .layout import ROW_COLUMNS
from .validation import int_column, residual_bits


class LayerBackfill:
    """Adds one layer to rows already committed, segment by segment, each atomically.

    The caller re-runs the model over each pending segment's rows in the same order and
    hands them back with their tokens, seq_ids and positions, which must match the stored
    rows exactly; anything else is refused, so a layer can never be misaligned.
    """

    def __init__(self, writer, layer: int):  # writer: the CacheWriter whose add_layer made this
        self.w, self.layer = writer, int(layer)

    def pending(self) -> list:
        """Committed segments that lack this layer, in commit order."""
        c = self.w.snapshot()
        return [s for s in c.segments if self.layer not in s.layers]

    def segment(self, segment_id: str, claim=None) -> _BackfillSegment:
        """One segment's new layer; `claim` (claims.Claim) is released when it ends."""
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
        self.stored = {k: self.cache.segment_column(segment_id, k) for k in ("tokens", "seq_ids", "positions")}
        self.part = uuid.uuid4().hex[:12]
        super().__init__(w, layout.backfill_dir(segment_id, self.part))
        path = layout.layer_array(self.unit, w.root["hook"], bf.layer)
        self.buf = LayerBuffer(self.store, path, bf.layer, w.root, w.root["hook"])
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
        self._commit_record(record, conflicts.layer_taken(self.w.root, self.info.id, self.bf.layer))
