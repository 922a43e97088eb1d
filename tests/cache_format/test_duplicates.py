"""Rows held twice are a verify error, and a cheap check from the log finds them (cache_format/duplicates.py)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import cache_format as cf
from cache_format import ops
from cache_format.layout import BF16


def _append(url, seq_ids, positions, records=None):
    w = cf.open_cache(url, mode="a")
    n = len(seq_ids)
    with w.segment() as seg:
        res = {L: np.ones((n, w.d_model), BF16) for L in w.layers}
        seg.append(res, tokens=np.zeros(n, np.int32), seq_ids=seq_ids, positions=positions)
        if records:
            seg.add_sequences(records)
    return seg.id


def test_verify_names_both_segments_of_duplicated_rows_and_the_fix(make_cache, run):
    url, data = make_cache(segments=(40, 25))  # sequences 0..3 and 4..6, 10 rows each
    first = cf.open_cache(url).segments[0].id
    dup = _append(url, np.repeat([2, 3], 10), np.tile(np.arange(10), 2))  # sequences 2 and 3 again
    code, out, err = run("verify", url)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"BAD segments {first} and {dup}: both hold 20 rows (first: seq_id 2, position 0)" in out
    assert f"retract {url} {dup}" in err  # the later copy is the one to retract
    found = ops.quick_duplicates(cf.open_cache(url))
    assert len(found) == 1 and first in found[0][0] and dup in found[0][0]
    run("retract", url, dup)
    assert run("verify", url)[0] == 0


def test_verify_names_a_sequence_recorded_twice(make_cache, run):
    url, _ = make_cache(segments=(40,))
    seg = _append(url, np.full(5, 99), np.arange(5), [{"seq_id": 1, "token_ids": [1, 2]}])  # rows are new
    code, out, err = run("verify", url)
    assert code == 2 and "sequence 1 is recorded more than once" in out and seg in out
    assert ops.quick_duplicates(cf.open_cache(url)) == []  # the quick check looks at rows only


def test_a_sequence_split_across_segments_is_not_a_duplicate(make_cache):
    url, _ = make_cache(segments=(40,))
    _append(url, np.full(5, 7), np.arange(5))
    _append(url, np.full(5, 7), np.arange(5, 10))  # the same sequence, later positions
    c = cf.open_cache(url)
    assert ops.quick_duplicates(c) == [] and ops.verify(c)[1] == []


def test_the_quick_check_reads_no_row_when_no_sequences_overlap(make_cache):
    url, _ = make_cache(segments=(40, 25, 30))
    c = cf.open_cache(url)
    for s in c.log.segments:  # without its row columns, any read of them would fail
        shutil.rmtree(os.path.join(url, s.record["rows"]["path"]))
    assert ops.quick_duplicates(c) == []
    ops.refuse_duplicates(c)
    with pytest.raises(FileNotFoundError):
        ops.all_duplicates(c)  # verify's check reads them


def _forged(url, seq_ranges):
    """A real segment holding sequences 0..3 again (positions 0..9), committed with a record whose
    seq_ranges say `seq_ranges` (prepared, edited, then committed: what a crafted cache can hold)."""
    w = cf.open_cache(url, mode="a")
    with w.segment(defer=True) as seg:
        seg.append(
            {L: np.ones((40, w.d_model), BF16) for L in w.layers},
            tokens=np.zeros(40, np.int32),
            seq_ids=np.arange(40) // 10,
            positions=np.arange(40) % 10,
        )
    w.adopt(seg.prepared)
    w.commit_prepared({**seg.prepared, "seq_ranges": seq_ranges})
    return seg.id


def test_verify_catches_a_record_whose_runs_lie_about_its_rows(make_cache):
    """`quick` trusts the runs each record states; verify checks them against the rows."""
    url, _ = make_cache(segments=(40,))
    forged = _forged(url, [[1000, 1004]])
    assert ops.quick_duplicates(cf.open_cache(url)) == []  # the log alone cannot tell
    problems = ops.verify(cf.open_cache(url))[1]
    assert any(forged in where and "seq_ranges differ from its rows" in why for where, why in problems)
    assert any(forged in where and "both hold 40 rows" in why for where, why in problems)


def test_a_record_whose_seq_ranges_are_not_runs_is_refused_in_one_line(make_cache):
    url, _ = make_cache(segments=(40,))
    _forged(url, [[5, 2]])
    with pytest.raises(cf.CacheError, match="seq_ranges is not a sorted list") as e:
        cf.open_cache(url)
    assert "\n" not in str(e.value)
