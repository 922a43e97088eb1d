"""Work claims (cache_format/concurrency.py) and the commit-time check that backs them (conflicts.py)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
from support import plain_rows

import cache_format as cf
from cache_format import concurrency
from cache_format.concurrency import CommitOrder
from cache_format.layout import BF16
from cache_format.stores import Location


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


def _segment(w, base, once=True, turn=None):
    with w.segment(once=once, turn=turn) as seg:
        seg.append({1: np.ones((4, 8), BF16)}, **plain_rows(4, base))
    return seg


def test_a_commit_checks_every_record_before_it(tmp_path):
    url = str(tmp_path / "c")
    w = cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4)
    first = _segment(w, 0)
    _segment(w, 100)
    dup = _segment(w, 2)  # seq_ids 2..5 overlap the first segment, two records back
    assert dup.committed is None and first.id in dup.refused and "seq_ids 2..3" in dup.refused
    c = cf.open_cache(url)
    assert len(c.segments) == 2 and not os.path.exists(f"{url}/segments/{dup.id}")  # abandoned
    assert _segment(w, 2, once=False).committed  # without `once`, a writer may (verify then flags it)


def test_two_commits_racing_for_consecutive_numbers_cannot_both_land(tmp_path):
    """A checks the log up to record N-1 and goes to create N; B creates N first with the same
    sequences. A's create fails, A moves to N+1: its check must then see B's record."""
    url = str(tmp_path / "c")
    cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4)
    loc_a = Location(url)
    a, b = cf.open_cache(loc_a, mode="a"), cf.open_cache(url, mode="a")
    create = loc_a.create_exclusive
    raced = []

    def create_after_b(key, data):
        if key.startswith("commits/") and not raced:
            raced.append(_segment(b, 0))  # B lands at the number A is about to take
        return create(key, data)

    loc_a.create_exclusive = create_after_b
    seg_a = _segment(a, 0)
    assert raced[0].committed == "0000000001.json"
    assert seg_a.committed is None and raced[0].id in seg_a.refused
    assert len(cf.open_cache(url).segments) == 1


def test_a_refused_segment_keeps_the_commit_order_going(tmp_path):
    url = str(tmp_path / "c")
    w = cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4)
    _segment(w, 0)
    order = CommitOrder()
    assert _segment(w, 0, turn=order.turn(0)).refused
    assert _segment(w, 50, turn=order.turn(1)).committed  # not OrderBroken: turn 0 was filled


def test_a_layer_is_backfilled_once(tmp_path):
    url = str(tmp_path / "c")
    w = cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4)
    seg = _segment(w, 0)
    a, b = cf.open_cache(url, mode="a").add_layer(2), cf.open_cache(url, mode="a").add_layer(2)
    rows = plain_rows(4, 0)
    with a.segment(seg.id) as late:  # both begin before either commits
        late.append({2: np.ones((4, 8), BF16)}, **rows)
        with b.segment(seg.id) as early:
            early.append({2: np.ones((4, 8), BF16)}, **rows)
        assert early.committed
    assert late.committed is None and "already has layer 2" in late.refused
    c = cf.open_cache(url)
    assert c.layers == [1, 2] and sum(r["kind"] == "add_layer" for r in _records(url)) == 1


def _records(url):
    from cache_format import log

    return list(log.load_records(Location(url), {}).values())


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
