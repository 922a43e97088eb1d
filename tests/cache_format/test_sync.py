"""`sync` between local, S3 and a faulty HTTP server keeps the fingerprint (cache_format/sync.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from support import FAULTS, everything, same_cache, write_cache

import cache_format as cf
from cache_format import log, ops
from cache_format.layout import BF16
from cache_format.stores import Location
from cache_format.sync import sync


def test_sync_local_s3_local_keeps_the_fingerprint(tmp_path, s3_bucket):
    url, opts = s3_bucket
    write_cache(str(tmp_path / "a"), segments=(30, 20, 9))
    src = cf.open_cache(tmp_path / "a")
    w = cf.open_cache(tmp_path / "a", mode="a")
    w.retract(src.segments[1].id)
    bf = w.add_layer(5)
    info = bf.pending()[0]
    s = slice(info.row_start, info.row_start + info.n_rows)
    src.refresh()
    bf.write(
        info.id,
        residuals=np.full((info.n_rows, 16), 2, BF16),
        tokens=src.tokens[s],
        seq_ids=src.seq_ids[s],
        positions=src.positions[s],
    )
    src.refresh()
    r = sync(str(tmp_path / "a"), f"{url}/c", None, opts)
    assert r["segments"] == 2 and r["layers"] == 0
    mid = cf.open_cache(f"{url}/c", storage_options=opts)
    assert mid.fingerprint == src.fingerprint and mid.layer_coverage()[5] == 1
    sync(f"{url}/c", str(tmp_path / "b"), opts, None)
    back = cf.open_cache(tmp_path / "b")
    assert back.fingerprint == src.fingerprint
    assert all(back.layer_fingerprint(L) == src.layer_fingerprint(L) for L in src.layers)
    assert np.array_equal(back.residuals(3).numpy().view(np.uint16), src.residuals(3).numpy().view(np.uint16))
    assert sync(str(tmp_path / "a"), f"{url}/c", None, opts)["segments"] == 0  # idempotent
    # A backfill that lands later in SRC travels as a layer commit.
    info = bf.pending()[0]
    s = slice(info.row_start, info.row_start + info.n_rows)
    bf.write(
        info.id,
        residuals=np.full((info.n_rows, 16), 3, BF16),
        tokens=src.tokens[s],
        seq_ids=src.seq_ids[s],
        positions=src.positions[s],
    )
    assert sync(str(tmp_path / "a"), f"{url}/c", None, opts)["layers"] == 1
    assert cf.open_cache(f"{url}/c", storage_options=opts).fingerprint == src.refresh().fingerprint
    assert 5 in src.layers


def test_sync_from_a_faulty_server_retries_and_copies_exactly(tmp_path, http_serve):
    url = str(tmp_path / "c")
    write_cache(url, segments=(40, 25), chunk_tokens=8, tokenizer_files={"tokenizer.json": b'{"x": 1}'})
    ops.publish(Location(url))
    base = http_serve(tmp_path, faults=FAULTS)
    dst = str(tmp_path / "copy")
    got = sync(f"{base}/c", dst)
    assert got["segments"] == 2 and http_serve.injected
    same_cache(everything(cf.open_cache(url)), everything(cf.open_cache(dst)))
    assert not [p for p in Location(dst).walk("segments") if p.key.endswith("/.lease")]  # released after each copy


def _files(url) -> dict:
    """Every file under a local cache with its size and modification time (to show nothing changed)."""
    out = {}
    for d, _, names in os.walk(url):
        for n in names:
            st = os.stat(os.path.join(d, n))
            out[os.path.relpath(os.path.join(d, n), url)] = (st.st_size, st.st_mtime_ns)
    return out


def _bits(c, layer):
    return c.residuals(layer).numpy().view(np.uint16)


def test_a_partial_copy_holds_the_chosen_layers_with_the_sources_fingerprints(tmp_path, run):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_cache(a, layers=(1, 3, 5), segments=(30, 20, 9), tokenizer_files={"tokenizer.json": b'{"x": 1}'})
    src = cf.open_cache(a)
    code, out, _ = run("sync", a, b, "--layers", "3", "--dry-run")
    assert code == 0 and "layer 3" in out and "layer 1" not in out and "nothing was copied" in out
    assert not os.path.exists(b)  # a dry run moves nothing
    plan = sync(a, b, layers=[3], dry_run=True)["plan"]
    layer3 = [{**s.layers[3]["objects"], "stats": s.layers[3]["stats"]} for s in src.log.segments]
    assert plan["3"] == {"objects": sum(map(len, layer3)), "bytes": sum(v["size"] for o in layer3 for v in o.values())}
    assert list(plan) == ["3", "rows", "tokenizer"]

    r = sync(a, b, layers=[3])
    assert r["bytes"] == sum(v["bytes"] for v in plan.values())  # what the dry run said is what moved
    c = cf.open_cache(b)
    assert c.layers == [3] and c.n_tokens == src.n_tokens
    assert np.array_equal(_bits(c, 3), _bits(src, 3))
    assert c.layer_fingerprint(3) == src.layer_fingerprint(3)
    for col in ("tokens", "seq_ids", "positions", "labels", "roles"):
        assert np.array_equal(getattr(c, col)[:], getattr(src, col)[:])
    assert c.sequences().equals(src.sequences()) and c.tokenizer_files == src.tokenizer_files
    assert np.array_equal(c.stats(3)["mean"], src.stats(3)["mean"])
    assert ops.verify(c)[1] == []
    assert c.copy_of == {"url": a, "root": log.root_digest(src.log.root), "layers": [3], "segments": None}
    assert c.log.root["copy_of"] == c.copy_of  # the root says so

    before = _files(b)
    code, out, _ = run("sync", a, b, "--layers", "5", "--dry-run")
    assert code == 0 and "layer 5" in out and _files(b) == before
    sync(a, b, layers=[5])  # a later sync adds a layer
    c = cf.open_cache(b)
    assert c.layers == [3, 5] and c.copy_of["layers"] == [3, 5]
    assert all(c.layer_fingerprint(L) == src.layer_fingerprint(L) for L in (3, 5))
    assert np.array_equal(_bits(c, 5), _bits(src, 5)) and ops.verify(c)[1] == []

    write_cache(a + "-more", layers=(1, 3, 5), segments=(7,), seed=4)  # SRC grows: a plain sync catches up
    w = cf.open_cache(a, mode="a")
    with w.segment() as seg:
        more = cf.open_cache(a + "-more")
        seg.append(
            residuals={L: more.residuals(L).numpy() for L in (1, 3, 5)},
            **{k: getattr(more, k)[:] + (1000 if k == "seq_ids" else 0) for k in ("tokens", "seq_ids", "positions")},
        )
    assert sync(a, b)["segments"] == 1
    c, src = cf.open_cache(b), src.refresh()
    assert c.layers == [3, 5] and c.n_tokens == src.n_tokens == 66
    assert all(c.layer_fingerprint(L) == src.layer_fingerprint(L) for L in (3, 5))


def test_a_segment_range_or_a_token_count_copies_those_segments_and_widens_later(tmp_path):
    a = str(tmp_path / "a")
    write_cache(a, layers=(1, 3), segments=(30, 20, 9))
    src = cf.open_cache(a)
    segs = src.log.segments
    sync(a, str(tmp_path / "b"), segments="1:3")
    c = cf.open_cache(tmp_path / "b")
    assert c.layers == [1, 3] and c.n_tokens == 29 and c.copy_of["segments"] == [s.id for s in segs[1:3]]
    assert np.array_equal(c.seq_ids[:], src.seq_ids[30:59]) and np.array_equal(_bits(c, 1), _bits(src, 1)[30:59])
    assert c.layer_fingerprint(1) == log.layer_fingerprint(src.log.root, segs[1:3], 1)  # SRC's, over those segments
    assert ops.verify(c)[1] == []
    sync(a, str(tmp_path / "b"), segments="0:1")  # widened to every segment: SRC's fingerprints
    c = cf.open_cache(tmp_path / "b")
    assert c.n_tokens == 59 and c.fingerprint == src.fingerprint and c.layer_fingerprint(3) == src.layer_fingerprint(3)
    sync(a, str(tmp_path / "t"), layers=[3], tokens=31)  # the first segments until 31 rows: 30 + 20
    t = cf.open_cache(tmp_path / "t")
    assert t.layers == [3] and t.n_tokens == 50 and [s.id for s in t.segments] == [s.id for s in segs[:2]]


def test_bad_partial_syncs_are_one_line_and_leave_dst_as_it_was(tmp_path, run):
    a, other = str(tmp_path / "a"), str(tmp_path / "o")
    write_cache(a, layers=(1, 3), segments=(30, 20))
    write_cache(other, layers=(1, 3), segments=(30, 20), seed=9)
    b, ob = str(tmp_path / "b"), str(tmp_path / "ob")
    sync(a, b, layers=[1])
    sync(other, ob, layers=[1])
    before = {u: _files(u) for u in (b, ob, other)}
    cases = [
        (["sync", a, b, "--layers", "7"], "layer 7 is not in"),
        (["sync", a, b, "--segments", "1:5"], "outside"),
        (["sync", a, b, "--segments", "2:1"], "outside"),
        (["sync", a, b, "--segments", "x"], "expected A:B"),
        (["sync", a, b, "--tokens", "1000"], "holds 50 rows"),
        (["sync", a, ob, "--layers", "3"], "is a partial copy of"),  # DST is a copy of another cache
        (["sync", a, ob], "is a partial copy of"),
        (["sync", a, other, "--layers", "1"], "not a partial copy"),  # DST holds another cache
        (["sync", a, str(tmp_path / "new"), "--layers", "9"], "layer 9 is not in"),
    ]
    for args, phrase in cases:
        code, out, err = run(*args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], (args, err)
    assert {u: _files(u) for u in (b, ob, other)} == before and not os.path.exists(tmp_path / "new")


def test_a_copy_record_of_the_wrong_shape_is_refused_in_one_line(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_cache(a, layers=(1, 3), segments=(30, 20))
    sync(a, b, layers=[1])
    log.commit(Location(b), {"kind": "copy", "layers": [1], "segments": ["../../elsewhere"]})
    with pytest.raises(cf.CacheError, match=r"is refused: segment '\.\./\.\./elsewhere'") as e:
        cf.open_cache(b)
    assert "\n" not in str(e.value)
