"""One worker thread behind a bounded queue (cache_format/concurrency.py `QueueThread`), both ways."""

from __future__ import annotations

import threading
import time

import pytest

from cache_format.concurrency import QueueThread


def test_a_producer_hands_its_items_over_in_order_then_ends():
    qt = QueueThread.producer(lambda q: [q.put(i) for i in range(50)], depth=3)
    assert list(qt) == list(range(50))
    assert qt.get() is QueueThread.END  # stays ended
    qt.close()


def test_a_producer_waits_for_room_back_pressure():
    made = []

    def produce(q):
        for i in range(100):
            made.append(i)
            if not q.put(i):
                return

    qt = QueueThread.producer(produce, depth=4)
    time.sleep(0.3)
    assert len(made) <= 4 + 1  # depth queued, one waiting to be put
    assert qt.get() == 0
    time.sleep(0.2)
    assert len(made) <= 4 + 2
    qt.close()


def test_a_producers_failure_reaches_the_consumer_after_its_items():
    def produce(q):
        q.put("a")
        q.put("b")
        raise KeyError("disk gone")

    qt = QueueThread.producer(produce, depth=8)
    assert qt.get() == "a" and qt.get() == "b"
    with pytest.raises(KeyError, match="disk gone"):
        qt.get()
    qt.close()


def test_close_stops_a_producer_blocked_on_a_full_queue():
    stopped = threading.Event()

    def produce(q):
        i = 0
        while q.put(i):
            i += 1
        stopped.set()  # put said False: the producer returns

    qt = QueueThread.producer(produce, depth=2, name="test-producer")
    assert qt.get() == 0
    t0 = time.monotonic()
    qt.close()
    assert stopped.is_set() and time.monotonic() - t0 < 5
    assert not any(t.name == "test-producer" for t in threading.enumerate())
    qt.close()  # twice is fine


def test_jobs_run_in_order_on_one_thread_and_close_waits_for_them():
    done, threads = [], set()

    def job(i):
        time.sleep(0.001)
        done.append(i)
        threads.add(threading.current_thread().name)

    with QueueThread.jobs(depth=2, name="test-jobs") as qt:
        for i in range(30):
            qt.submit(lambda i=i: job(i))
    assert done == list(range(30)) and threads == {"test-jobs"}


def test_submit_waits_when_depth_jobs_are_waiting():
    release = threading.Event()
    qt = QueueThread.jobs(depth=2)
    qt.submit(release.wait)  # running
    qt.submit(lambda: None)
    qt.submit(lambda: None)  # the queue holds two
    blocked = threading.Thread(target=qt.submit, args=(lambda: None,))
    blocked.start()
    blocked.join(timeout=0.3)
    assert blocked.is_alive()  # back-pressure
    release.set()
    blocked.join(timeout=5)
    assert not blocked.is_alive()
    qt.close()


def test_the_first_failed_job_is_raised_by_submit_and_close_and_skips_the_rest():
    ran = []
    qt = QueueThread.jobs(depth=4)
    qt.submit(lambda: ran.append(1))
    qt.submit(lambda: 1 / 0)
    qt.submit(lambda: ran.append(3))  # skipped: a job after the failure
    deadline = time.monotonic() + 5
    while qt.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(ZeroDivisionError):
        qt.submit(lambda: ran.append(4))
    with pytest.raises(ZeroDivisionError):
        qt.close()
    assert ran == [1]


def test_an_exception_in_the_with_block_is_the_one_raised():
    with pytest.raises(RuntimeError, match="the caller's"):
        with QueueThread.jobs() as qt:
            qt.submit(lambda: 1 / 0)
            raise RuntimeError("the caller's")
