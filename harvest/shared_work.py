"""Units shared with every other `harvest run` on the same cache: claim a unit before computing
it, skip a unit a live process holds, and come back to it at the end.

Any number of processes, on one machine or many, pointed at one cache with the same plan,
split the work this way with no coordinator (cache_format.claims): each claims the next free
unit, so a second teammate running the same `make harvest` helps the first. A claim is
re-checked once taken (the unit may have been committed since the plan was made), and the
segment commits only if no live segment holds its sequences yet (`once`), so even a claim
lost to a pause cannot commit a row twice. At the end a process waits for the units others
hold: they get committed (done), or their claimant dies and the unit is planned again here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from cache_format import seq_ranges
from cache_format.claims import Claim, Claims, wait_for

from .units import Unit


class SharedUnits:
    """One process's side of the sharing: the claims it holds and the units others held."""

    def __init__(self, writer, scope: str = "harvest"):
        self.w = writer
        self.claims = Claims(writer.loc, scope)
        self.skipped: dict[str, list[int]] = {}  # unit key → its seq_ids, held by a live process
        self.held: list[Claim] = []
        self.run_here = 0  # units this process claimed and computed
        self.found_done = 0  # units committed by others between planning and claiming

    def _live_runs(self) -> list:
        return [(s.seq_ranges or [], s.id) for s in self.w.snapshot().segments]

    def committed(self, seq_ids, live=None) -> bool:
        """Whether a live segment holds any of `seq_ids` now (from the log: cheap)."""
        return bool(seq_ranges.holders(seq_ranges.ranges_of(seq_ids), live if live is not None else self._live_runs()))

    def claim(self, units: Iterable[Unit], on_skip=lambda unit: None) -> Iterator[tuple[Unit, Claim]]:
        """The units this process gets to compute, each with its claim (released when its segment ends)."""
        for u in units:
            c = self.claims.take(u.key)
            if c is None:
                self.skipped[u.key] = list(u.seq_ids)
                on_skip(u)
                continue
            self.held.append(c)
            if self.committed(u.seq_ids):
                c.release()
                self.found_done += 1
                on_skip(u)
                continue
            self.run_here += 1
            yield u, c

    def wait_for_others(self) -> bool:
        """Wait until the units others held are committed, or their claimants died; True if
        some must be planned again (here)."""
        if not self.skipped:
            return False

        def done(items):
            live = self._live_runs()
            return [k for k, seq_ids in items.items() if self.committed(seq_ids, live)]

        orphans = wait_for(self.skipped, done, self.claims)
        self.skipped.clear()
        return bool(orphans)

    def release_all(self) -> None:
        """Release every claim still held (a failed or interrupted run: others need not wait for it)."""
        for c in self.held:
            c.release()
        self.held.clear()
