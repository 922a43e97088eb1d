"""A failed `with` block abandons what it wrote (cache_format/commit_unit.py)."""

from __future__ import annotations

import numpy as np
import pytest

import cache_format as cf
from cache_format.layout import BF16


def test_exception_abandons_segment(make_cache):
    url, _ = make_cache(segments=(10,))
    w = cf.open_cache(url, mode="a")
    with pytest.raises(RuntimeError):
        with w.segment() as seg:
            seg.append(
                residuals={1: np.ones((5, 16), BF16), 3: np.ones((5, 16), BF16)},
                tokens=np.arange(5),
                seq_ids=np.arange(5),
                positions=np.arange(5),
            )
            raise RuntimeError("boom")
    assert cf.open_cache(url).n_tokens == 10
