"""The train/held-out split: by sequence, never by token, reproducible on any cache.

A row is held out when a hash of (seq_id, seed) falls below `fraction`. The SAE records the
seed and fraction, so `train eval` draws the same held-out rows from any cache holding those
sequences, whatever their order or which layers were harvested.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a cheap, well-spread 64-bit hash (vectorized)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def heldout_score(seq_ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per sequence id, fixed by (seq_id, seed)."""
    ids = np.asarray(seq_ids).astype(np.int64, copy=False).view(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix64(ids ^ _mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + _GOLDEN))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def is_heldout(seq_ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Boolean mask: True where the row's sequence belongs to the held-out split."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction {fraction} must be in [0, 1)")
    return heldout_score(seq_ids, seed) < fraction


MIN_HELDOUT_SEQUENCES = 8


def split_counts(cache, seed: int, fraction: float, role_codes=None, slice_rows: int = 1 << 22) -> dict:
    """Sequences and rows on each side of the split (rows after the role filter), read in slices."""
    seqs, held_seqs, held_rows, train_rows = [], [], 0, 0
    n = cache.n_tokens
    for lo in range(0, n, slice_rows):
        hi = min(n, lo + slice_rows)
        sid = np.asarray(cache.seq_ids[lo:hi])
        keep = np.ones(len(sid), bool) if role_codes is None else np.isin(np.asarray(cache.roles[lo:hi]), role_codes)
        held = is_heldout(sid, seed, fraction)
        seqs.append(np.unique(sid[keep]))
        held_seqs.append(np.unique(sid[keep & held]))
        held_rows += int((keep & held).sum())
        train_rows += int((keep & ~held).sum())
    uniq = np.unique(np.concatenate(seqs)) if seqs else np.zeros(0, np.int64)
    held_uniq = np.unique(np.concatenate(held_seqs)) if held_seqs else np.zeros(0, np.int64)
    return {
        "sequences": int(len(uniq)),
        "heldout_sequences": int(len(held_uniq)),
        "heldout_tokens": held_rows,
        "train_sequences": int(len(uniq) - len(held_uniq)),
        "train_tokens": train_rows,
        "seed": seed,
        "fraction": fraction,
    }
