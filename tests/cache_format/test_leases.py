"""Writer leases keep a live writer's work from gc (cache_format/concurrency.py)."""

from __future__ import annotations

import os
import time

import numpy as np
from support import plain_rows

import cache_format as cf
from cache_format import concurrency, ops
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
