"""Adding a layer to rows already committed: one `layer` commit per segment, checked row by row."""

from __future__ import annotations

import uuid

import numpy as np

from . import commits, layout, leases, provenance
from .errors import CacheError, UserError
from .layout import ROW_COLUMNS
from .parts import _as_numpy, _CommitOnExit, _hashing_store, _LayerBuffer, _residual_bits


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
        path = layout.layer_array(layout.backfill_dir(segment_id, self.part), w.root["hook"], bf.layer)
        self.buf = _LayerBuffer(self.store, path, bf.layer, w.root, w.root["hook"])
        self.n = 0
        self.committed = None

    def __enter__(self):
        leases.hold(self.w.loc, self._unit)
        return self

    @property
    def _unit(self) -> str:
        return layout.backfill_dir(self.info.id, self.part)

    def abandon(self) -> None:
        leases.release(self.w.loc, self._unit)
        try:
            self.buf._wait()
        except Exception:
            pass
        try:
            base = self._unit
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
        stats_key = layout.stats_key(self._unit, self.bf.layer)
        data = commits.dumps(self.buf.stats.to_json())
        loc.write(stats_key, data)
        entry["stats"] = {"path": stats_key, "size": len(data), commits.DIGEST: commits.digest(data)}
        record = {"kind": "layer", "segment": self.info.id, "layer": self.bf.layer, "entry": entry,
                  "provenance": provenance.record()}
        self.committed = commits.commit(loc, record)
        leases.release(loc, self._unit)
