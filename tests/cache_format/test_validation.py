"""What a writer refuses before writing (cache_format/validation.py)."""

from __future__ import annotations

import numpy as np
import pytest

import cache_format as cf
from cache_format.layout import BF16


def test_duplicate_rows_in_a_segment_are_refused(tmp_path):
    w = cf.create_cache(tmp_path / "c", d_model=8, layers=[1], chunk_tokens=4)
    with pytest.raises(cf.UserError, match=r"\(seq_id 5, position 0\) was appended twice"):
        with w.segment() as seg:
            seg.append(
                {1: np.ones((2, 8), BF16)},
                tokens=np.arange(2),
                seq_ids=np.array([5, 6]),
                positions=np.zeros(2, np.int32),
            )
            seg.append(
                {1: np.ones((1, 8), BF16)}, tokens=np.arange(1), seq_ids=np.array([5]), positions=np.zeros(1, np.int32)
            )
    assert w.snapshot().n_tokens == 0
    # seq ids that differ only above bit 32 are distinct rows, not duplicates
    with w.segment() as seg:
        seg.append(
            {1: np.ones((2, 8), BF16)},
            tokens=np.arange(2),
            seq_ids=np.array([7, 7 + (1 << 32)]),
            positions=np.zeros(2, np.int32),
        )
    assert w.snapshot().n_tokens == 2
