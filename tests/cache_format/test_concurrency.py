"""Many writers, no coordinator (cache_format/concurrency.py): writer leases keep a live writer's
work from gc; work claims are held once, renewed, and taken over from dead holders by exactly one
process; and `QueueThread`, one worker thread behind a bounded queue, both ways."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from support import plain_rows

import cache_format as cf
from cache_format import concurrency, ops
from cache_format.concurrency import QueueThread
from cache_format.layout import BF16
from cache_format.stores import Location


def test_gc_at_zero_seconds_keeps_a_live_writers_segment_and_its_commit_is_good(tmp_path):
    url = str(tmp_path / "c")
    w = cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4, shard_mib=1 / 2**15)  # 4-row shards
    loc = Location(url)
    with w.segment() as seg:
        seg.append({1: np.ones((12, 8), BF16)}, **plain_rows(12, 0))  # whole shards already on disk
        seg.buffers[1].wait()
        on_disk = [o.key for o in loc.walk(f"segments/{seg.id}")]
        assert any("/c/" in k for k in on_disk) and f"segments/{seg.id}/.lease" in on_disk
        assert ops.gc(loc, older_than_s=0, force=True) == []  # leased: kept whatever --older-than says
        seg.append({1: np.ones((3, 8), BF16)}, **plain_rows(3, 100))
    c = cf.open_cache(url)
    assert c.n_tokens == 15 and ops.verify(c)[1] == []
    assert not os.path.exists(f"{url}/segments/{seg.id}/.lease")  # released at commit


def test_a_stale_lease_does_not_protect_a_dead_writers_leftovers(tmp_path):
    url = str(tmp_path / "c")
    cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4, shard_mib=1 / 2**15)
    loc = Location(url)
    w = cf.open_cache(loc, mode="a")  # writes through `loc`, whose leases the keeper renews
    seg = w.segment().__enter__()
    seg.append({1: np.ones((8, 8), BF16)}, **plain_rows(8, 0))
    seg.buffers[1].wait()
    concurrency.KEEPER.release_keep(loc, f"segments/{seg.id}")  # the writer "dies": nobody renews it
    lease = f"{url}/segments/{seg.id}/.lease"
    old = time.time() - concurrency.STALE_S - 60
    os.utime(lease, (old, old))
    doomed = ops.gc(Location(url), older_than_s=0, force=True)
    assert any("/c/" in k for k in doomed) and not os.path.exists(f"{url}/segments/{seg.id}")


def test_leases_are_renewed(tmp_path, monkeypatch):
    monkeypatch.setattr(concurrency, "RENEW_S", 0.2)
    url = str(tmp_path / "c")
    w = cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4)
    with w.segment() as seg:
        lease = f"{url}/segments/{seg.id}/.lease"
        os.utime(lease, (1, 1))
        deadline = time.time() + 10
        while os.stat(lease).st_mtime < 10 and time.time() < deadline:
            time.sleep(0.1)
        assert os.stat(lease).st_mtime > time.time() - 60
        seg.append({1: np.ones((2, 8), BF16)}, **plain_rows(2, 0))


def _age(path: str, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_a_claim_is_held_once_and_free_again_after_release(tmp_path):
    loc = Location(str(tmp_path / "c"))
    mine, theirs = concurrency.Claims(loc, "harvest"), concurrency.Claims(loc, "harvest")
    c = mine.take("corpus:0-3")
    assert c is not None and theirs.take("corpus:0-3") is None and theirs.held_elsewhere("corpus:0-3")
    assert theirs.take("corpus:4-7") is not None  # another unit is free
    c.release()
    again = theirs.take("corpus:0-3")
    assert again is not None
    c.release()  # a second release must not delete the claim another process has taken since
    assert mine.take("corpus:0-3") is None
    again.release()


def test_a_dead_claimants_claim_is_taken_over_by_exactly_one_process(tmp_path):
    loc = Location(str(tmp_path / "c"))
    dead = concurrency.Claims(loc, "harvest").take("u")
    concurrency.KEEPER.release_key(loc, dead.key, delete=False)  # its process "dies": nobody renews it
    _age(loc.path(dead.key), concurrency.STALE_S + 5)
    a, b = concurrency.Claims(loc, "harvest"), concurrency.Claims(loc, "harvest")
    assert a.held_elsewhere("u") is False  # stale: up for taking
    got = a.take("u")
    assert got is not None and got.key != dead.key  # the next number, created exclusively
    assert b.take("u") is None  # the takeover is fresh
    got.release()
    assert not [o for o in loc.walk("claims") if "u." in o.key]  # the dead claim went with it


def test_a_claim_is_renewed_while_held(tmp_path, monkeypatch):
    monkeypatch.setattr(concurrency, "RENEW_S", 0.2)
    loc = Location(str(tmp_path / "c"))
    c = concurrency.Claims(loc, "harvest").take("u")
    _age(loc.path(c.key), 3600)
    deadline = time.time() + 10
    while os.stat(loc.path(c.key)).st_mtime < time.time() - 60 and time.time() < deadline:
        time.sleep(0.1)
    assert concurrency.Claims(loc, "harvest").held_elsewhere("u")
    c.release()


def test_wait_for_ends_when_units_are_done_or_their_claimant_dies(tmp_path):
    loc = Location(str(tmp_path / "c"))
    other = concurrency.Claims(loc, "harvest")
    c1, c2 = other.take("a"), other.take("b")
    done: set = set()
    result = {}
    t = threading.Thread(
        target=lambda: result.setdefault(
            "left", concurrency.wait_for({"a": 1, "b": 2}, lambda items: [n for n in items if n in done], other, 0.05)
        )
    )
    t.start()
    time.sleep(0.3)
    assert t.is_alive()  # both held by a live process
    done.add("a")
    c1.release()
    concurrency.KEEPER.release_key(loc, c2.key, delete=False)  # b's process dies
    _age(loc.path(c2.key), concurrency.STALE_S + 5)
    t.join(10)
    assert result["left"] == ["b"]  # to take over


def test_a_claim_of_an_exited_process_of_this_host_is_taken_over_at_once(tmp_path):
    """A re-run after kill -9 on the same machine does not wait STALE_S for its own dead claims."""
    import json
    import subprocess
    import sys

    loc = Location(str(tmp_path / "c"))
    dead = concurrency.Claims(loc, "harvest").take("u")
    concurrency.KEEPER.release_key(loc, dead.key, delete=False)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    body = json.loads(loc.read(dead.key))
    loc.write(dead.key, json.dumps({**body, "pid": int(gone.stdout)}).encode())  # fresh, but its process exited
    mine = concurrency.Claims(loc, "harvest")
    assert not mine.held_elsewhere("u")
    got = mine.take("u")
    assert got is not None
    loc.write(got.key, json.dumps({**body, "host": "another-host", "pid": int(gone.stdout)}).encode())
    assert concurrency.Claims(loc, "harvest").take("u") is None  # another host's pid says nothing here: wait for it
    got.release()


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
