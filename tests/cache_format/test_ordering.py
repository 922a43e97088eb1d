"""Commits in plan order while segments are written concurrently (cache_format/ordering.py)."""

from __future__ import annotations

import glob
import threading
import time

import numpy as np
from support import plain_rows

import cache_format as cf
from cache_format.concurrency import CommitOrder
from cache_format.layout import BF16


def test_commits_follow_the_plan_although_later_segments_finish_first(tmp_path):
    url = str(tmp_path / "c")
    w = cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4)
    order = CommitOrder()
    finished = []

    def write(k, delay):
        with w.segment(meta={"unit": k}, turn=order.turn(k)) as seg:
            time.sleep(delay)
            seg.append({1: np.full((3, 8), k, BF16)}, **plain_rows(3, 10 * k))
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
                seg.append({1: np.full((3, 8), k, BF16)}, **plain_rows(3, 10 * k))
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
