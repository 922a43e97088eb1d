"""One OUT, one run: `train run` holds a lease on OUT for as long as it lives.

The lease is an exclusive advisory lock (`flock`) on `OUT/.lease`, a file that also names its
holder (host, process, start time). The kernel drops the lock when the holding process ends,
however it ends (`kill -9` included), so a dead run's lease is stale at once and the next run
simply takes it over; no clock or timeout is involved. A second run on an OUT whose holder is
alive is refused in one line that names the holder. On NFS, Linux maps `flock` onto the
server's byte-range locks, so the lease holds across machines sharing OUT too.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from cache_format.errors import UserError
from cache_format.provenance import now_iso

LEASE = ".lease"


class OutLease:
    """A held lease on OUT; `release()` (or leaving the `with` block, or dying) gives it up."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / LEASE
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            # never through a link: a planted .lease must not truncate a file elsewhere
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise UserError(f"cannot take the lease {self.path} ({e.strerror or e}); choose another --out") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise UserError(
                f"{self.out} is in use by another `train run` ({holder(self.out)}); wait for it to finish, "
                "or choose another --out"
            ) from None
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": now_iso()}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, body, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Unlock (the file stays: removing a lock file another process has open would split the lease)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(out: str | Path) -> str:
    """Who holds OUT's lease, as the holder wrote it ("process 123 on host h since …")."""
    for _ in range(20):  # the holder writes its name just after it locks: give it a moment
        try:
            who = json.loads((Path(out) / LEASE).read_text())
            return f"process {who['pid']} on host {who['host']} since {who['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "a process that has not written its name"
