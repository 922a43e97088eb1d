"""The segment write-and-commit protocol (cache_format/write.py, shards.py): what a writer refuses,
create and append, a failed block abandoned, deferred and plan-ordered commits, the commit check
that makes a unit land once, killed and concurrent writers, crash-safe creation (killed at each
store write by the fault hook, cache_format/stores/base.py, not by timing), standard zarr arrays."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import zarr
from support import plain_rows

import cache_format as cf
from cache_format import log, ops
from cache_format.concurrency import CommitOrder
from cache_format.layout import BF16
from cache_format.stores import Location
from cache_format.stores.base import Fault, Killed, armed
from cache_format.sync import sync
from cache_format.write import CacheExistsError


def test_duplicate_rows_in_a_segment_are_refused(tmp_path):
    w = cf.create_cache(tmp_path / "c", d_model=8, layers=[1], chunk_tokens=4)
    with pytest.raises(cf.UserError, match=r"\(seq_id 5, position 0\) was appended twice"):
        with w.segment() as seg:
            seg.append(
                {1: np.ones((2, 8), BF16)},
                tokens=np.arange(2),
                seq_ids=np.array([5, 6]),
                positions=np.zeros(2, np.int32),
            )
            seg.append(
                {1: np.ones((1, 8), BF16)}, tokens=np.arange(1), seq_ids=np.array([5]), positions=np.zeros(1, np.int32)
            )
    assert w.snapshot().n_tokens == 0
    # seq ids that differ only above bit 32 are distinct rows, not duplicates
    with w.segment() as seg:
        seg.append(
            {1: np.ones((2, 8), BF16)},
            tokens=np.arange(2),
            seq_ids=np.array([7, 7 + (1 << 32)]),
            positions=np.zeros(2, np.int32),
        )
    assert w.snapshot().n_tokens == 2


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# A writer that appends segments forever; segment i of writer w holds rows whose token id
# encodes (w, i, row), so a reader can check every row's identity and order.
WRITER = textwrap.dedent("""
    import sys, numpy as np
    import cache_format as cf
    from cache_format.layout import BF16
    url, wid, n_segs, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    w = cf.open_cache(url, mode="a")
    i = 0
    while n_segs < 0 or i < n_segs:
        with w.segment(meta={"writer": wid, "i": i}) as seg:
            for part in range(3):
                n = rows // 3
                tok = wid * 10**6 + i * 10**3 + part * n + np.arange(n)
                x = (np.random.default_rng(tok[0]).standard_normal((n, 32))).astype(BF16)
                seg.append(
                    residuals={2: x}, tokens=tok, seq_ids=np.full(n, wid * 1000 + i), positions=part * n + np.arange(n)
                )
                if n_segs == -2 and i == 1 and part == 2:  # hang mid-segment, shards already flushed
                    print("hang", flush=True)
                    import time; time.sleep(600)
            print("committing", i, flush=True)
        print("committed", i, flush=True)
        i += 1
""")


def _spawn(url, wid, n_segs, rows):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(url), str(wid), str(n_segs), str(rows)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _expected_tokens(wid, i, rows):
    n = rows // 3
    return np.concatenate([wid * 10**6 + i * 10**3 + p * n + np.arange(n) for p in range(3)])


@pytest.mark.parametrize("case", ["not_a_cache", "layer", "d_model", "exists", "codec", "unwritable", "dtype", "rows"])
def test_clear_errors(tmp_path, make_cache, case):
    url, data = make_cache(segments=(10,))
    x = np.zeros((4, 16), BF16)
    rows = dict(tokens=np.arange(4), seq_ids=np.arange(4), positions=np.arange(4))
    if case == "not_a_cache":
        with pytest.raises(cf.CacheError, match="is not a cache"):
            cf.open_cache(tmp_path)
    elif case == "layer":
        with pytest.raises(cf.CacheError, match="layer 9 is not in the cache"):
            cf.open_cache(url).residuals(9)
    elif case == "d_model":
        with pytest.raises(cf.UserError, match="d_model mismatch"):
            with cf.open_cache(url, mode="a").segment() as seg:
                seg.append(residuals={1: np.zeros((4, 8), BF16), 3: np.zeros((4, 8), BF16)}, **rows)
    elif case == "exists":
        with pytest.raises(cf.UserError, match="already holds a cache"):
            cf.create_cache(url, d_model=16, layers=[1])
    elif case == "codec":
        with pytest.raises(cf.UserError, match="unknown codec 'lzma9'"):
            cf.create_cache(tmp_path / "x", d_model=16, layers=[1], codec="lzma9")
    elif case == "unwritable":
        (tmp_path / "file").write_text("x")
        with pytest.raises(cf.UserError, match="cannot write"):
            cf.create_cache(tmp_path / "file" / "c", d_model=16, layers=[1])
    elif case == "dtype":
        with pytest.raises(cf.UserError, match="expected bfloat16"):
            with cf.open_cache(url, mode="a").segment() as seg:
                seg.append(residuals={1: np.zeros((4, 16), np.float32), 3: x}, **rows)
    elif case == "rows":
        with pytest.raises(cf.UserError, match="tokens has 3 rows"):
            with cf.open_cache(url, mode="a").segment() as seg:
                seg.append(residuals={1: x, 3: x}, tokens=np.arange(3), seq_ids=np.arange(4), positions=np.arange(4))
    assert cf.open_cache(url).n_tokens == 10  # nothing committed was lost


def test_deferred_segments_are_committed_by_a_coordinator_in_its_order(tmp_path):
    url = str(tmp_path / "c")
    w = cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4)
    prepared = []
    for k in (2, 0, 1):  # workers finish in any order
        with w.segment(meta={"unit": k}, defer=True) as seg:
            seg.append({1: np.full((3, 8), k, BF16)}, **plain_rows(3, 10 * k))
        assert seg.committed is None and os.path.exists(f"{url}/segments/{seg.id}/.lease")
        prepared.append(seg.prepared)
        w.adopt(seg.prepared)
    assert cf.open_cache(url).n_tokens == 0
    for rec in sorted(prepared, key=lambda r: r["meta"]["unit"]):
        w.commit_prepared(rec)
    c = cf.open_cache(url)
    assert [s.meta["unit"] for s in c.segments] == [0, 1, 2] and ops.verify(c)[1] == []
    assert glob.glob(f"{url}/segments/*/.lease") == []


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, "hang"])
def test_writer_killed_mid_segment_leaves_a_readable_cache(tmp_path, seed):
    url = tmp_path / "c"
    # tiny shards (16-row chunks, 64 chunks a shard) so a segment flushes several shards
    cf.create_cache(url, d_model=32, layers=[2], chunk_tokens=16, shard_mib=1 / 16)
    p = _spawn(url, 1, -2 if seed == "hang" else -1, 2400)
    if seed == "hang":  # deterministic: killed with shards of segment 1 on disk
        while p.stdout.readline().strip() != "hang":
            pass
    else:  # at a random point of a writer that commits segment after segment
        assert p.stdout.readline().startswith("committing")  # imports done, writing
        time.sleep(np.random.default_rng(seed).uniform(0.2, 2.0))
    p.send_signal(signal.SIGKILL)
    p.wait()
    c = cf.open_cache(url)
    segs = c.segments
    assert [s.meta["i"] for s in segs] == list(range(len(segs)))
    assert np.array_equal(
        c.tokens[:], np.concatenate([_expected_tokens(1, i, 2400) for i in range(len(segs))] or [np.zeros(0, np.int32)])
    )
    n, bad = ops.verify(c)
    assert bad == []
    fp = c.fingerprint
    loc = Location(str(url))
    leases = glob.glob(str(url / "segments" / "*" / ".lease"))
    if seed == "hang":  # the killed writer's lease is fresh for 10 minutes: gc keeps its work even at 0s
        assert len(leases) == 1 and ops.gc(loc, older_than_s=0, dry_run=True, force=True) == []
    for lease in leases:  # ...then it goes stale
        os.utime(lease, (time.time() - 660, time.time() - 660))
    leftovers = ops.gc(loc, older_than_s=0, dry_run=True, force=True)
    committed = set(log.segment_objects(c.log.segments[0]) if segs else {})
    assert not committed & set(leftovers)
    if seed == "hang":
        assert len(segs) == 1 and any("/resid_post/2/c/" in k for k in leftovers)  # unreferenced shards
    assert ops.gc(loc, older_than_s=3600) == []  # within the grace period nothing goes
    ops.gc(loc, older_than_s=0, force=True)
    assert ops.gc(loc, older_than_s=0, dry_run=True, force=True) == []
    c2 = cf.open_cache(url)
    assert c2.fingerprint == fp and ops.verify(c2)[1] == []


@pytest.mark.slow
def test_four_concurrent_writers_lose_no_rows(tmp_path):
    url = tmp_path / "c"
    cf.create_cache(url, d_model=32, layers=[2], chunk_tokens=16, shard_mib=1 / 16)
    n_segs, rows = 4, 300
    procs = [_spawn(url, w, n_segs, rows) for w in range(4)]
    reader = cf.open_cache(url)
    prev = reader.tokens[:]
    while any(p.poll() is None for p in procs):  # a snapshot reader: rows never shift under it
        now = reader.refresh().tokens[:]
        assert np.array_equal(now[: len(prev)], prev)
        prev = now
        time.sleep(0.05)
    for p in procs:
        assert p.returncode == 0, p.stderr.read()
    c = cf.open_cache(url)
    assert [s.commit for s in c.segments] == [f"{i:010d}.json" for i in range(1, 4 * n_segs + 1)]
    tok = c.tokens[:]
    assert len(tok) == 4 * n_segs * rows and len(np.unique(tok)) == len(tok)  # every row exactly once
    for w in range(4):
        mine = [s for s in c.segments if s.meta["writer"] == w]
        assert [s.meta["i"] for s in mine] == list(range(n_segs))  # one writer's rows in its order
        for s in mine:
            assert np.array_equal(tok[s.row_start : s.row_start + s.n_rows], _expected_tokens(w, s.meta["i"], rows))
            x = c.residuals(2).numpy(s.row_start, s.row_start + 100)
            first = _expected_tokens(w, s.meta["i"], rows)[0]
            assert np.array_equal(x, np.random.default_rng(first).standard_normal((100, 32)).astype(x.dtype))
    assert ops.verify(c)[1] == []


def test_exception_abandons_segment(make_cache):
    url, _ = make_cache(segments=(10,))
    w = cf.open_cache(url, mode="a")
    with pytest.raises(RuntimeError):
        with w.segment() as seg:
            seg.append(
                residuals={1: np.ones((5, 16), BF16), 3: np.ones((5, 16), BF16)},
                tokens=np.arange(5),
                seq_ids=np.arange(5),
                positions=np.arange(5),
            )
            raise RuntimeError("boom")
    assert cf.open_cache(url).n_tokens == 10


def test_arrays_are_standard_zarr(make_cache):
    url, data = make_cache()
    c = cf.open_cache(url)
    seg = c.segments[0]
    arr = zarr.open_array(f"{url}/segments/{seg.id}/resid_post/3", mode="r")
    assert arr.dtype == np.uint16 and arr.attrs["actcache_dtype"] == "bfloat16"
    assert np.array_equal(arr[:], data["residuals"][3][:40].view(np.uint16))
    meta = json.load(open(f"{url}/segments/{seg.id}/resid_post/3/zarr.json"))
    (shard,) = meta["codecs"]
    blosc = shard["configuration"]["codecs"][1]["configuration"]
    assert shard["name"] == "sharding_indexed" and blosc == {
        "typesize": 2,
        "cname": "zstd",
        "clevel": 1,
        "shuffle": "shuffle",
        "blocksize": 1 << 20,
    }


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


TOKENIZER = {"tokenizer.json": b'{"model": {}}', "tokenizer_config.json": b"{}"}


CREATE_WRITES = 1 + len(TOKENIZER) + 1  # zarr.json, the tokenizer files, the root commit record


def _create(url):
    return cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4, meta={"run": 1}, tokenizer_files=TOKENIZER)


def _usable(url):
    """A finished cache: it opens, takes a segment, verifies, serves its tokenizer."""
    w = cf.open_cache(url, mode="a")
    with w.segment() as seg:
        seg.append({1: np.ones((4, 8), BF16)}, **plain_rows(4, 0))
    c = cf.open_cache(url)
    assert c.n_tokens == 4 and ops.verify(c)[1] == [] and c.tokenizer_files == TOKENIZER
    return c


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("n", range(1, CREATE_WRITES + 1))
def test_create_killed_at_any_write_is_finished_by_the_same_call(tmp_path, run, n, when):
    url = str(tmp_path / "c")
    with armed(Fault(n=n, when=when)) as f, pytest.raises(Killed):
        _create(url)
    assert f.fired
    if not os.path.exists(os.path.join(url, "zarr.json")):  # killed before the point of no return
        assert not Location(url).is_nonempty_dir()  # nothing (a temporary at most)
    elif n == CREATE_WRITES and when == "after":  # the last write landed: a finished cache
        with pytest.raises(CacheExistsError):
            _create(url)
        _usable(url)
        return
    else:  # unfinished: every reader says how to finish it, in one line
        with pytest.raises(cf.CacheError, match="creation was interrupted.*re-run the command"):
            cf.open_cache(url)
        with pytest.raises(cf.CacheError, match="creation was interrupted"):
            cf.open_cache(url, mode="a")
        for cmd in ("info", "verify"):
            code, out, err = run(cmd, url)
            assert code == 2 and err.count("\n") == 1 and "re-run the command that created it" in err
    _create(url)  # the same call again finishes it
    _usable(url)


def test_an_unfinished_cache_with_other_settings_is_finished_but_not_taken(tmp_path):
    url = str(tmp_path / "c")
    with armed(Fault(n=2, when="before")), pytest.raises(Killed):
        _create(url)  # killed after zarr.json
    with pytest.raises(CacheExistsError):  # another command's cache: finished, then refused as existing
        cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4, meta={"run": 2}, tokenizer_files=TOKENIZER)
    assert cf.open_cache(url).meta["run"] == 1
    url2 = str(tmp_path / "d")
    with armed(Fault(n=2, when="before")), pytest.raises(Killed):
        _create(url2)
    with pytest.raises(cf.UserError, match="tokenizer file tokenizer.json was written"):
        cf.create_cache(url2, d_model=8, layers=[1], chunk_tokens=4, tokenizer_files={"tokenizer.json": b"{}"})
    _create(url2)  # the command that began it still can
    _usable(url2)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("n", range(1, CREATE_WRITES + 1))
def test_sync_killed_while_creating_its_destination_is_finished_by_the_same_sync(tmp_path, make_cache, n, when):
    src, _ = make_cache(segments=(40, 25), tokenizer_files=TOKENIZER)
    dst = str(tmp_path / "dst")
    with armed(Fault(n=n, when=when)) as f, pytest.raises(Killed):
        sync(src, dst)
    assert f.fired
    if not os.path.exists(os.path.join(dst, "zarr.json")):
        assert not Location(dst).is_nonempty_dir()
    elif not (n == CREATE_WRITES and when == "after"):
        with pytest.raises(cf.CacheError, match="creation was interrupted"):
            cf.open_cache(dst)
    sync(src, dst)  # the same sync again
    a, b = cf.open_cache(src), cf.open_cache(dst)
    assert b.fingerprint == a.fingerprint and b.log.root == a.log.root and ops.verify(b)[1] == []


def test_a_kill_between_zarr_json_and_the_first_record_no_longer_strands_harvest_sync_info_verify(tmp_path, make_cache):
    """The issue's case: zarr.json landed, commits/0 did not. `sync` into it finishes it."""
    src, _ = make_cache(segments=(40,), tokenizer_files=TOKENIZER)
    dst = str(tmp_path / "dst")
    with armed(Fault(key="commits/0000000000.json", when="before")), pytest.raises(Killed):
        sync(src, dst)
    assert os.path.exists(os.path.join(dst, "zarr.json")) and not os.listdir(os.path.join(dst, "commits"))
    sync(src, dst)
    assert cf.open_cache(dst).fingerprint == cf.open_cache(src).fingerprint
