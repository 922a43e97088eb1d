"""Duplicated rows: a (seq_id, position) held by two live segments, or a sequence recorded twice.

A cache holding a row twice serves it twice per epoch, and nothing else notices: the loader,
the stats and the fingerprint all take it as data. Two checks, of different cost:

- `quick(cache)`, for `train run`: from the commit log alone. Segments whose recorded
  sequence runs (`seq_ranges`, seq_ranges.py) overlap are the only candidates, and only
  their seq_id and position columns are read to confirm. O(R log R) in the log's runs
  (about one per segment) plus the rows of overlapping segments: none in a cache without
  duplicates, so a 200M-token cache is checked without reading a row. Segments that record
  no runs (written before the format did, and not by harvest) are left to `verify`.
- `full(cache)`, for `verify`: trusts no record. It reads every segment's seq_ids and
  positions (one segment at a time) and its sequences table, checks each segment's runs
  against its rows and its rows against each other, then confirms overlapping pairs.
"""

from __future__ import annotations

import collections

import numpy as np

from . import commits, integrity, seq_ranges
from .errors import CacheError


def _pairs(seq_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    out = np.empty(len(seq_ids), dtype=[("s", "<i8"), ("p", "<i8")])
    out["s"], out["p"] = seq_ids, positions
    return out


def _fix(url: str, seg_id: str) -> str:
    return f"retract one copy: python -m cache_format retract {url} {seg_id}"


class _Columns:
    """Segments' (seq_id, position) pairs, read once and dropped when no pair needs them."""

    def __init__(self, cache, needed: collections.Counter):
        self.cache, self.needed, self.got = cache, needed, {}

    def __call__(self, seg_id: str) -> np.ndarray:
        if seg_id not in self.got:
            c = self.cache
            self.got[seg_id] = _pairs(c.segment_column(seg_id, "seq_ids"), c.segment_column(seg_id, "positions"))
        out = self.got[seg_id]
        self.needed[seg_id] -= 1
        if self.needed[seg_id] <= 0:
            del self.got[seg_id]
        return out


def _confirm(cache, held: list[tuple[list, str]], stop_at_first: bool) -> list[tuple[str, str]]:
    """Read the columns of segments whose runs overlap; a problem per pair that shares rows."""
    order = {s.id: i for i, s in enumerate(cache.segments)}
    pairs = sorted(seq_ranges.overlapping_pairs(held), key=lambda p: (order[p[0]], order[p[1]]))
    runs = dict((o, r) for r, o in held)
    columns = _Columns(cache, collections.Counter(x for p in pairs for x in p))
    problems = []
    for a, b in pairs:
        a, b = sorted((a, b), key=order.get)  # b: the later commit, the one to retract
        shared = seq_ranges.overlap(runs[a], runs[b])
        pa, pb = columns(a), columns(b)
        both = np.intersect1d(_within(pa, shared), _within(pb, shared))
        if len(both):
            problems.append(
                (
                    f"segments {a} and {b}",
                    f"both hold {len(both)} rows (first: seq_id {int(both[0]['s'])}, position "
                    f"{int(both[0]['p'])}), so every reader sees them twice; {_fix(cache.url, b)}",
                )
            )
            if stop_at_first:
                break
    return problems


def _within(pairs: np.ndarray, runs: list) -> np.ndarray:
    keep = np.zeros(len(pairs), bool)
    for a, b in runs:
        keep |= (pairs["s"] >= a) & (pairs["s"] < b)
    return pairs[keep]


def quick(cache, stop_at_first: bool = False) -> list[tuple[str, str]]:
    """Duplicated rows found from the log's runs (see the module docstring); [(where, why)]."""
    held = [(s.seq_ranges, s.id) for s in cache.segments if s.seq_ranges]
    return _confirm(cache, held, stop_at_first)


def full(cache) -> list[tuple[str, str]]:
    """Every duplicated row and sequence record of the live segments, from the rows themselves."""
    problems, held = [], []
    recorded_twice: dict[int, list[str]] = collections.defaultdict(list)
    for s, st in zip(cache.segments, cache.committed_segments, strict=True):
        pairs = _pairs(cache.segment_column(s.id, "seq_ids"), cache.segment_column(s.id, "positions"))
        runs = seq_ranges.ranges_of(pairs["s"])
        if s.seq_ranges is not None and s.seq_ranges != runs:
            problems.append(
                (f"segment {s.id}", "its record's seq_ranges differ from its rows' seq_ids; " + _fix(cache.url, s.id))
            )
        uniq, counts = np.unique(pairs, return_counts=True)
        if (counts > 1).any():
            first = uniq[np.argmax(counts > 1)]
            problems.append(
                (
                    f"segment {s.id}",
                    f"holds {int((counts > 1).sum())} rows twice (first: seq_id {int(first['s'])}, position "
                    f"{int(first['p'])}); {_fix(cache.url, s.id)}",
                )
            )
        held.append((runs, s.id))
        for sid in _recorded_seq_ids(cache, st.record.get("sequences")):
            recorded_twice[sid].append(s.id)
    problems += _confirm(cache, held, stop_at_first=False)
    twice = {sid: segs for sid, segs in recorded_twice.items() if len(segs) > 1}
    by_segments = collections.defaultdict(list)
    for sid, segs in sorted(twice.items()):
        by_segments[tuple(dict.fromkeys(segs))].append(sid)
    for segs, sids in by_segments.items():
        where = f"segment {segs[0]}" if len(segs) == 1 else "segments " + " and ".join(segs)
        what = (
            f"{len(sids)} sequences are recorded more than once (first: seq_id {sids[0]})"
            if len(sids) > 1
            else f"sequence {sids[0]} is recorded more than once"
        )
        problems.append((where, f"{what}; {_fix(cache.url, segs[-1])}"))
    return problems


def _recorded_seq_ids(cache, q: dict | None) -> list[int]:
    """The seq_ids of one segment's sequences table (`q`: its record's entry), read checked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not q:
        return []
    data = integrity.read_checked(cache.location, q["path"], q, commits.digest)
    return pq.read_table(pa.BufferReader(data), columns=["seq_id"]).column("seq_id").to_pylist()


def refuse(cache) -> None:
    """A one-line CacheError if the log shows duplicated rows (`quick`): the check `train run` makes."""
    found = quick(cache, stop_at_first=True)
    if found:
        where, why = found[0]
        raise CacheError(f"{cache.url} holds duplicated rows: {where} {why} (then run verify)")
