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
