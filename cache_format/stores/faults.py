"""A test-only fault hook: stop this process at a chosen store write, without timing.

Crash-safety claims ("a kill at any point leaves nothing, or something the same command
finishes") are only as good as the points they were tested at. Every writing backend calls
`point(key, "before")` and `point(key, "after")` around each `write`, `create_exclusive` and
`delete` (one call per key), so a test can stop a command exactly before or after its Nth
write, or its first write of a given key, and then check what a re-run makes of it.

Armed two ways (nothing is armed otherwise, and an unarmed point costs one attribute test):

- in-process: `with armed(Fault(n=3, when="after")): ...` raises `Killed` (a BaseException,
  so no `except Exception` cleanup pretends the process survived) at that point;
- in a subprocess: `ACTCACHE_FAULT="kill:after:3"` or `"kill:after:commits/0000000001.json"`
  sends the process SIGKILL there (a real kill -9: no cleanup, no finally blocks).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import signal
import threading
from dataclasses import dataclass, field


class Killed(BaseException):
    """An in-process stand-in for kill -9 at a store write."""


@dataclass
class Fault:
    """Stop at the `n`th write (counting from 1) whose key matches `key` (a glob), `when` before or after it."""

    n: int = 1
    when: str = "before"
    key: str = "*"
    action: str = "raise"  # raise Killed, or "kill": SIGKILL this process
    seen: int = 0  # matching writes begun so far
    target: tuple | None = None  # (thread, key) of the nth one, once it has begun
    fired: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hit(self, key: str, when: str) -> bool:
        if self.fired or not fnmatch.fnmatchcase(key, self.key):
            return False
        me = (threading.get_ident(), key)
        with self.lock:
            if when == "before":
                self.seen += 1
                if self.seen == self.n:
                    self.target = me
            if when == self.when and self.target == me:
                self.fired = True
                return True
        return False


def parse(spec: str) -> Fault:
    """`ACTCACHE_FAULT`'s form: ACTION:WHEN:N or ACTION:WHEN:KEY-GLOB (ACTION kill or raise)."""
    action, when, what = spec.split(":", 2)
    if action not in ("kill", "raise") or when not in ("before", "after"):
        raise ValueError(f"ACTCACHE_FAULT={spec!r}: expected kill|raise:before|after:N|KEY-GLOB")
    if what.isdigit():
        return Fault(n=int(what), when=when, action=action)
    return Fault(n=1, when=when, key=what, action=action)


ARMED: Fault | None = parse(os.environ["ACTCACHE_FAULT"]) if os.environ.get("ACTCACHE_FAULT") else None


def point(key: str, when: str) -> None:
    """Called by every writing backend before and after each mutation of `key`."""
    f = ARMED
    if f is not None and f.hit(key, when):
        if f.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise Killed(f"fault injected {when} writing {key}")


@contextlib.contextmanager
def armed(fault: Fault):
    """Arm `fault` for the block (in-process tests); yields it so a test can see whether it fired."""
    global ARMED
    old, ARMED = ARMED, fault
    try:
        yield fault
    finally:
        ARMED = old
