"""Writer leases: gc never deletes a segment that a live writer is still writing.

A writer holds a lease object `<unit>/.lease` (the segment's or backfill's directory)
from its first object until its commit record lands or it abandons the work. One daemon
thread per process rewrites every held lease each RENEW_S (60 s); a lease whose object
is older than STALE_S (10 min) belongs to a dead writer. gc skips every unit with a fresh
lease, whatever its `--older-than`. Work claims (claims.py) are renewed the same way.

Both are environment knobs (ACTCACHE_LEASE_RENEW_S, ACTCACHE_LEASE_STALE_S), read at import;
keep STALE_S several times RENEW_S, since a holder that misses renewals for STALE_S is
taken for dead.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from .provenance import now_iso

LEASE = ".lease"
RENEW_S = float(os.environ.get("ACTCACHE_LEASE_RENEW_S", "60"))  # read at every renewal: tests shorten it
STALE_S = float(os.environ.get("ACTCACHE_LEASE_STALE_S", "600"))


def body() -> bytes:
    """What a lease (or claim) object holds: who renews it, and when it last did."""
    return json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "renewed_at": now_iso(), "stale_after_s": STALE_S}
    ).encode()


class _Keeper:
    def __init__(self):
        self.held: dict[tuple[int, str], tuple] = {}  # (id(loc), key) → (loc, key)
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def hold_key(self, loc, key: str, write: bool = True) -> None:
        """Keep renewing the object `key` (written now unless `write` is False: its creator just did)."""
        if write:
            loc.write(key, body())
        with self.lock:
            self.held[(id(loc), key)] = (loc, key)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="actcache-leases", daemon=True)
                self.thread.start()

    def release_key(self, loc, key: str, delete: bool = True) -> None:
        """Stop renewing `key`, and delete it (unless its new holder renews it from here)."""
        with self.lock:  # a renewal in flight finishes first, so none rewrites the key after this
            item = self.held.pop((id(loc), key), None)
        if item is not None and delete:
            try:
                loc.delete([key])
            except Exception:  # a lease left behind goes stale in STALE_S; nothing depends on it
                pass

    def hold(self, loc, unit: str) -> None:
        self.hold_key(loc, f"{unit}/{LEASE}")

    def release(self, loc, unit: str) -> None:
        self.release_key(loc, f"{unit}/{LEASE}")

    def release_keep(self, loc, unit: str) -> None:
        """Stop renewing here but leave the lease object (its new holder renews it)."""
        self.release_key(loc, f"{unit}/{LEASE}", delete=False)

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            time.sleep(min(1.0, RENEW_S))
            if time.monotonic() - last < RENEW_S:
                continue
            last = time.monotonic()
            with self.lock:
                keys = list(self.held)
            for k in keys:
                with self.lock:  # renewed under the lock: a release never sees its key written after it
                    item = self.held.get(k)
                    if item is None:
                        continue
                    try:
                        item[0].write(item[1], body())
                    except Exception:  # the next renewal tries again; the writer's own errors surface there
                        pass


KEEPER = _Keeper()


def hold(loc, unit: str) -> None:
    """Take (or renew) the lease on `unit` and keep renewing it until `release`."""
    KEEPER.hold(loc, unit)


def release(loc, unit: str) -> None:
    KEEPER.release(loc, unit)


def hold_key(loc, key: str, write: bool = True) -> None:
    """Keep renewing the object `key` (a work claim, claims.py) until `release_key`."""
    KEEPER.hold_key(loc, key, write)


def release_key(loc, key: str) -> None:
    KEEPER.release_key(loc, key)


def fresh(mtime: float, now: float | None = None) -> bool:
    return (now or time.time()) - mtime < STALE_S


def dead_here(data: bytes) -> bool:
    """Whether a lease (or claim) object's holder is provably dead: a process of this host
    that no longer exists. A re-run after a kill -9 on the same machine then need not wait
    STALE_S for its own dead claims. (A reused pid reads as alive: the safe side.)"""
    try:
        who = json.loads(data)
        host, pid = who["host"], int(who["pid"])
    except (ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (another user's): alive
        return False
    return False
