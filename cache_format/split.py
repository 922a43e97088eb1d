"""The train/held-out split: by sequence, never by token, reproducible on any cache.

A row is held out when a hash of (seq_id, seed) falls below `fraction`. It is part of the data
contract, so both stages read it from here: train splits its rows with it, an SAE records its
`Split` (`to_record`), and `train eval` and harvest's loss recovered draw the same held-out
rows from any cache holding those sequences, whatever their order or which layers it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

SIDES = ("train", "heldout", "all")
MIN_HELDOUT_SEQUENCES = 8  # fewer held-out sequences than this make a validation too noisy to run on
BY = "seq_id hash (cache_format.split)"  # what an SAE's record says the split is made of


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


@dataclass(frozen=True)
class Split:
    """One split of the sequences: `fraction` of them (by hash, with `seed`) held out."""

    seed: int
    fraction: float

    def __post_init__(self):
        if not 0.0 <= self.fraction < 1.0:
            raise UserError(
                f"held-out fraction {self.fraction} must be in [0, 1) (a share of the sequences, e.g. 0.01); "
                "fix the value that set it (train.heldout_fraction, or the SAE's recorded split)"
            )

    def heldout(self, seq_ids: np.ndarray) -> np.ndarray:
        """Boolean mask: True where the row's sequence is held out."""
        return heldout_score(seq_ids, self.seed) < self.fraction

    def side(self, seq_ids: np.ndarray, side: str) -> np.ndarray:
        """Boolean mask of the rows on `side`: "train", "heldout" or "all"."""
        if side == "all":
            return np.ones(len(seq_ids), bool)
        held = self.heldout(seq_ids)
        if side == "heldout":
            return held
        if side == "train":
            return ~held
        raise ValueError(f"split side {side!r}: use one of {', '.join(SIDES)}")

    def counts(self, cache, role_codes=None, slice_rows: int = 1 << 22) -> dict:
        """Sequences and rows of `cache` on each side (rows after the role filter), read in slices."""
        seqs, held_seqs, held_rows, train_rows = [], [], 0, 0
        n = cache.n_tokens
        for lo in range(0, n, slice_rows):
            hi = min(n, lo + slice_rows)
            sid = np.asarray(cache.seq_ids[lo:hi])
            keep = (
                np.ones(len(sid), bool) if role_codes is None else np.isin(np.asarray(cache.roles[lo:hi]), role_codes)
            )
            held = self.heldout(sid)
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
            "seed": self.seed,
            "fraction": self.fraction,
        }

    def to_record(self) -> dict:
        """What an SAE records of its split (beside its counts): `{"seed", "fraction", "by"}`."""
        return {"seed": self.seed, "fraction": self.fraction, "by": BY}

    @classmethod
    def from_record(cls, record: dict | None, default: Split) -> Split:
        """The split an SAE recorded (`to_record`'s keys), else `default` (published SAEs record none)."""
        if not isinstance(record, dict):
            return default
        return cls(int(record.get("seed", default.seed)), float(record.get("fraction", default.fraction)))
