"""Row metadata: a real cache satisfies what the planner reads (bench_loader checks its own stand-in)."""

import numpy as np

import cache_format as cf
from cache_format.layout import BF16
from train.loader_plan import RowMetadata, cap_rows


def test_a_cache_is_row_metadata(tmp_path):
    w = cf.create_cache(str(tmp_path / "c"), d_model=4, layers=[0], chunk_tokens=8, shard_mib=1)
    n = 16
    with w.segment() as seg:
        seg.append(
            residuals={0: np.zeros((n, 4), BF16)},
            tokens=np.zeros(n, np.int32),
            seq_ids=np.arange(n, dtype=np.int64),
            positions=np.zeros(n, np.int32),
            labels=np.full(n, -1, np.int8),
            roles=np.zeros(n, np.int8),
        )
    assert isinstance(cf.open_cache(str(tmp_path / "c")), RowMetadata)


def test_cap_rows_keeps_exactly_max_rows_of_the_mask():
    mask = np.zeros(100, bool)
    mask[::2] = True
    cap_rows(mask, 10, seed=0)
    assert mask.sum() == 10 and not mask[1::2].any()
