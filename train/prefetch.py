"""The loader's background side: a producer on a daemon thread fills a bounded queue ahead of the
consumer, with a pool of decode threads at its disposal.

Kept apart from what is produced so that stopping is in one place: the producer's failure is
handed to the consumer as a queue item, and `close` stops the producer and drains the queue so
that a producer blocked on a full queue can exit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class Prefetcher:
    """`produce(self)` running on its own thread; it hands items over with `put` and checks `stop`."""

    def __init__(self, produce: Callable[[Prefetcher], None], depth: int, threads: int):
        self.stop = threading.Event()
        self.queue = queue.Queue(maxsize=depth)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="loader-read")
        self.thread = threading.Thread(target=self._run, args=(produce,), daemon=True, name="loader-batches")
        self.thread.start()

    def _run(self, produce: Callable[[Prefetcher], None]) -> None:
        try:
            produce(self)
        except BaseException as e:  # hand the failure to the consumer
            self.put(e)

    def put(self, item) -> bool:
        """Queue `item`, waiting for room; False once stopped (the producer should return)."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get_nowait()
            except queue.Empty:
                self.thread.join(timeout=0.05)
        self.pool.shutdown(wait=True, cancel_futures=True)
