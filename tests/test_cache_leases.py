"""Writer leases keep gc off live work; commits land in plan order whatever the timing."""

from __future__ import annotations

import glob
import os
import threading
import time

import numpy as np
import pytest

import cache_format as cf
from cache_format import leases, ops
from cache_format.bf16 import BF16
from cache_format.ordering import CommitOrder
from cache_format.stores import Location


def _rows(n, base):
    ids = np.arange(n) + base
    return dict(tokens=ids, seq_ids=ids, positions=np.zeros(n, np.int32))


def test_gc_at_zero_seconds_keeps_a_live_writers_segment_and_its_commit_is_good(tmp_path):
    url = str(tmp_path / "c")
    w = cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4, shard_mib=1 / 2**15)  # 4-row shards
    loc = Location(url)
    with w.segment() as seg:
        seg.append({1: np.ones((12, 8), BF16)}, **_rows(12, 0))  # whole shards already on disk
        seg.buffers[1]._wait()
        on_disk = [o.key for o in loc.walk(f"segments/{seg.id}")]
        assert any("/c/" in k for k in on_disk) and f"segments/{seg.id}/.lease" in on_disk
        assert ops.gc(loc, older_than_s=0, force=True) == []  # leased: kept whatever --older-than says
        seg.append({1: np.ones((3, 8), BF16)}, **_rows(3, 100))
    c = cf.open_cache(url)
    assert c.n_tokens == 15 and ops.verify(c)[1] == []
    assert not os.path.exists(f"{url}/segments/{seg.id}/.lease")  # released at commit


def test_gc_racing_a_commit_never_deletes_what_just_committed(tmp_path, monkeypatch):
    from cache_format import commits

    url = str(tmp_path / "c")
    w = cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4, shard_mib=1 / 2**15)
    loc = Location(url)
    read_log, committed, doomed = threading.Event(), threading.Event(), []
    real = commits.load_records

    def load_then_wait(*a, **kw):  # the writer commits (and drops its lease) right after gc read the log
        out = real(*a, **kw)
        if threading.current_thread() is gc:  # the writer's own commit reads the log too
            read_log.set()
            committed.wait(10)
        return out

    monkeypatch.setattr(commits, "load_records", load_then_wait)
    gc = threading.Thread(target=lambda: doomed.extend(ops.gc(loc, older_than_s=0, force=True)))
    with w.segment() as seg:
        seg.append({1: np.ones((12, 8), BF16)}, **_rows(12, 0))
        seg.buffers[1]._wait()
        gc.start()
        read_log.wait(10)
    committed.set()
    gc.join(10)
    monkeypatch.setattr(commits, "load_records", real)
    c = cf.open_cache(url)
    assert doomed == [] and c.n_tokens == 12 and ops.verify(c)[1] == []


def test_a_stale_lease_does_not_protect_a_dead_writers_leftovers(tmp_path):
    url = str(tmp_path / "c")
    w = cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4, shard_mib=1 / 2**15)
    seg = w.segment().__enter__()
    seg.append({1: np.ones((8, 8), BF16)}, **_rows(8, 0))
    seg.buffers[1]._wait()
    leases.KEEPER.release_keep(w.loc, f"segments/{seg.id}")  # the writer "dies": nobody renews it
    lease = f"{url}/segments/{seg.id}/.lease"
    old = time.time() - leases.STALE_S - 60
    os.utime(lease, (old, old))
    doomed = ops.gc(Location(url), older_than_s=0, force=True)
    assert any("/c/" in k for k in doomed) and not os.path.exists(f"{url}/segments/{seg.id}")


def test_leases_are_renewed(tmp_path, monkeypatch):
    monkeypatch.setattr(leases, "RENEW_S", 0.2)
    url = str(tmp_path / "c")
    w = cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4)
    with w.segment() as seg:
        lease = f"{url}/segments/{seg.id}/.lease"
        os.utime(lease, (1, 1))
        deadline = time.time() + 10
        while os.stat(lease).st_mtime < 10 and time.time() < deadline:
            time.sleep(0.1)
        assert os.stat(lease).st_mtime > time.time() - 60
        seg.append({1: np.ones((2, 8), BF16)}, **_rows(2, 0))


@pytest.mark.parametrize("args, needle", [(["--older-than", "10m"], "under an hour"),
                                          (["--older-than", "0s"], "add --force")])
def test_gc_below_an_hour_needs_force(tmp_path, args, needle, monkeypatch, capsys):
    import sys

    from cache_format.cli import main

    url = str(tmp_path / "c")
    cf.create_cache(url, d_model=8, layers=[1])
    monkeypatch.setattr(sys, "argv", ["python -m cache_format", "gc", url, *args])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err


def test_commits_follow_the_plan_although_later_segments_finish_first(tmp_path):
    url = str(tmp_path / "c")
    w = cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4)
    order = CommitOrder()
    finished = []

    def write(k, delay):
        with w.segment(meta={"unit": k}, turn=order.turn(k)) as seg:
            time.sleep(delay)
            seg.append({1: np.full((3, 8), k, BF16)}, **_rows(3, 10 * k))
            finished.append(k)

    ts = [threading.Thread(target=write, args=(k, 0.3 * (3 - k))) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert finished != [0, 1, 2, 3]  # timing said otherwise...
    assert [s.meta["unit"] for s in cf.open_cache(url).segments] == [0, 1, 2, 3]  # ...the plan wins


def test_a_failed_turn_stops_later_commits_so_the_committed_set_stays_a_prefix(tmp_path):
    url = str(tmp_path / "c")
    w = cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4)
    order = CommitOrder()
    errors = {}

    def write(k):
        try:
            with w.segment(meta={"unit": k}, turn=order.turn(k)) as seg:
                if k == 1:
                    raise RuntimeError("unit 1 failed")
                seg.append({1: np.full((3, 8), k, BF16)}, **_rows(3, 10 * k))
        except Exception as e:
            errors[k] = e

    ts = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert [s.meta["unit"] for s in cf.open_cache(url).segments] == [0]
    assert set(errors) == {1, 2, 3} and "segment 1 failed first" in str(errors[3])
    assert glob.glob(f"{url}/segments/*/.lease") == []  # abandoned segments leave no lease behind


def test_deferred_segments_are_committed_by_a_coordinator_in_its_order(tmp_path):
    url = str(tmp_path / "c")
    w = cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4)
    prepared = []
    for k in (2, 0, 1):  # workers finish in any order
        with w.segment(meta={"unit": k}, defer=True) as seg:
            seg.append({1: np.full((3, 8), k, BF16)}, **_rows(3, 10 * k))
        assert seg.committed is None and os.path.exists(f"{url}/segments/{seg.id}/.lease")
        prepared.append(seg.prepared)
        w.adopt(seg.prepared)
    assert cf.open_cache(url).n_tokens == 0
    for rec in sorted(prepared, key=lambda r: r["meta"]["unit"]):
        w.commit_prepared(rec)
    c = cf.open_cache(url)
    assert [s.meta["unit"] for s in c.segments] == [0, 1, 2] and ops.verify(c)[1] == []
    assert glob.glob(f"{url}/segments/*/.lease") == []


def test_duplicate_rows_in_a_segment_are_refused(tmp_path):
    w = cf.create_cache(tmp_path / "c", d_model=8, layers=[1], chunk_tokens=4)
    with pytest.raises(cf.UserError, match=r"\(seq_id 5, position 0\) was appended twice"):
        with w.segment() as seg:
            seg.append({1: np.ones((2, 8), BF16)}, tokens=np.arange(2), seq_ids=np.array([5, 6]),
                       positions=np.zeros(2, np.int32))
            seg.append({1: np.ones((1, 8), BF16)}, tokens=np.arange(1), seq_ids=np.array([5]),
                       positions=np.zeros(1, np.int32))
    assert w.snapshot().n_tokens == 0
    # seq ids that differ only above bit 32 are distinct rows, not duplicates
    with w.segment() as seg:
        seg.append({1: np.ones((2, 8), BF16)}, tokens=np.arange(2), seq_ids=np.array([7, 7 + (1 << 32)]),
                   positions=np.zeros(2, np.int32))
    assert w.snapshot().n_tokens == 2
