"""The held-out split (cache_format/split.py): by sequence, reproducible, recorded in one spelling."""

from __future__ import annotations

import numpy as np
import pytest

import cache_format as cf
from cache_format.errors import UserError
from cache_format.split import Split, heldout_score, is_heldout


def test_the_hash_is_fixed_so_a_split_reproduces_across_versions():
    """An SAE records (seed, fraction); eval on a later version must draw the same rows."""
    got = heldout_score(np.array([0, 1, 2, 12345, -1]), 0)
    want = [0.28176129772258496, 0.6172084904339515, 0.24154538009673077, 0.4977178392077073, 0.9482802731023046]
    assert got.tolist() == want
    assert heldout_score(np.array([0, 1, 2]), 7).tolist() == [
        0.4558970808054451,
        0.020082800653643096,
        0.7092810121569659,
    ]


def test_scores_are_uniform_and_the_held_out_share_is_the_fraction():
    ids = np.arange(200_000)
    s = heldout_score(ids, 3)
    assert s.min() >= 0 and s.max() < 1
    counts, _ = np.histogram(s, bins=10, range=(0, 1))
    assert np.all(np.abs(counts - 20_000) < 5 * np.sqrt(20_000))  # each decile within 5 sigma
    held = Split(3, 0.1).heldout(ids).mean()
    assert abs(held - 0.1) < 5 * np.sqrt(0.1 * 0.9 / len(ids))


def test_a_split_goes_by_sequence_whatever_the_row_order():
    seq = np.repeat(np.arange(500), 7)  # 7 rows per sequence
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(seq))
    split = Split(11, 0.2)
    held = split.heldout(seq)
    assert np.array_equal(split.heldout(seq[perm]), held[perm])  # a row's side is its sequence's
    assert all(len(set(held[seq == s])) == 1 for s in range(500))
    assert np.array_equal(held, is_heldout(seq, 11, 0.2))
    assert not np.array_equal(Split(12, 0.2).heldout(seq), held)  # the seed matters


def test_the_sides_partition_the_rows():
    seq = np.arange(1000)
    split = Split(0, 0.3)
    train, held, every = (split.side(seq, s) for s in ("train", "heldout", "all"))
    assert np.array_equal(train, ~held) and every.all() and held.any() and train.any()
    with pytest.raises(ValueError, match="split side"):
        split.side(seq, "test")


def test_a_split_is_recorded_in_one_spelling_and_read_back():
    split = Split(5, 0.05)
    rec = split.to_record()
    assert set(rec) == {"seed", "fraction", "by"}
    default = Split(0, 0.01)
    assert Split.from_record(rec, default) == split
    assert Split.from_record({**rec, "heldout_tokens": 9}, default) == split  # counts stored beside it
    assert Split.from_record(None, default) == default  # a published SAE records none
    assert Split.from_record({"seed": 3}, default) == Split(3, 0.01)


def test_a_fraction_outside_zero_to_one_is_one_line():
    with pytest.raises(UserError, match=r"fraction 1.0 must be in \[0, 1\)"):
        Split(0, 1.0)
    with pytest.raises(UserError):
        Split.from_record({"seed": 0, "fraction": -0.5}, Split(0, 0.01))


def test_counts_on_a_cache_match_the_rows(make_cache):
    url, data = make_cache(segments=(40, 25, 35))
    c = cf.open_cache(url)
    split = Split(2, 0.4)
    seq, roles = data["rows"]["seq_ids"], data["rows"]["roles"]
    held = split.heldout(seq)
    got = split.counts(c, slice_rows=16)  # several slices
    assert got["heldout_tokens"] == held.sum() and got["train_tokens"] == (~held).sum()
    assert got["sequences"] == len(np.unique(seq)) and got["heldout_sequences"] == len(np.unique(seq[held]))
    assert got["train_sequences"] == got["sequences"] - got["heldout_sequences"]
    keep = np.isin(roles, [2, 3])
    by_role = split.counts(c, role_codes=[2, 3])
    assert by_role["heldout_tokens"] == (held & keep).sum() and by_role["train_tokens"] == (~held & keep).sum()
