"""Crash safety and lock-free concurrent writers, with real processes."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import cache_format as cf
from cache_format import ops
from cache_format.stores import Location

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A writer that appends segments forever; segment i of writer w holds rows whose token id
# encodes (w, i, row), so a reader can check every row's identity and order.
WRITER = textwrap.dedent("""
    import sys, numpy as np
    import cache_format as cf
    from cache_format.bf16 import BF16
    url, wid, n_segs, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    w = cf.open_cache(url, mode="a")
    i = 0
    while n_segs < 0 or i < n_segs:
        with w.segment(meta={"writer": wid, "i": i}) as seg:
            for part in range(3):
                n = rows // 3
                tok = wid * 10**6 + i * 10**3 + part * n + np.arange(n)
                x = (np.random.default_rng(tok[0]).standard_normal((n, 32))).astype(BF16)
                seg.append(residuals={2: x}, tokens=tok, seq_ids=np.full(n, wid * 1000 + i), positions=part * n + np.arange(n))
                if n_segs == -2 and i == 1 and part == 2:  # hang mid-segment, shards already flushed
                    print("hang", flush=True)
                    import time; time.sleep(600)
            print("committing", i, flush=True)
        print("committed", i, flush=True)
        i += 1
""")


def _spawn(url, wid, n_segs, rows):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-c", WRITER, str(url), str(wid), str(n_segs), str(rows)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _expected_tokens(wid, i, rows):
    n = rows // 3
    return np.concatenate([wid * 10**6 + i * 10**3 + p * n + np.arange(n) for p in range(3)])


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
    assert np.array_equal(c.tokens[:], np.concatenate([_expected_tokens(1, i, 2400) for i in range(len(segs))]
                                                      or [np.zeros(0, np.int32)]))
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
    committed = set(ops.segment_objects(c._segs[0]) if segs else {})
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
        assert np.array_equal(now[:len(prev)], prev)
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
            assert np.array_equal(tok[s.row_start:s.row_start + s.n_rows], _expected_tokens(w, s.meta["i"], rows))
            x = c.residuals(2).numpy(s.row_start, s.row_start + 100)
            first = _expected_tokens(w, s.meta["i"], rows)[0]
            assert np.array_equal(x, np.random.default_rng(first).standard_normal((100, 32)).astype(x.dtype))
    assert ops.verify(c)[1] == []
