"""bf16 in and out of a cache, bit for bit (cache_format/bf16.py)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

import cache_format as cf
from cache_format.layout import BF16


def test_every_bf16_bit_pattern_round_trips(tmp_path):
    bits = np.arange(65536, dtype=np.uint16).reshape(-1, 64)  # NaNs, ±inf, -0.0, subnormals included
    w = cf.create_cache(tmp_path / "c", d_model=64, layers=[0], chunk_tokens=100, shard_mib=1)
    with w.segment() as seg:
        n = len(bits)
        seg.append(
            residuals={0: torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)},
            tokens=np.zeros(n, np.int32),
            seq_ids=np.zeros(n, np.int64),
            positions=np.arange(n),
        )
    with w.segment() as seg:  # the numpy ml_dtypes path too
        seg.append(
            residuals={0: bits.view(BF16)},
            tokens=np.zeros(n, np.int32),
            seq_ids=np.ones(n, np.int64),
            positions=np.arange(n),
        )
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
