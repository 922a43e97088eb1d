"""The loader's plan (train.loader_plan).

Row metadata: a real cache satisfies what the planner reads (bench_loader checks its own stand-in).

The window plan alone: pure in (seed, epoch, ranks), windows cover the eligible chunks once.
"""

import numpy as np

import cache_format as cf
from cache_format.layout import BF16
from train.loader_plan import RowMetadata, cap_rows, chunk_rows, cut_batches, epoch_windows, window_layout, window_perm


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


def test_epoch_windows_cover_every_eligible_chunk_once_and_are_deterministic():
    counts = np.array([10, 0, 7, 12, 3, 9, 0, 11])
    wins = epoch_windows(counts, seed=3, epoch=1, window_tokens=20)
    assert [w.tolist() for w in wins] == [w.tolist() for w in epoch_windows(counts, 3, 1, 20)]
    assert sorted(np.concatenate(wins).tolist()) == [0, 2, 3, 4, 5, 7]
    assert len(wins) == 3  # 52 eligible rows in windows of about 20
    shares = [epoch_windows(counts, 3, 1, 20, rank=r, world_size=2) for r in range(2)]
    assert sorted(np.concatenate([np.concatenate(s) for s in shares]).tolist()) == [0, 2, 3, 4, 5, 7]


def test_window_perm_differs_per_rank_and_window():
    a = window_perm(0, 0, 0, 50)
    assert sorted(a.tolist()) == list(range(50))
    assert not np.array_equal(a, window_perm(0, 0, 1, 50))
    assert not np.array_equal(window_perm(0, 0, 0, 50, 0, 2), window_perm(0, 0, 0, 50, 1, 2))


def test_chunk_rows_and_layout_of_dense_and_sparse_chunks():
    mask = np.zeros(24, bool)
    mask[0:8] = True  # chunk 0 whole
    mask[[9, 14]] = True  # chunk 1 sparse
    packed, bounds = np.packbits(mask), np.array([0, 8, 16, 24])
    assert chunk_rows(packed, bounds, 1).tolist() == [9, 14]
    plan, n, rows, pos = window_layout([1, 0], packed, bounds, chunk_buffer=np.array([8, 2, 0]))
    assert [(c, at, None if loc is None else loc.tolist()) for c, at, loc in plan] == [(1, 0, [1, 6]), (0, 2, None)]
    assert n == 10 and rows.tolist() == [9, 14, *range(8)] and pos.tolist() == list(range(10))


def test_cut_batches_spans_arrays_and_keeps_the_remainder_back():
    streams = [np.arange(0, 5), np.arange(5, 6), np.arange(6, 13)]
    assert [b.tolist() for b in cut_batches(streams, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
