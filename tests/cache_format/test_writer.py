"""Writing: create, append, retract, deferred commits, killed and concurrent writers (cache_format/writer.py)."""

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
from support import plain_rows

import cache_format as cf
from cache_format import log, ops
from cache_format.layout import BF16
from cache_format.stores import Location

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


def test_retract_hides_segment_and_changes_fingerprint(make_cache):
    url, data = make_cache(segments=(10, 20, 30))
    c = cf.open_cache(url)
    w = cf.open_cache(url, mode="a")
    w.retract(c.segments[1].id, reason="bad prompts")
    c2 = cf.open_cache(url)
    assert c2.n_tokens == 40 and c2.fingerprint != c.fingerprint
    assert np.array_equal(c2.tokens[:], np.concatenate([data["rows"]["tokens"][:10], data["rows"]["tokens"][30:]]))
    assert c2.retracted == [c.segments[1].id]


def test_tokenizer_travels_with_the_cache(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    files = {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": b'{"model_max_length": 8}'}
    cf.create_cache(tmp_path / "c", d_model=4, layers=[0], tokenizer_files=files)
    c = cf.open_cache(tmp_path / "c")
    assert c.tokenizer_files == files
    assert c.tokenizer().encode("hello world").ids == [0, 1]


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
