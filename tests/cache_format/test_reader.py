"""Reading a cache: rows, sequences, meta, chunks and snapshots (cache_format/reader.py)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

import cache_format as cf
from cache_format.layout import BF16


def test_round_trip_rows_sequences_meta_and_chunks(make_cache):
    url, data = make_cache(segments=(40, 25, 3))
    c = cf.open_cache(url)
    assert c.d_model == 16 and c.layers == [1, 3] and c.hook == "resid_post" and c.n_tokens == 68
    assert c.meta["model"] == {"name_or_path": "test/model", "dtype": "float32"}
    assert c.meta["cache_format"]["format"]["version"] == 2 and "zarr" in c.meta["cache_format"]["packages"]
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
