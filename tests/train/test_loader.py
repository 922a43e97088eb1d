"""The shuffled loader on real caches: determinism, exact O(1) resume, filters, mixing, epochs.

The loader's memory: recycled batch arrays come back only once every view of them is gone.
"""

import gc
import os
import random
import time

import numpy as np
import pytest
import torch

import cache_format as cf
from cache_format.errors import UserError
from cache_format.layout import BF16
from cache_format.split import is_heldout
from train.loader import BatchBuilder, Recycler, ShuffledLoader, window_array


def write_rows(url, n=3000, d=8, seq_len=50, chunk_tokens=64, layers=(0, 2), roles=None, seed=0):
    rng = np.random.default_rng(seed)
    w = cf.create_cache(url, d_model=d, layers=list(layers), chunk_tokens=chunk_tokens, shard_mib=1)
    res = {L: rng.standard_normal((n, d)).astype(BF16) for L in layers}
    seq = np.arange(n) // seq_len
    with w.segment() as seg:
        seg.append(
            residuals=res,
            tokens=(np.arange(n) % 97).astype(np.int32),
            seq_ids=seq.astype(np.int64),
            positions=(np.arange(n) % seq_len).astype(np.int32),
            labels=np.full(n, -1, np.int8),
            roles=np.zeros(n, np.int8) if roles is None else roles.astype(np.int8),
        )
    return cf.open_cache(url), res


class SlowCache:
    """The same cache, with chunk reads finishing in a random order (thread timing varies)."""

    def __init__(self, cache, seed):
        self._c, self._rng = cache, random.Random(seed)

    def __getattr__(self, name):
        return getattr(self._c, name)

    def read_chunk(self, layer, i, out=None):
        time.sleep(self._rng.random() * 0.004)
        return self._c.read_chunk(layer, i, out=out)


@pytest.fixture
def cache(tmp_path):
    return write_rows(str(tmp_path / "c"))


def rows_of(loader, n):
    return [b.rows.copy() for _, b in zip(range(n), loader)]


def test_batches_hold_the_rows_they_name_for_every_layer(cache):
    c, res = cache
    with ShuffledLoader(c, [0, 2], 128, seed=3, heldout_fraction=0.1, window_tokens=256, threads=3) as ld:
        for _, b in zip(range(12), ld):
            assert b.residuals[0].dtype == torch.float32 and b.residuals[0].shape == (128, 8)
            for L in (0, 2):
                assert np.array_equal(b.residuals[L].numpy(), res[L][b.rows].astype(np.float32))


def test_deterministic_whatever_the_thread_timing(cache):
    c, _ = cache
    kw = dict(seed=7, heldout_fraction=0.1, window_tokens=200, max_epochs=2)
    a = rows_of(ShuffledLoader(c, [0, 2], 100, threads=1, **kw), 1000)
    b = rows_of(ShuffledLoader(SlowCache(c, 1), [0, 2], 100, threads=6, prefetch=1, **kw), 1000)
    d = rows_of(ShuffledLoader(SlowCache(c, 2), [0, 2], 100, threads=3, prefetch=4, **kw), 1000)
    assert len(a) == len(b) == len(d) > 40
    assert all(np.array_equal(x, y) and np.array_equal(x, z) for x, y, z in zip(a, b, d))
    plan = list(ShuffledLoader(c, [0, 2], 100, **kw).planned_rows(len(a)))  # metadata alone gives the same
    assert all(np.array_equal(x, p) for x, p in zip(a, plan))
    other = rows_of(ShuffledLoader(c, [0, 2], 100, threads=1, **dict(kw, seed=8)), 5)
    assert not np.array_equal(a[0], other[0])


def test_exact_resume_in_constant_time(cache, capsys):
    c, _ = cache
    kw = dict(seed=1, heldout_fraction=0.1, window_tokens=300, threads=2)
    ref = ShuffledLoader(c, [0], 96, **kw)
    full = rows_of(ref, 120)  # past several epochs (2700 train rows / 96 per batch)
    states = {}
    ld = ShuffledLoader(c, [0], 96, **kw)
    for i, b in zip(range(100), ld):
        states[i + 1] = b.state
    ld.close()
    for at in (1, 37, 99):
        fresh = ShuffledLoader(c, [0], 96, **kw)
        reads = []
        orig = c.read_chunk
        c.read_chunk = lambda L, i, out=None, _o=orig: (reads.append(i), _o(L, i, out=out))[1]
        fresh.load_state_dict(states[at])
        got = rows_of(fresh, 120 - at)
        c.read_chunk = orig
        assert all(np.array_equal(x, y) for x, y in zip(got, full[at:]))
        first_window = len(fresh.windows(states[at]["epoch"])[states[at]["window"]])
        assert len(reads) <= 3 * first_window + 2 * (120 - at) * 96 // 64 + 10  # no replay of consumed data
    assert "epoch 2 begins" in capsys.readouterr().err


def test_each_epoch_visits_every_train_row_once_and_split_is_by_sequence(cache):
    c, _ = cache
    ld = ShuffledLoader(
        c,
        [0],
        50,
        seed=2,
        heldout_fraction=0.2,
        split_seed=5,
        window_tokens=128,
        max_epochs=1,
        drop_last=False,
        announce=False,
    )
    rows = np.concatenate([b.rows for b in ld])
    seq = np.asarray(c.seq_ids[:])
    expect = np.flatnonzero(~is_heldout(seq, 5, 0.2))
    assert np.array_equal(np.sort(rows), expect)
    held = ShuffledLoader(
        c, [0], 50, split="heldout", heldout_fraction=0.2, split_seed=5, max_epochs=1, drop_last=False
    )
    hrows = np.concatenate([b.rows for b in held])
    assert set(seq[hrows]).isdisjoint(set(seq[rows]))
    assert len(hrows) + len(rows) == c.n_tokens


def test_mixing_matches_a_perfect_shuffle_of_the_window(tmp_path):
    # rows stored sequence by sequence (60 sequences of 50): every chunk holds one sequence
    c, _ = write_rows(str(tmp_path / "m"), n=3000, seq_len=50, chunk_tokens=50)
    seq = np.asarray(c.seq_ids[:])
    rng = np.random.default_rng(0)

    def distinct(window):
        ld = ShuffledLoader(c, [0], 64, seed=0, heldout_fraction=0.0, window_tokens=window, announce=False)
        return np.mean([len(np.unique(seq[b.rows])) for _, b in zip(range(60), ld)])

    def ideal(n_seq):  # 64 rows drawn at random from n_seq equal sequences
        return np.mean([len(np.unique(rng.choice(n_seq * 50, 64, replace=False) // 50)) for _ in range(400)])

    assert len(np.unique(seq[:64])) == 2  # what reading in order would give
    assert distinct(3000) > 0.95 * ideal(60)  # the window holds everything: a perfect shuffle
    assert distinct(1500) > 0.95 * ideal(30)  # 30 sequences per window


def test_filters_roles_position0_norm_outliers_and_cap(tmp_path):
    n = 2000
    roles = np.tile(np.array([1, 1, 2, 2, 2, 3, 3, 3, 3, 3]), n // 10)
    c, res = write_rows(str(tmp_path / "f"), n=n, roles=roles, seq_len=40)
    ld = ShuffledLoader(c, [0], 100, heldout_fraction=0.0, max_epochs=1, drop_last=False)  # auto: rollout
    got = np.concatenate([b.rows for b in ld])
    assert set(roles[got]) == {2, 3} and len(got) == int((roles >= 2).sum())
    ld = ShuffledLoader(
        c, [0], 100, heldout_fraction=0.0, roles=["prompt"], exclude_position0=True, max_epochs=1, drop_last=False
    )
    got = np.concatenate([b.rows for b in ld])
    assert set(roles[got]) == {1} and not np.any(np.asarray(c.positions[:])[got] == 0)
    ld = ShuffledLoader(c, [0], 100, heldout_fraction=0.0, roles=None, max_rows=700, max_epochs=1, drop_last=False)
    got = np.concatenate([b.rows for b in ld])
    assert len(got) == len(np.unique(got)) == 700 and got.max() > 1500  # a random sample, not a prefix


def test_norm_outliers_are_dropped(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 1000, 8
    url = str(tmp_path / "o")
    w = cf.create_cache(url, d_model=d, layers=[1], chunk_tokens=100, shard_mib=1)
    x = rng.standard_normal((n, d))
    sinks = np.arange(0, n, 50)
    x[sinks] *= 100  # attention-sink-like rows
    with w.segment() as seg:
        seg.append(
            residuals={1: x.astype(BF16)},
            tokens=np.zeros(n, np.int32),
            seq_ids=np.arange(n) // 50,
            positions=np.arange(n) % 50,
            labels=np.full(n, -1, np.int8),
            roles=np.zeros(n, np.int8),
        )
    c = cf.open_cache(url)
    ld = ShuffledLoader(c, [1], 50, heldout_fraction=0.0, norm_outlier=5.0, max_epochs=1, drop_last=False)
    got = np.concatenate([b.rows for b in ld])
    assert set(got) == set(range(n)) - set(sinks)


def test_user_errors(cache):
    c, _ = cache
    with pytest.raises(UserError, match="not in the cache"):
        ShuffledLoader(c, [5], 10)
    with pytest.raises(UserError, match="larger than"):
        ShuffledLoader(c, [0], 10_000, heldout_fraction=0.1)
    with pytest.raises(UserError, match="no rows"):
        ShuffledLoader(c, [0], 10, roles=["thinking"])
    with pytest.raises(UserError, match="multiple"):
        ShuffledLoader(c, [0], 10, world_size=3)


class CountingCache(SlowCache):
    """The same cache, recording which chunks are decoded."""

    def __init__(self, cache):
        super().__init__(cache, 0)
        self.decoded = []

    def read_chunk(self, layer, i, out=None):
        self.decoded.append(i)
        return self._c.read_chunk(layer, i, out=out)


def test_ranks_divide_the_chunks_and_together_visit_the_split_once(cache):
    c, _ = cache
    kw = dict(seed=4, heldout_fraction=0.1, window_tokens=256, max_epochs=1, announce=False)
    one = CountingCache(c)
    single = ShuffledLoader(one, [0], 64, **kw)
    list(single)
    train_rows = np.flatnonzero(np.unpackbits(single.mask)[: c.n_tokens])
    ranks = [CountingCache(c), CountingCache(c)]
    per_rank = [
        [b.rows.copy() for b in ShuffledLoader(rc, [0], 64, rank=r, world_size=2, **kw)] for r, rc in enumerate(ranks)
    ]
    assert all(len(x) == 32 for rows in per_rank for x in rows)  # batch_size is global
    # each rank decodes only its own chunks: between them, every chunk once, as one process does
    assert not set(ranks[0].decoded) & set(ranks[1].decoded)
    assert sorted(ranks[0].decoded + ranks[1].decoded) == sorted(one.decoded)
    got = np.concatenate([np.concatenate(rows) for rows in per_rank])
    assert len(np.unique(got)) == len(got)  # no row twice in the epoch, across ranks
    assert set(got) <= set(train_rows) and len(got) > len(train_rows) - 2 * 32  # but each rank's last partial batch
    # a global batch (both ranks' slices of one step) draws from the whole window, as one process's does
    seq = np.asarray(c.seq_ids[:])
    distinct = [len(np.unique(seq[np.concatenate([a, b])])) for a, b in zip(*per_rank)]
    alone = [len(np.unique(seq[b])) for b in ShuffledLoader(c, [0], 64, **kw).planned_rows(len(distinct))]
    assert np.mean(distinct) >= 0.9 * np.mean(alone)


def test_rank_states_resume_exactly_and_refuse_another_world_size(cache):
    c, _ = cache
    kw = dict(seed=6, heldout_fraction=0.1, window_tokens=256, announce=False, world_size=2)
    ref = [rows_of(ShuffledLoader(c, [0], 64, rank=r, **kw), 30) for r in range(2)]
    states = []
    for r in range(2):
        ld = ShuffledLoader(c, [0], 64, rank=r, **kw)
        states.append([b.state for _, b in zip(range(17), ld)][-1])
        ld.close()
    for r in range(2):
        fresh = ShuffledLoader(c, [0], 64, rank=r, **kw)
        fresh.load_state_dict({"ranks": states})
        assert all(np.array_equal(x, y) for x, y in zip(rows_of(fresh, 13), ref[r][17:]))
    with pytest.raises(UserError, match="written by 2 ranks"):
        ShuffledLoader(c, [0], 64, seed=6, heldout_fraction=0.1).load_state_dict({"ranks": states})
    with pytest.raises(UserError, match="fewer than the 64 ranks"):
        ShuffledLoader(c, [0], 64, world_size=64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batches_own_their_rows_and_two_buffers_per_layer_are_reused(cache, dtype):
    # windows decode into two reused buffers per layer and batches are gathered out of them, so
    # batches a consumer keeps stay intact while the buffers are overwritten by later windows
    c, res = cache
    kw = dict(seed=5, heldout_fraction=0.0, window_tokens=300, max_epochs=3, dtype=dtype, announce=False)
    ld = ShuffledLoader(c, [0, 2], 100, **kw)
    held = []
    for b in ld:
        held.append(b)
    assert len(held) == 90 and held[0].residuals[0].dtype == dtype
    for b in held:
        for L in (0, 2):
            assert np.array_equal(b.residuals[L].float().numpy(), res[L][b.rows].astype(np.float32))
    assert len(ld.windows(0)) * 3 * 2 > 50  # 54 windows x layers were served ...
    # ... from two buffers per layer, grown at most once per epoch
    assert ld.memory()["window_buffer_allocations"] <= 2 * 2 + 2 * 3


def test_sparse_chunks_are_compacted_and_partial_chunks_decode_right(tmp_path):
    # the held-out split keeps ~10% of each chunk: compacted rather than decoded whole; the
    # cache's last chunk is partial (3000 = 46 x 64 + 56 rows) and decodes aside
    c, res = write_rows(str(tmp_path / "s"), n=3000, seq_len=5, chunk_tokens=64)
    ld = ShuffledLoader(
        c,
        [0, 2],
        64,
        split="heldout",
        heldout_fraction=0.1,
        window_tokens=128,
        max_epochs=1,
        drop_last=False,
        announce=False,
    )
    eligible = [len(ld.window_rows(0, w)) for w in range(len(ld.windows(0)))]
    assert ld.buffer_rows(0) == max(eligible)  # compacted: a buffer holds only the eligible rows
    got = list(ld)
    for b in got:
        for L in (0, 2):
            assert np.array_equal(b.residuals[L].numpy(), res[L][b.rows].astype(np.float32))
    assert sorted(np.concatenate([b.rows for b in got])) == list(
        np.flatnonzero(is_heldout(np.arange(3000) // 5, 0, 0.1))
    )
    train = ShuffledLoader(
        c, [0], 64, heldout_fraction=0.1, window_tokens=3000, max_epochs=1, drop_last=False, announce=False
    )
    assert len(train.windows(0)) == 1 and len(train.window_rows(0, 0)) < 3000
    assert train.buffer_rows(0) == 3000  # dense: every chunk decoded whole, in place
    rows = np.concatenate([b.rows for b in train])
    assert rows.max() >= 2944 and len(rows) == 3000 - len(np.concatenate([b.rows for b in got]))


def test_decode_threads_default_to_this_ranks_cores_less_one(cache, monkeypatch):
    from train.loader import auto_threads

    c, _ = cache
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert ShuffledLoader(c, [0], 64).threads == auto_threads() == max(1, min(16, cores - 1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))  # many ranks on this host: one thread each
    assert auto_threads() == 1
    assert ShuffledLoader(c, [0], 64, threads=3).threads == 3


def test_recycler_lends_an_array_again_only_when_its_views_are_gone():
    r = Recycler(keep=2)
    a = r.lend((4, 3), np.uint16)
    assert r.lend((4, 3), np.uint16).base is not a.base  # still viewed: a fresh one
    base = a.base
    del a
    gc.collect()
    assert r.lend((4, 3), np.uint16).base is base


def test_batch_builder_gathers_rows_across_windows():
    buf = window_array((6, 2))
    buf[:] = np.arange(12, dtype=np.uint16).reshape(6, 2)
    b = BatchBuilder(3, 2, [0], torch.device("cpu"), Recycler(keep=4), torch.bfloat16)
    b.add(np.array([10, 11]), {0: buf}, np.array([5, 0]))
    b.add(np.array([12]), {0: buf}, np.array([2]))
    rows, epoch, state, out = b.result(0, {"offset": 1})
    assert rows.tolist() == [10, 11, 12] and epoch == 0 and state == {"offset": 1}
    assert out[0].view(torch.int16).numpy().tolist() == [[10, 11], [0, 1], [4, 5]]
