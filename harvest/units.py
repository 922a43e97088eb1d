"""A work unit is one segment: the sequences it holds, which sequences are done, and capturing it.

A unit is `harvest.segment_sequences` corpus sequences or `supergpqa.questions_per_unit`
rollouts, in fixed blocks of sequence ids, so every process sharing a cache plans the same
units. Which sequences are done is read from the committed segments' `seq_ranges`, so a
re-run after a crash or kill plans only what is missing and ends with the same set of rows
as an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import PipelineConfig


@dataclass
class Unit:
    """One segment's worth of sequences."""

    key: str
    source: str
    seq_ids: list[int]
    token_ids: list[list[int]] = field(default_factory=list)  # corpus: packed ids; supergpqa: filled after generation
    records: list[dict] = field(default_factory=list)  # per-sequence source fields
    questions: list[dict] = field(default_factory=list)  # supergpqa only
    meta: dict = field(default_factory=dict)  # extra segment meta (corpus: planner state, rows by source)

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


@dataclass
class Context:
    """What a worker needs besides the unit (dataclasses: it pickles to dask workers)."""

    config: PipelineConfig
    cache_url: str
    threads: int = 0
    device: str | None = None


def done_seq_ids(cache) -> set[int]:
    """Sequences a live segment holds (the runs every segment record carries)."""
    done: set[int] = set()
    for s in cache.segments:
        for a, b in s.seq_ranges or []:
            done.update(range(a, b))
    return done
