"""Reading a cache (cache_format/read.py, integrity.py, stats.py): rows, sequences, meta, chunks and
snapshots; the tokenizer travels with the cache; every read is checked (chunk digests, shard-index
CRC32C, small objects) and a chunk index that contradicts the commit is refused; statistics merged
across segments."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
import torch
from support import flip, shard_path, write_cache

import cache_format as cf
from cache_format import integrity, ops
from cache_format.layout import BF16
from cache_format.stores import Location


def test_round_trip_rows_sequences_meta_and_chunks(make_cache):
    url, data = make_cache(segments=(40, 25, 3))
    c = cf.open_cache(url)
    assert c.d_model == 16 and c.layers == [1, 3] and c.hook == "resid_post" and c.n_tokens == 68
    assert c.meta["model"] == {"name_or_path": "test/model", "dtype": "float32"}
    assert c.meta["cache_format"]["format"]["version"] == 3 and "zarr" in c.meta["cache_format"]["packages"]
    for L in c.layers:
        assert np.array_equal(c.residuals(L).numpy().view(np.uint16), data["residuals"][L].view(np.uint16))
        assert np.array_equal(
            c.residuals(L)[30:50].view(torch.int16).numpy(), data["residuals"][L][30:50].view(np.int16)
        )
    for k, v in data["rows"].items():
        assert np.array_equal(getattr(c, k)[:], v) and getattr(c, k)[:].dtype == v.dtype
        assert np.array_equal(getattr(c, k)[37:45], v[37:45])
    seqs = c.sequences()
    assert seqs.column_names[:2] == ["seq_id", "token_ids"] and seqs.to_pylist() == data["sequences"]
    b = c.chunk_bounds()
    assert b[0] == 0 and b[-1] == 68 and list(np.diff(b)) == [8] * 5 + [8] * 3 + [1] + [3]
    for i in range(len(b) - 1):
        for L in c.layers:
            assert np.array_equal(
                c.read_chunk(L, i).view(np.uint16), data["residuals"][L][b[i] : b[i + 1]].view(np.uint16)
            )
    # decoding into a caller's buffer: full chunks in place, edge chunks (the 1- and 3-row ones) aside
    buf = np.full((b[-1] + 5, 16), 7, np.uint16)
    for i in range(len(b) - 1):
        got = c.read_chunk(3, i, out=buf[b[i] : b[i + 1]])
        assert got.dtype == ml_dtypes.bfloat16 and np.shares_memory(got, buf)
    assert np.array_equal(buf[: b[-1]], data["residuals"][3].view(np.uint16)) and (buf[b[-1] :] == 7).all()
    with pytest.raises(ValueError, match="C-contiguous"):
        c.read_chunk(3, 0, out=buf[:7])
    segs = c.segments
    assert [(s.row_start, s.n_rows, s.meta["unit"], s.layers) for s in segs] == [
        (0, 40, 0, [1, 3]),
        (40, 25, 1, [1, 3]),
        (65, 3, 2, [1, 3]),
    ]


def test_snapshot_and_refresh(make_cache):
    url, _ = make_cache(segments=(10,))
    c = cf.open_cache(url)
    fp = c.fingerprint
    w = cf.open_cache(url, mode="a")
    with w.segment() as seg:
        seg.append(
            residuals={1: np.ones((5, 16), BF16), 3: np.ones((5, 16), BF16)},
            tokens=np.arange(5),
            seq_ids=np.full(5, 99),
            positions=np.arange(5),
        )
    assert c.n_tokens == 10 and c.fingerprint == fp
    c.refresh()
    assert c.n_tokens == 15 and c.fingerprint != fp
    assert np.array_equal(c.seq_ids[10:], np.full(5, 99))


def test_tokenizer_travels_with_the_cache(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    files = {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": b'{"model_max_length": 8}'}
    cf.create_cache(tmp_path / "c", d_model=4, layers=[0], tokenizer_files=files)
    c = cf.open_cache(tmp_path / "c")
    assert c.tokenizer_files == files
    assert c.tokenizer().encode("hello world").ids == [0, 1]


def test_an_index_that_marks_a_written_chunk_absent_is_refused_not_read_as_zeros(make_cache):
    import google_crc32c

    url, data = make_cache(segments=(40, 25), chunk_tokens=8)
    c = cf.open_cache(url)
    obj = c.log.segments[0].layers[1]["objects"]["c/0/0"]
    m = len(obj["chunks"])
    path = shard_path(url, c)
    raw = bytearray(open(path, "rb").read())
    tail = len(raw) - (16 * m + 4)
    raw[tail + 16 : tail + 32] = b"\xff" * 16  # inner chunk 1: "absent", with a valid CRC32C over the edit
    raw[-4:] = google_crc32c.value(bytes(raw[tail : tail + 16 * m])).to_bytes(4, "little")
    open(path, "wb").write(bytes(raw))
    fresh = cf.open_cache(url)
    with pytest.raises(integrity.IntegrityError, match="marks inner chunk 1 absent"):
        fresh.residuals(1)[8:16]
    import torch

    got = fresh.residuals(1)[0:8].view(torch.int16).numpy()
    assert np.array_equal(got, data["residuals"][1][0:8].view(np.int16))  # the other chunks still read


def test_every_chunk_has_a_digest_and_a_flip_anywhere_in_a_shard_is_caught(make_cache):
    url, data = make_cache(segments=(40, 25), chunk_tokens=8)
    c = cf.open_cache(url)
    obj = c.log.segments[0].layers[1]["objects"]["c/0/0"]
    assert len(obj["chunks"]) == 5 and all(isinstance(d, str) and len(d) == 16 for d in obj["chunks"])
    path, size = shard_path(url, c), obj["size"]
    caught = 0
    for off in np.linspace(0, size - 1, 12).astype(int):  # chunk bytes and the index alike
        flip(path, int(off))
        fresh = cf.open_cache(url)
        with pytest.raises(integrity.IntegrityError, match="c/0/0.*corrupt"):
            for i in range(5):
                fresh.read_chunk(1, i)
        caught += 1
        flip(path, int(off))  # restore
    assert caught == 12
    assert np.array_equal(cf.open_cache(url).residuals(1).numpy(), data["residuals"][1])


def test_flips_in_rows_stats_sequences_and_array_metadata_are_caught(make_cache, run):
    url, _ = make_cache(segments=(40,), chunk_tokens=8)
    c = cf.open_cache(url)
    s = c.log.segments[0]
    rows = s.record["rows"]["path"]
    cases = [
        (os.path.join(url, rows, "tokens", "c", "0"), lambda c: c.tokens[:]),
        (os.path.join(url, s.layers[3]["stats"]["path"]), lambda c: c.stats(3)),
        (os.path.join(url, s.record["sequences"]["path"]), lambda c: c.sequences()),
        (os.path.join(url, s.layers[1]["array"], "zarr.json"), lambda c: c.residuals(1)[0:3]),
    ]
    for path, read in cases:
        flip(path, 10)
        with pytest.raises(integrity.IntegrityError, match="corrupt"):
            read(cf.open_cache(url))
        code, out, err = run("verify", url)
        assert code == 2 and "checksum mismatch" in out and err.startswith("error: verify: 1 of")
        flip(path, 10)
    assert run("verify", url)[0] == 0


def test_a_byte_flipped_on_the_server_fails_in_one_line_after_one_re_read(tmp_path, http_serve):
    url = str(tmp_path / "c")
    write_cache(url, segments=(40,), chunk_tokens=8)
    ops.publish(Location(url))
    c = cf.open_cache(url)
    e = c.log.segments[0].layers[3]
    path = os.path.join(url, e["array"], "c", "0", "0")
    raw = bytearray(open(path, "rb").read())
    raw[20] ^= 1
    open(path, "wb").write(bytes(raw))
    remote = cf.open_cache(f"{http_serve(tmp_path)}/c")
    with pytest.raises(integrity.IntegrityError) as err:
        remote.residuals(3)[:]
    assert f"{e['array']}/c/0/0: inner chunk 0 does not match its digest after re-reading it" in str(err.value)
    assert "\n" not in str(err.value)


def test_stats_merge_across_segments(make_cache):
    url, data = make_cache(segments=(50, 30, 20))
    c = cf.open_cache(url)
    x = data["residuals"][3].astype(np.float64)
    s = c.stats(3)
    assert s["count"] == 100
    np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s["var"], x.var(0), rtol=1e-6)
    np.testing.assert_allclose(s["mean_norm"], np.linalg.norm(x, axis=1).mean(), rtol=1e-6)


def _moments(x):
    mean = x.mean(0)
    return len(x), mean, ((x - mean) ** 2).sum(0)


def test_merge_moments_is_one_chan_merge_for_numpy_torch_and_floats():
    import torch

    from cache_format.stats import merge_moments

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 5)) * 3 + 7
    a, b = x[:120], x[120:]
    n, mean, m2 = merge_moments(*_moments(a), *_moments(b))
    want = _moments(x)
    assert n == 300
    np.testing.assert_allclose(mean, want[1], rtol=1e-12)
    np.testing.assert_allclose(m2, want[2], rtol=1e-12)
    tn, tmean, tm2 = merge_moments(*_moments(torch.from_numpy(a)), *_moments(torch.from_numpy(b)))
    assert tn == 300 and isinstance(tmean, torch.Tensor)
    np.testing.assert_allclose(tmean.numpy(), want[1], rtol=1e-12)
    np.testing.assert_allclose(tm2.numpy(), want[2], rtol=1e-12)
    fa, fb = _moments(a[:, 0]), _moments(b[:, 0])  # floats: one dimension
    fn, fmean, fm2 = merge_moments(fa[0], float(fa[1]), float(fa[2]), fb[0], float(fb[1]), float(fb[2]))
    assert fn == 300 and abs(fmean - want[1][0]) < 1e-12 and abs(fm2 - want[2][0]) < 1e-9
    nb, mb, m2b = _moments(b)
    assert merge_moments(0, np.zeros(5), np.zeros(5), nb, mb, m2b) == (nb, mb, m2b)  # an empty side: the other
    assert merge_moments(nb, mb, m2b, 0, np.zeros(5), np.zeros(5)) == (nb, mb, m2b)
