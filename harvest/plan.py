"""What a run still has to do: its work units, and which sequences the cache already holds.

A work unit is one segment: `segment_sequences` corpus sequences, or
`supergpqa.questions_per_unit` rollouts, in fixed blocks of sequence ids (so every process
sharing a cache plans the same units). Which sequences are done is read from the committed
segments' `seq_ranges`, so a re-run after a crash or kill plans only what is missing and
ends with the same set of rows as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from . import corpus_plan, data
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


def source_selection(cfg: PipelineConfig) -> dict:
    """What decides which sequences a run holds; must match to append to a cache."""
    if cfg.harvest.source == "supergpqa":
        s = cfg.supergpqa
        return {
            "name": "supergpqa",
            "dataset": s.dataset,
            "revision": s.revision,
            "split": s.split,
            "seed": s.seed,
            "enable_thinking": s.enable_thinking,
            "max_new_tokens": s.max_new_tokens,
            "prompt_format": s.prompt_format,
            "force_answer": s.force_answer,
        }
    c = cfg.corpus
    # a source's revision is checked against the commit its segments recorded (harvest.revisions)
    return {
        "name": "corpus",
        "seq_len": c.seq_len,
        "seed": c.seed,
        "mix": c.mix,
        "sources": [{k: v for k, v in dataclasses.asdict(s).items() if k != "revision"} for s in c.sources],
    }


def plan_units(
    cfg: PipelineConfig, tokenizer, done: set[int], segments=(), dataset_commit: str | None = None
) -> tuple[list[Unit], int]:
    """Units still to do, and the total number of sequences the run wants.

    Corpus units are planned lazily while they run (`harvest.corpus_plan`), restarting from
    the planner state the committed `segments` recorded.
    """
    if cfg.harvest.source == "corpus":
        units = corpus_plan.PlannedUnits(cfg, tokenizer, done, segments, Unit)
        return units, units.n_seq
    per = cfg.supergpqa.questions_per_unit  # rollout units have their own size (corpus: segment_sequences)
    qs = data.select_questions(
        data.load_questions(cfg.supergpqa, dataset_commit), cfg.supergpqa.questions, cfg.supergpqa.seed
    )
    blocks: dict[int, list[tuple[int, Any]]] = {}
    for i, q in enumerate(qs):
        if i not in done:
            blocks.setdefault(i // per, []).append((i, q))
    units = []
    for part in blocks.values():
        ids = [i for i, _ in part]
        units.append(
            Unit(
                key=f"{cfg.harvest.source}:{ids[0]}-{ids[-1]}",
                source=cfg.harvest.source,
                seq_ids=ids,
                questions=[q for _, q in part],
            )
        )
    return units, len(qs)
