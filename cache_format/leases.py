"""Writer leases: gc never deletes a segment that a live writer is still writing.

A writer holds a lease object `<unit>/.lease` (the segment's or backfill's directory)
from its first object until its commit record lands or it abandons the work. One daemon
thread per process rewrites every held lease each RENEW_S (60 s); a lease whose object
is older than STALE_S (10 min) belongs to a dead writer. gc skips every unit with a fresh
lease, whatever its `--older-than`.
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


def _body() -> bytes:
    return json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "renewed_at": now_iso(), "stale_after_s": STALE_S}
    ).encode()


class _Keeper:
    def __init__(self):
        self.held: dict[tuple[int, str], tuple] = {}  # (id(loc), unit) → (loc, key)
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def hold(self, loc, unit: str) -> None:
        key = f"{unit}/{LEASE}"
        loc.write(key, _body())
        with self.lock:
            self.held[(id(loc), unit)] = (loc, key)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="actcache-leases", daemon=True)
                self.thread.start()

    def release(self, loc, unit: str) -> None:
        with self.lock:
            item = self.held.pop((id(loc), unit), None)
        if item is not None:
            try:
                loc.delete([item[1]])
            except Exception:  # a lease left behind goes stale in STALE_S; nothing depends on it
                pass

    def release_keep(self, loc, unit: str) -> None:
        """Stop renewing here but leave the lease object (its new holder renews it)."""
        with self.lock:
            self.held.pop((id(loc), unit), None)

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            time.sleep(min(1.0, RENEW_S))
            if time.monotonic() - last < RENEW_S:
                continue
            last = time.monotonic()
            with self.lock:
                items = list(self.held.values())
            for loc, key in items:
                try:
                    loc.write(key, _body())
                except Exception:  # the next renewal tries again; the writer's own errors surface there
                    pass


KEEPER = _Keeper()


def hold(loc, unit: str) -> None:
    """Take (or renew) the lease on `unit` and keep renewing it until `release`."""
    KEEPER.hold(loc, unit)


def release(loc, unit: str) -> None:
    KEEPER.release(loc, unit)


def fresh(mtime: float, now: float | None = None) -> bool:
    return (now or time.time()) - mtime < STALE_S
