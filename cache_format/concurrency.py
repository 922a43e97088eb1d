"""Work that runs beside the caller: one worker thread behind a bounded queue.

`QueueThread` is the one shape both stages need. A producer thread fills a queue ahead of its
consumer (train's loader makes batches while the SAEs step; harvest plans units while units
run); a jobs thread runs what its submitter hands it, in order (harvest's writer compresses
and writes while the GPU runs the next forward). The queue is bounded in both, so the faster
side waits (back-pressure) and memory stays flat. A failure on the thread is handed to the
caller, stopping is in one place (`close`), and a thread blocked on a full queue can always exit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

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
