"""Many writers, no coordinator: leases, work claims and commit order; and the one worker
thread behind a bounded queue that both stages use.

**Leases.** A writer holds a lease object `<unit>/.lease` (the segment's or backfill's
directory) from its first object until its commit record lands or it abandons the work. One
daemon thread per process rewrites every held lease each RENEW_S (60 s); a lease whose object
is older than STALE_S (10 min) belongs to a dead writer. gc skips every unit with a live lease,
whatever its `--older-than`. STALE_S is several times RENEW_S, since a holder that misses
renewals for STALE_S is taken for dead. Both are constants, not settings: every process sharing
a cache must agree on STALE_S (one with a shorter one would take a live writer for dead and gc
its segment), and nothing but a process's own clock tells it another's.

**Work claims.** Any number of processes sharing a cache compute each unit of work once. A
process claims a unit (a harvest unit, a segment's backfilled layer, a unit's rollouts) before
computing it: an object `claims/<scope>/<NAME>.<n>.json`, created exclusively at the next
number (as commit records are) and renewed like a lease while its holder lives. The highest
number is the current claim. Live (renewed within STALE_S): another process is computing the
unit; skip it and come back to it at the end. Stale: its holder died; the unit is taken over by
creating number n+1 exclusively, so of two processes that both see it stale, exactly one takes
it over. A claim of a process of this host that has exited counts as stale at once (a re-run
after kill -9 does not wait). A claim is a promise to try, not a lock: a holder paused past
STALE_S loses its claim without knowing it. So the commit itself re-checks (`log.commit`'s
`refuse`) and a duplicate is abandoned there; claims only keep processes from wasting work.

**Commit order.** Writer threads (or processes) write a segment's objects whenever they are
ready, but its commit record waits for its turn: turn k commits only after turns 0..k-1 have.
So an uninterrupted run commits in the same order every time, and a killed one has committed a
prefix of the plan, which a resumed run continues in the same order. A turn whose segment
fails breaks the order: later turns refuse to commit (their work is redone on resume), so the
committed segments stay a prefix of the plan.

**QueueThread** is the one thread shape both stages need. A producer thread fills a queue ahead of its
consumer (train's loader makes batches while the SAEs step; harvest plans units while units
run); a jobs thread runs what its submitter hands it, in order (harvest's writer compresses
and writes while the GPU runs the next forward). The queue is bounded in both, so the faster
side waits (back-pressure) and memory stays flat. A failure on the thread is handed to the
caller, stopping is in one place (`close`), and a thread blocked on a full queue can always exit.
"""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .errors import UserError
from .provenance import now_iso

# -- leases ---------------------------------------------------------------------------

LEASE = ".lease"
RENEW_S = 60.0  # read at every renewal: tests shorten it
STALE_S = 600.0


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
    """Keep renewing the object `key` (a work claim) until `release_key`."""
    KEEPER.hold_key(loc, key, write)


def release_key(loc, key: str) -> None:
    KEEPER.release_key(loc, key)


def live(mtime: float, now: float | None = None) -> bool:
    """Whether a lease (or claim) object last written at `mtime` is still renewed by its holder."""
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


# -- work claims ----------------------------------------------------------------------

CLAIMS = "claims"
_CLAIM = re.compile(r"^(.+)\.(\d{6})\.json$")
POLL_S = 2.0  # how often a process waiting for others' units looks again


def safe_name(name: str) -> str:
    """A unit's name as one path segment (unit keys hold ':' and the like)."""
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", name)


class Claim:
    """A held claim: renewed until `release()`."""

    def __init__(self, loc, key: str, older: list[str]):
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
        release_key(self.loc, self.key)
        if self.older:
            try:
                self.loc.delete(self.older)
            except Exception:  # leftovers are stale claims: harmless, taken over if ever needed
                pass


class Claims:
    """The claims of one kind of work (`scope`) on the cache at `loc`."""

    def __init__(self, loc, scope: str):
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
        if not live(o.mtime):
            return False
        try:
            return not dead_here(self.loc.read(o.key))
        except FileNotFoundError:  # released meanwhile
            return False

    def take(self, name: str) -> Claim | None:
        """Claim `name` (free, or its claimant dead); None if a live process holds it."""
        found = self._current(name)
        if found and self._live(found[-1][1]):
            return None
        n = found[-1][0] + 1 if found else 1
        key = f"{self.prefix}/{safe_name(name)}.{n:06d}.json"
        if not self.loc.create_exclusive(key, body()):
            return None  # another process took it (or took it over) first
        hold_key(self.loc, key, write=False)
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


# -- commit order ---------------------------------------------------------------------


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


# -- one worker thread behind a bounded queue -------------------------------------------

_POLL_S = 0.1  # how often a blocked put looks whether the thread was stopped


class _End:
    """The producer returned: nothing follows."""


class _Failed:
    """The thread failed; the consumer re-raises `error`."""

    def __init__(self, error: BaseException):
        self.error = error


class QueueThread:
    """One daemon thread on one side of a bounded queue. Make one with `producer` or `jobs`."""

    END = _End()  # what `get` returns once the producer has returned

    def __init__(self, depth: int, name: str, kind: str):
        self.kind = kind  # "producer" | "jobs"
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stopped = threading.Event()  # set by `close`: a producer returns when `put` says False
        self.error: BaseException | None = None
        self.name = name
        self._thread: threading.Thread | None = None
        self._closed = False
        self._ended = False  # the producer's END was taken: every later `get` returns END

    def _start(self, target: Callable[[], None]) -> QueueThread:
        self._thread = threading.Thread(target=target, name=self.name, daemon=True)
        self._thread.start()
        return self

    # -- producer: the thread fills the queue, the caller takes ---------------------------

    @classmethod
    def producer(cls, produce: Callable[[QueueThread], None], depth: int = 2, name: str = "producer") -> QueueThread:
        """Run `produce(qt)` on the thread; it hands items over with `qt.put(item)` (False once
        stopped: it should return). Its return ends the stream; its failure reaches `get`."""
        qt = cls(depth, name, "producer")

        def run():
            try:
                produce(qt)
            except BaseException as e:  # handed to the consumer, which re-raises it
                qt.put(_Failed(e))
            else:
                qt.put(cls.END)

        return qt._start(run)

    def put(self, item: Any) -> bool:
        """Queue `item`, waiting for room; False once the consumer has stopped the thread."""
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def get(self, timeout: float | None = None) -> Any:
        """The next item (waiting for it), or `QueueThread.END` once the producer has returned;
        re-raises the producer's failure. `queue.Empty` if `timeout` passes first."""
        if self._ended:
            return self.END
        item = self.queue.get(timeout=timeout)
        if isinstance(item, _Failed):
            raise item.error
        self._ended = item is self.END
        return item

    def __iter__(self) -> Iterator[Any]:
        """The items until the producer returns (its failure is raised here)."""
        while (item := self.get()) is not self.END:
            yield item

    # -- jobs: the caller submits, the thread runs them in order ---------------------------

    @classmethod
    def jobs(cls, depth: int = 8, name: str = "jobs") -> QueueThread:
        """A thread that runs submitted callables in order. `submit` waits only when `depth` jobs
        are already waiting. The first failure skips the jobs after it and is re-raised by the
        next `submit` or by `close`."""
        qt = cls(depth, name, "jobs")

        def run():
            while (job := qt.queue.get()) is not cls.END:
                if qt.error is None:
                    try:
                        job()
                    except BaseException as e:  # surfaced by submit() / close()
                        qt.error = e

        return qt._start(run)

    def submit(self, job: Callable[[], Any]) -> None:
        """Queue `job` (waits for room); re-raises the failure of an earlier job."""
        if self.error is not None:
            raise self.error
        self.queue.put(job)

    # -- both ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop and join the thread. A producer is stopped where it stands (the queue is drained
        so that a `put` blocked on it returns); a jobs thread first runs every job submitted,
        then the first failure among them is re-raised. Closing twice does nothing more."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        if self.kind == "jobs":
            self.queue.put(self.END)
            thread.join()
            if self.error is not None:
                raise self.error
            return
        self.stopped.set()
        while thread.is_alive():
            try:
                self.queue.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)

    def __enter__(self) -> QueueThread:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except BaseException:  # the block's own exception is the one to see
                pass
        return False
