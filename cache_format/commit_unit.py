"""The commit protocol a segment and a backfilled layer share, written once.

A unit is one leased directory (`segments/<id>` or `segments/<id>/backfill-<part>`) that
one writer fills and one commit record publishes. A clean `with` block commits; a block
that raises, or a commit that fails before its record landed, abandons the unit: its
lease is dropped and what it wrote is deleted (best effort; gc catches anything left).

A commit may carry a check (conflicts.py) that the work is not committed already; a unit
whose check fails is abandoned quietly (`refused` says why), since another process did the
same work first. A work claim (claims.py) the unit was computed under is released with it.
"""

from __future__ import annotations

from . import commits, layout, leases
from .hashing_store import hashing_store
from .stores import Location


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
    turn = None  # an ordering.Turn: commit only after the units before it in the plan
    claim = None  # a claims.Claim this unit's work was done under: released when the unit ends

    def __init__(self, writer, unit: str):
        self.w, self.loc, self.unit = writer, writer.loc, unit
        self.store = hashing_store(self.loc)
        self.committed = self.refused = None

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

    def _commit_record(self, record: dict, refuse=None) -> str | None:
        """Publish the unit with one commit record (in its turn, if it has one), then drop its
        lease. If `refuse` (conflicts.py) finds the work committed already, abandon instead."""
        if self.turn is not None:
            self.turn.wait()
        try:
            self.committed = self.w.commit_record(record, refuse)
        except commits.Refused as e:
            self.refused = str(e)
            if self.turn is not None:
                self.turn.done()  # its place in the plan is filled (by the other commit)
                self.turn = None
            self.abandon()
            return None
        if self.turn is not None:
            self.turn.done()
        leases.release(self.loc, self.unit)
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
        leases.release(self.loc, self.unit)
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
