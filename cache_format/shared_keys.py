"""Keys that more than one stage reads, so they live where every reader may import them.

Each is the part of another stage's section that a stage needs: train reads where harvest
wrote (`[harvest].cache`); harvest's splice finds a run's SAEs, its held-out split and its
loss settings (`[train]`, `[analysis]`). The owning stage's section extends these classes,
so a key is declared once and has one default.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import OutOfRange, check_ranges


@dataclass
class HarvestKeys:
    """`[harvest]` keys train reads."""

    cache: str = "caches/qwen36-27b"  # where harvest writes, and train reads unless [train].cache says otherwise


@dataclass
class TrainKeys:
    """`[train]` keys harvest's splice reads (to find the SAEs and their held-out split)."""

    cache: str = ""  # "" = [harvest].cache
    out: str = "runs/qwen36-27b"
    heldout_fraction: float = 0.01
    split_seed: int = 0

    def __post_init__(self):
        check_ranges(self, "train", [("heldout_fraction", 0, True)])
        if self.heldout_fraction >= 1:
            raise OutOfRange(
                "train.heldout_fraction", self.heldout_fraction, "below 1 (a share of the sequences, e.g. 0.01)"
            )


@dataclass
class AnalysisKeys:
    """`[analysis]` keys harvest's splice reads (loss recovered runs the base model)."""

    loss_sequences: int = 64  # held-out sequences for loss recovered
    loss_batch_size: int = 4
