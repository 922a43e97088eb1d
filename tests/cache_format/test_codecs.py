"""Codec names round-trip their data (cache_format/codecs.py)."""

from __future__ import annotations

import numpy as np

import cache_format as cf


def test_codecs_none_and_zstd_round_trip(make_cache):
    for codec in ("none", "zstd3", "blosc-lz4"):
        url, data = make_cache(codec=codec)
        c = cf.open_cache(url)
        assert np.array_equal(c.residuals(1).numpy().view(np.uint16), data["residuals"][1].view(np.uint16))
        assert np.array_equal(c.read_chunk(1, 1).view(np.uint16), data["residuals"][1][8:16].view(np.uint16))
