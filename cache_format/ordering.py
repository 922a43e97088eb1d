"""Commits in plan order while segments are written concurrently.

Writer threads (or processes) write a segment's objects whenever they are ready, but its
commit record waits for its turn: turn k commits only after turns 0..k-1 have. So an
uninterrupted run commits in the same order every time, and a killed one has committed a
prefix of the plan, which a resumed run continues in the same order. A turn whose segment
fails breaks the order: later turns refuse to commit (their work is redone on resume), so
the committed segments stay a prefix of the plan.
"""

from __future__ import annotations

import threading

from .errors import UserError


class OrderBroken(UserError):
    """An earlier segment in the plan failed, so this one must not commit ahead of it."""


class CommitOrder:
    """Turns 0, 1, 2, ... committed strictly in order (thread-safe)."""

    def __init__(self, start: int = 0):
        self._next = start
        self._failed: int | None = None
        self._cv = threading.Condition()

    def turn(self, k: int) -> Turn:
        return Turn(self, k)

    def _wait(self, k: int) -> None:
        with self._cv:
            while self._next != k:
                if self._failed is not None and self._failed < k:
                    raise OrderBroken(
                        f"segment {k} of the plan was not committed because segment {self._failed} "
                        "failed first; re-run to resume from there"
                    )
                self._cv.wait(1.0)

    def _done(self, k: int) -> None:
        with self._cv:
            if self._next == k:
                self._next = k + 1
            self._cv.notify_all()

    def _fail(self, k: int) -> None:
        with self._cv:
            self._failed = k if self._failed is None else min(self._failed, k)
            self._cv.notify_all()

    def abort(self) -> None:
        """Stop every waiting turn (the run is ending with an error)."""
        self._fail(-1)


class Turn:
    """One segment's place in a CommitOrder: `wait()` before its commit, then `done()` or `fail()`."""

    def __init__(self, order: CommitOrder, k: int):
        self.order, self.k = order, k

    def wait(self) -> None:
        self.order._wait(self.k)

    def done(self) -> None:
        self.order._done(self.k)

    def fail(self) -> None:
        self.order._fail(self.k)
