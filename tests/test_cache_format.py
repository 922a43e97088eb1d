"""The cache's Python API on real zarr on disk."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
import zarr

import cache_format as cf
from cache_format.bf16 import BF16


def test_every_bf16_bit_pattern_round_trips(tmp_path):
    bits = np.arange(65536, dtype=np.uint16).reshape(-1, 64)  # NaNs, ±inf, -0.0, subnormals included
    w = cf.create_cache(tmp_path / "c", d_model=64, layers=[0], chunk_tokens=100, shard_mib=1)
    with w.segment() as seg:
        n = len(bits)
        seg.append(residuals={0: torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)},
                   tokens=np.zeros(n, np.int32), seq_ids=np.zeros(n, np.int64), positions=np.arange(n))
    with w.segment() as seg:  # the numpy ml_dtypes path too
        seg.append(residuals={0: bits.view(BF16)}, tokens=np.zeros(n, np.int32), seq_ids=np.ones(n, np.int64),
                   positions=np.arange(n))
    c = cf.open_cache(tmp_path / "c")
    t = c.residuals(0)[:]
    assert t.dtype == torch.bfloat16 and t.shape == (2 * n, 64)
    got = t.view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(got[:n], bits) and np.array_equal(got[n:], bits)
    a = c.residuals(0).numpy(n, 2 * n)
    assert a.dtype == ml_dtypes.bfloat16 and np.array_equal(a.view(np.uint16), bits)
    b = c.chunk_bounds()
    chunks = np.concatenate([c.read_chunk(0, i) for i in range(len(b) - 1)])
    assert np.array_equal(chunks.view(np.uint16)[:n], bits)


def test_round_trip_rows_sequences_meta_and_chunks(make_cache):
    url, data = make_cache(segments=(40, 25, 3))
    c = cf.open_cache(url)
    assert c.d_model == 16 and c.layers == [1, 3] and c.hook == "resid_post" and c.n_tokens == 68
    assert c.meta["model"] == {"name_or_path": "test/model", "dtype": "float32"}
    assert c.meta["cache_format"]["format"]["version"] == 2 and "zarr" in c.meta["cache_format"]["packages"]
    for L in c.layers:
        assert np.array_equal(c.residuals(L).numpy().view(np.uint16), data["residuals"][L].view(np.uint16))
        assert np.array_equal(c.residuals(L)[30:50].view(torch.int16).numpy(),
                              data["residuals"][L][30:50].view(np.int16))
    for k, v in data["rows"].items():
        assert np.array_equal(getattr(c, k)[:], v) and getattr(c, k)[:].dtype == v.dtype
        assert np.array_equal(getattr(c, k)[37:45], v[37:45])
    seqs = c.sequences()
    assert seqs.column_names[:2] == ["seq_id", "token_ids"] and seqs.to_pylist() == data["sequences"]
    b = c.chunk_bounds()
    assert b[0] == 0 and b[-1] == 68 and list(np.diff(b)) == [8] * 5 + [8] * 3 + [1] + [3]
    for i in range(len(b) - 1):
        for L in c.layers:
            assert np.array_equal(c.read_chunk(L, i).view(np.uint16), data["residuals"][L][b[i]:b[i + 1]].view(np.uint16))
    # decoding into a caller's buffer: full chunks in place, edge chunks (the 1- and 3-row ones) aside
    buf = np.full((b[-1] + 5, 16), 7, np.uint16)
    for i in range(len(b) - 1):
        got = c.read_chunk(3, i, out=buf[b[i]:b[i + 1]])
        assert got.dtype == ml_dtypes.bfloat16 and np.shares_memory(got, buf)
    assert np.array_equal(buf[:b[-1]], data["residuals"][3].view(np.uint16)) and (buf[b[-1]:] == 7).all()
    with pytest.raises(ValueError, match="C-contiguous"):
        c.read_chunk(3, 0, out=buf[:7])
    segs = c.segments
    assert [(s.row_start, s.n_rows, s.meta["unit"], s.layers) for s in segs] == [(0, 40, 0, [1, 3]), (40, 25, 1, [1, 3]),
                                                                                   (65, 3, 2, [1, 3])]


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
        "typesize": 2, "cname": "zstd", "clevel": 1, "shuffle": "shuffle", "blocksize": 1 << 20}


def test_stats_merge_across_segments(make_cache):
    url, data = make_cache(segments=(50, 30, 20))
    c = cf.open_cache(url)
    x = data["residuals"][3].astype(np.float64)
    s = c.stats(3)
    assert s["count"] == 100
    np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s["var"], x.var(0), rtol=1e-6)
    np.testing.assert_allclose(s["mean_norm"], np.linalg.norm(x, axis=1).mean(), rtol=1e-6)


def test_codecs_none_and_zstd_round_trip(make_cache):
    for codec in ("none", "zstd3", "blosc-lz4"):
        url, data = make_cache(codec=codec)
        c = cf.open_cache(url)
        assert np.array_equal(c.residuals(1).numpy().view(np.uint16), data["residuals"][1].view(np.uint16))
        assert np.array_equal(c.read_chunk(1, 1).view(np.uint16), data["residuals"][1][8:16].view(np.uint16))


def test_snapshot_and_refresh(make_cache):
    url, _ = make_cache(segments=(10,))
    c = cf.open_cache(url)
    fp = c.fingerprint
    w = cf.open_cache(url, mode="a")
    with w.segment() as seg:
        seg.append(residuals={1: np.ones((5, 16), BF16), 3: np.ones((5, 16), BF16)}, tokens=np.arange(5),
                   seq_ids=np.full(5, 99), positions=np.arange(5))
    assert c.n_tokens == 10 and c.fingerprint == fp
    c.refresh()
    assert c.n_tokens == 15 and c.fingerprint != fp
    assert np.array_equal(c.seq_ids[10:], np.full(5, 99))


def test_exception_abandons_segment(make_cache):
    url, _ = make_cache(segments=(10,))
    w = cf.open_cache(url, mode="a")
    with pytest.raises(RuntimeError):
        with w.segment() as seg:
            seg.append(residuals={1: np.ones((5, 16), BF16), 3: np.ones((5, 16), BF16)}, tokens=np.arange(5),
                       seq_ids=np.arange(5), positions=np.arange(5))
            raise RuntimeError("boom")
    assert cf.open_cache(url).n_tokens == 10


def test_fingerprints_are_content_derived(tmp_path):
    from conftest import write_cache

    write_cache(str(tmp_path / "a"), seed=1)
    write_cache(str(tmp_path / "b"), seed=1)
    write_cache(str(tmp_path / "c"), seed=2)
    a, b, c = (cf.open_cache(tmp_path / n) for n in "abc")
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.layer_fingerprint(1) == b.layer_fingerprint(1) != a.layer_fingerprint(3)


def test_add_layer_backfill(make_cache):
    url, data = make_cache(segments=(20, 12))
    w = cf.open_cache(url, mode="a")
    before = cf.open_cache(url)
    fp1 = before.layer_fingerprint(1)
    bf = w.add_layer(7)
    pend = bf.pending()
    assert [p.n_rows for p in pend] == [20, 12]
    new = (data["residuals"][1].astype(np.float32) * 5).astype(BF16)
    info = pend[0]
    rows = slice(info.row_start, info.row_start + info.n_rows)
    bad_tokens = data["rows"]["tokens"][rows].copy()
    bad_tokens[3] += 1
    with pytest.raises(cf.UserError, match="misaligned"):
        bf.write(info.id, residuals=new[rows], tokens=bad_tokens, seq_ids=data["rows"]["seq_ids"][rows],
                 positions=data["rows"]["positions"][rows])
    with pytest.raises(cf.UserError, match="got 10 rows"):
        bf.write(info.id, residuals=new[:10], tokens=data["rows"]["tokens"][:10],
                 seq_ids=data["rows"]["seq_ids"][:10], positions=data["rows"]["positions"][:10])
    bf.write(info.id, residuals=new[rows], tokens=data["rows"]["tokens"][rows],
             seq_ids=data["rows"]["seq_ids"][rows], positions=data["rows"]["positions"][rows])
    c = cf.open_cache(url)
    assert c.layers == [1, 3] and c.layer_coverage()[7] == 1
    with pytest.raises(cf.CacheError, match="backfill pending"):
        c.residuals(7)
    with pytest.raises(cf.UserError, match="missing \\[7\\]"):  # new segments must carry the new layer
        with w.segment() as seg:
            seg.append(residuals={1: new[:2], 3: new[:2]}, tokens=np.arange(2), seq_ids=np.arange(2),
                       positions=np.arange(2))
    (info,) = bf.pending()
    rows = slice(info.row_start, info.row_start + info.n_rows)
    bf.write(info.id, residuals=torch.from_numpy(new[rows].view(np.int16)).view(torch.bfloat16),
             tokens=data["rows"]["tokens"][rows], seq_ids=data["rows"]["seq_ids"][rows],
             positions=data["rows"]["positions"][rows])
    c.refresh()
    assert c.layers == [1, 3, 7] and bf.pending() == []
    assert np.array_equal(c.residuals(7).numpy().view(np.uint16), new.view(np.uint16))
    assert c.layer_fingerprint(1) == fp1 and c.fingerprint != before.fingerprint
    assert c.stats(7)["count"] == 32


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
