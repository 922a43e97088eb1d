"""The commit protocol a segment and a backfilled layer share, written once.

A unit is one leased directory (`segments/<id>` or `segments/<id>/backfill-<part>`) that
one writer fills and one commit record publishes. A clean `with` block commits; a block
that raises, or a commit that fails before its record landed, abandons the unit: its
lease is dropped and what it wrote is deleted (best effort; gc catches anything left).
"""

from __future__ import annotations

from . import commits, layout, leases
from .hashing_store import hashing_store
from .stores import Location


class CommitUnit:
    """Base of SegmentWriter and the backfill's segment writer: lease, layer entries, commit, abandon."""

    committed: str | None = None
    turn = None  # an ordering.Turn: commit only after the units before it in the plan

    def __init__(self, loc: Location, unit: str):
        self.loc, self.unit = loc, unit
        self.store = hashing_store(loc)
        self.committed = None

    def _buffers(self) -> list:
        """The unit's LayerBuffers (a background shard write must land before abandon deletes)."""
        raise NotImplementedError

    def _hold(self) -> None:
        leases.hold(self.loc, self.unit)

    def _layer_entry(self, buf) -> dict:
        """Finish one layer's array and write its running stats: the layer's manifest entry."""
        buf.finish()
        entry = buf.entry()
        stats_key = layout.stats_key(self.unit, buf.layer)
        data = commits.dumps(buf.stats.to_json())
        self.loc.write(stats_key, data)
        entry["stats"] = {"path": stats_key, "size": len(data), commits.DIGEST: commits.digest(data)}
        return entry

    def _commit_record(self, record: dict) -> str:
        """Publish the unit with one commit record (in its turn, if it has one), then drop its lease."""
        if self.turn is not None:
            self.turn.wait()
        self.committed = commits.commit(self.loc, record)
        if self.turn is not None:
            self.turn.done()
        leases.release(self.loc, self.unit)
        return self.committed

    def abandon(self) -> None:
        """Best effort: delete what this writer wrote (gc catches anything left)."""
        if self.turn is not None:
            self.turn.fail()
        leases.release(self.loc, self.unit)
        for buf in self._buffers():
            try:
                buf.wait()  # let a background shard write land before deleting
            except Exception:
                pass
        try:
            self.loc.delete([o.key for o in self.loc.walk(self.unit)])
            self.loc.remove_empty_dirs(self.unit)
        except Exception:
            pass  # gc removes whatever is left

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
