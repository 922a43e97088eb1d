"""Synthetic caches for the train tests, written through the public cache_format API.

`write_planted` writes a cache that holds residuals built from a known overcomplete dictionary: each row is a
sparse non-negative combination of unit features drawn with Zipf-distributed frequencies,
plus a little Gaussian noise. A working trainer must recover the dictionary.
"""

from __future__ import annotations

import numpy as np


def planted_residuals(n: int, d: int, n_features: int, active: int, seed: int, noise: float = 0.01, zipf: float = 0.7):
    rng = np.random.default_rng(seed)
    dic = rng.standard_normal((n_features, d))
    dic /= np.linalg.norm(dic, axis=1, keepdims=True)
    freq = 1.0 / np.arange(1, n_features + 1) ** zipf
    freq /= freq.sum()
    # `active` distinct features per row, drawn by frequency (Gumbel top-k = sampling without replacement)
    keys = np.log(freq)[None, :] - np.log(-np.log(rng.random((n, n_features))))
    idx = np.argpartition(-keys, active, axis=1)[:, :active]
    mags = rng.uniform(0.5, 2.0, (n, active))
    x = np.einsum("na,nad->nd", mags, dic[idx]) + noise * rng.standard_normal((n, d))
    return x.astype(np.float32), dic, idx


def write_planted(
    url, *, layers=(2,), n=16384, d=32, n_features=96, active=3, seq_len=64, seed=0, chunk_tokens=512, roles=0
):
    """A corpus-like cache (all roles text unless `roles` says otherwise); returns the dictionary per layer."""
    import cache_format as cf
    from cache_format.layout import BF16

    w = cf.create_cache(
        url,
        d_model=d,
        layers=list(layers),
        chunk_tokens=chunk_tokens,
        shard_mib=1,
        meta={"model": {"name_or_path": "test/planted", "dtype": "float32"}},
    )
    dicts, res = {}, {}
    for i, L in enumerate(layers):
        x, dic, _ = planted_residuals(n, d, n_features, active, seed + 101 * i)
        res[L], dicts[L] = x.astype(BF16), dic
    seq = np.arange(n) // seq_len
    pos = np.arange(n) % seq_len
    role = np.full(n, roles, np.int8) if np.isscalar(roles) else np.asarray(roles, np.int8)
    half = n // 2  # two segments, as two harvest work units would write
    for a, b in ((0, half), (half, n)):
        with w.segment() as seg:
            seg.append(
                residuals={L: res[L][a:b] for L in layers},
                tokens=(np.arange(a, b) % 1000).astype(np.int32),
                seq_ids=seq[a:b].astype(np.int64),
                positions=pos[a:b].astype(np.int32),
                labels=np.full(b - a, -1, np.int8),
                roles=role[a:b],
            )
    return dicts, res
