"""What a run still has to do: its work units, by source."""

from __future__ import annotations

from typing import Any

from . import corpus, supergpqa
from .config import PipelineConfig
from .units import Unit


def plan_units(
    cfg: PipelineConfig, tokenizer, done: set[int], segments=(), dataset_commit: str | None = None
) -> tuple[list[Unit], int]:
    """Units still to do, and the total number of sequences the run wants.

    Corpus units are planned lazily while they run (`harvest.corpus`), restarting from
    the planner state the committed `segments` recorded.
    """
    if cfg.harvest.source == "corpus":
        units = corpus.PlannedUnits(cfg, tokenizer, done, segments)
        return units, units.n_seq
    per = cfg.supergpqa.questions_per_unit  # rollout units have their own size (corpus: segment_sequences)
    qs = supergpqa.select_questions(
        supergpqa.load_questions(cfg.supergpqa, dataset_commit), cfg.supergpqa.questions, cfg.supergpqa.seed
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
