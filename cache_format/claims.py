"""Work claims: any number of processes sharing a cache compute each unit of work once, with
no coordinator.

A process claims a unit (a harvest unit, a segment's backfilled layer, a unit's rollouts)
before computing it. A claim on NAME is an object `claims/<scope>/<NAME>.<n>.json`, created
exclusively at the next number (as commit records are) and renewed like a writer lease
(leases.py) while its holder lives. The highest number is the current claim:

- fresh (renewed within STALE_S): another process is computing the unit; skip it and come
  back to it at the end;
- stale: its holder died; the unit is taken over by creating number n+1 exclusively, so of
  two processes that both see it stale, exactly one takes it over. A claim of a process of
  this host that has exited counts as stale at once (a re-run after kill -9 does not wait).

A claim is a promise to try, not a lock: a holder paused past STALE_S loses its claim
without knowing it. So the commit itself re-checks (commits.commit's `refuse`, conflicts.py)
and a duplicate is abandoned there; claims only keep processes from wasting work.
"""

from __future__ import annotations

import re
import threading
import time

from . import leases
from .stores import Location

CLAIMS = "claims"
_CLAIM = re.compile(r"^(.+)\.(\d{6})\.json$")
POLL_S = 2.0  # how often a process waiting for others' units looks again


def safe_name(name: str) -> str:
    """A unit's name as one path segment (unit keys hold ':' and the like)."""
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", name)


class Claim:
    """A held claim: renewed until `release()`."""

    def __init__(self, loc: Location, key: str, older: list[str]):
        self.loc, self.key, self.older = loc, key, older
        self.released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        """Stop renewing, delete this claim (and the dead claims it took over). Once: a second
        call must not delete a claim that another process has since created under the same name."""
        with self._lock:
            if self.released:
                return
            self.released = True
        leases.release_key(self.loc, self.key)
        if self.older:
            try:
                self.loc.delete(self.older)
            except Exception:  # leftovers are stale claims: harmless, taken over if ever needed
                pass


class Claims:
    """The claims of one kind of work (`scope`) on the cache at `loc`."""

    def __init__(self, loc: Location, scope: str):
        self.loc, self.prefix = loc, f"{CLAIMS}/{safe_name(scope)}"

    def _current(self, name: str):
        """(number, ObjectInfo) of each claim object on `name`, in number order (released
        claims are deleted, so the scope holds only live and dead ones: a short listing)."""
        want = safe_name(name)
        found = []
        for o in self.loc.walk(self.prefix):
            m = _CLAIM.match(o.key.rsplit("/", 1)[-1])
            if m and m.group(1) == want:
                found.append((int(m.group(2)), o))
        return sorted(found, key=lambda t: t[0])

    def _live(self, o) -> bool:
        """Whether the claim object `o` is held by a live process: renewed within STALE_S, and
        not by a process of this host that has exited."""
        if not leases.fresh(o.mtime):
            return False
        try:
            return not leases.dead_here(self.loc.read(o.key))
        except FileNotFoundError:  # released meanwhile
            return False

    def take(self, name: str) -> Claim | None:
        """Claim `name` (free, or its claimant dead); None if a live process holds it."""
        found = self._current(name)
        if found and self._live(found[-1][1]):
            return None
        n = found[-1][0] + 1 if found else 1
        key = f"{self.prefix}/{safe_name(name)}.{n:06d}.json"
        if not self.loc.create_exclusive(key, leases.body()):
            return None  # another process took it (or took it over) first
        leases.hold_key(self.loc, key, write=False)
        return Claim(self.loc, key, [o.key for _, o in found])

    def held_elsewhere(self, name: str) -> bool:
        """Whether a live process holds `name` (so waiting for it is worth it)."""
        found = self._current(name)
        return bool(found) and self._live(found[-1][1])


def wait_for(pending: dict, is_done, claims: Claims, poll_s: float | None = None) -> list:
    """Wait until every pending unit (name → what it covers) is done or its claimant died.

    `is_done(items)` returns the names among `items` now committed. Returns the names still to
    do (their claimants died): the caller takes them over. Returns [] when others finished them all.
    """
    left = dict(pending)
    while left:
        for n in is_done(dict(left)):
            left.pop(n, None)
        orphans = [n for n in left if not claims.held_elsewhere(n)]
        if orphans:
            return orphans
        if left:
            time.sleep(POLL_S if poll_s is None else poll_s)
    return []
