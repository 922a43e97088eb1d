"""Which sequences a segment holds, compactly: sorted half-open runs [a, b) of seq_ids.

Every segment record carries the runs of its rows' seq_ids (`seq_ranges`), so that a commit
can check it duplicates no live segment, and `train run` can check a cache for duplicated
rows, from the log alone: O(segments · runs), never a read of the rows. A harvest unit's
sequences are consecutive, so its segment has a run or two.
"""

from __future__ import annotations

import numpy as np

from .layout import runs_ok


def ranges_of(ids) -> list[list[int]]:
    """[3, 4, 5, 9, 4] → [[3, 6], [9, 10]]."""
    u = np.unique(np.asarray(ids, dtype=np.int64))
    if not len(u):
        return []
    breaks = np.flatnonzero(np.diff(u) != 1) + 1
    starts = np.r_[0, breaks]
    ends = np.r_[breaks, len(u)]
    return [[int(u[a]), int(u[b - 1]) + 1] for a, b in zip(starts, ends, strict=True)]


def of_record(record: dict) -> list[list[int]] | None:
    """A segment record's runs (checked by layout.check_record), else harvest's meta's, which held
    them before the format did (free-form: used only if well formed); None if unknown."""
    if "seq_ranges" in record:
        return record["seq_ranges"]
    meta = record.get("meta")
    r = meta.get("seq_ranges") if isinstance(meta, dict) else None
    return r if runs_ok(r) else None


def holders(ranges, held: list[tuple[list, object]]) -> list:
    """Owners (in `held` order) whose runs share an id with `ranges`: a linear scan, as a commit
    check needs it once per commit."""
    return [owner for runs, owner in held if overlap(ranges, runs)]


def overlapping_pairs(held: list[tuple[list, object]]) -> list[tuple[object, object]]:
    """Every pair of owners whose runs share an id: one sweep over the sorted runs,
    O(R log R) in the number of runs R plus the pairs found."""
    runs = sorted((a, b, i) for i, (rs, _) in enumerate(held) for a, b in rs)
    active: list[tuple[int, int]] = []  # (end, owner index) of runs still open
    pairs: set[tuple[int, int]] = set()
    for a, b, i in runs:
        active = [(e, j) for e, j in active if e > a]
        for _, j in active:
            if j != i:
                pairs.add((min(i, j), max(i, j)))
        active.append((b, i))
    return [(held[i][1], held[j][1]) for i, j in sorted(pairs)]


def overlap(x, y) -> list[list[int]]:
    """The ids two sorted run lists share, as runs."""
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append([a, b])
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def describe(ranges) -> str:
    """Runs for a message: 'seq_ids 4..7, 12'."""
    parts = [f"{a}" if b == a + 1 else f"{a}..{b - 1}" for a, b in ranges[:3]]
    return "seq_ids " + ", ".join(parts) + (", ..." if len(ranges) > 3 else "")
