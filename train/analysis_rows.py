"""Which cache rows an analysis scans: a side of the sequence split, with the given roles.

The same hash split and role rule as training, so analysis sees the held-out rows training
never saw (or, on request, the train side or everything).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import cache_format as cf
from cache_format.errors import UserError

from .sae import TopKSAE
from .split import is_heldout

ROW_SETS = ("heldout", "train", "all")


@dataclass
class Split:
    """Which rows are scanned: a side of the sequence split (by hash), with the given roles."""

    seed: int = 0
    fraction: float = 0.01
    roles: tuple[int, ...] | None = None  # None = every role
    rows: str = "heldout"  # heldout | train | all: which side of the split
    labeled: bool = False  # keep only rows with a correctness label (label >= 0)

    def keep(self, cols: dict) -> np.ndarray:
        """Mask of the rows of a chunk's columns that this split scans."""
        held = is_heldout(cols["seq_ids"], self.seed, self.fraction)
        keep = {"heldout": held, "train": ~held, "all": np.ones_like(held)}[self.rows]
        if self.roles is not None:
            keep &= np.isin(cols["roles"], self.roles)
        if self.labeled:
            keep &= cols["labels"] >= 0
        return keep

    def describe(self) -> str:
        """What the rows are, in words (for errors and the report)."""
        side = {"heldout": "held-out", "train": "train-split", "all": "all"}[self.rows]
        return f"{side}{' labeled' if self.labeled else ''} rows (split seed {self.seed}, fraction {self.fraction:g})"

    def as_dict(self) -> dict:
        return {
            "seed": self.seed,
            "fraction": self.fraction,
            "roles": list(self.roles) if self.roles else None,
            "rows": self.rows,
            "labeled": self.labeled,
        }

    @classmethod
    def of(cls, sae: TopKSAE, default_seed: int, default_fraction: float) -> Split:
        """The split recorded in the SAE's config (train's export), else the defaults given."""
        from .rundir import recorded_split

        seed, fraction, roles = recorded_split(sae, default_seed, default_fraction)
        return cls(seed, fraction, parse_roles(roles) if roles else None)


def parse_roles(roles) -> tuple[int, ...]:
    out = []
    for r in roles:
        if isinstance(r, str) and r in cf.ROLE_CODES:
            out.append(cf.ROLE_CODES[r])
        elif isinstance(r, (int, np.integer)) and int(r) in cf.ROLE_NAMES:
            out.append(int(r))
        else:
            raise UserError(f"role {r!r} is unknown; use text, prompt, thinking or answer")
    return tuple(sorted(set(out)))


def default_roles(cache) -> tuple[int, ...] | None:
    """The loader's rule, so analysis sees the rows training saw: thinking + answer on
    rollout caches, every row on corpus text."""
    from .row_filters import default_roles as loader_default

    roles = loader_default(cache)
    return parse_roles(roles) if roles else None
