"""Running statistics merged across segments (cache_format/stats.py)."""

from __future__ import annotations

import numpy as np

import cache_format as cf


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
