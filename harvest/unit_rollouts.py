"""The rollouts behind supergpqa units: reused from sidecars, generated or graded when missing,
and the per-token roles and labels their rows carry.

Sidecars are keyed by everything that decides a rollout, so a resumed run, another worker or
a later layer sees the same rollouts and never regenerates one it already has; generation is
claimed per unit, so two processes on one cache never generate the same rollout.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np

import cache_format as cf
from cache_format.claims import POLL_S, Claims
from cache_format.stores import Location

from . import rollouts as ro
from .config import PipelineConfig
from .rollout_store import load_all_rollouts, save_generated, save_rollouts
from .units import Unit


def rollout_tag(cfg: PipelineConfig) -> str:
    """Sidecar files are keyed by what decides a rollout, so changed settings never reuse them."""
    sel = json.dumps(
        [cfg.source_selection(), cfg.model.name_or_path, cfg.model.revision, cfg.model.dtype], sort_keys=True
    )
    return hashlib.sha256(sel.encode()).hexdigest()[:12]


def _claims(cfg: PipelineConfig, cache_url: str) -> Claims:
    """Generation claims live in the cache, per rollout tag: one process generates a unit's rollouts."""
    return Claims(Location(cache_url), f"rollouts-{rollout_tag(cfg)}")


def generate_missing(
    units: list[Unit], cfg: PipelineConfig, cache_url: str, lm_factory, tokenizer, progress: bool = True
) -> int:
    """Generate the units' rollouts that no sidecar holds yet, saving them as they finish; returns
    how many this process generated.

    Questions are generated in fixed blocks of `generate_batch_size` seq_ids, each claimed first
    (cache_format.claims): with several processes on one cache every rollout is generated once,
    a block another live process holds is left to it, and every batch is the same whichever
    process runs it (so are its greedy outputs). The transformers backend takes a block at a
    time (so a second process helps); vLLM takes every free block at once (one subprocess)."""
    tag = rollout_tag(cfg)
    stored = load_all_rollouts(cache_url, tag)
    size = max(1, cfg.supergpqa.generate_batch_size)
    blocks: dict[int, list] = {}
    for u in units:
        for sid, q in zip(u.seq_ids, u.questions):
            if sid not in stored:
                blocks.setdefault(sid // size, []).append((sid, q))
    if not blocks:
        return 0
    claims = _claims(cfg, cache_url)
    every_block = cfg.supergpqa.backend == "vllm"
    backend, made, todo = None, 0, iter(sorted(blocks.items()))
    bar = ro.generation_bar(sum(len(v) for v in blocks.values()), progress)
    try:
        while True:
            group, held = [], []
            for b, pairs in todo:
                c = claims.take(f"block-{b}")
                if c is None:  # another process is generating it
                    bar.total -= len(pairs)
                    continue
                group += pairs
                held.append(c)
                if not every_block:
                    break
            if not group:
                return made
            try:
                stored = load_all_rollouts(cache_url, tag)  # generated since we looked? then not again
                missing = [(sid, q) for sid, q in group if sid not in stored]
                bar.total -= len(group) - len(missing)
                if missing:
                    backend = backend or ro.make_backend(cfg.supergpqa, lm_factory, cfg.model)
                    ro.generate_rollouts(
                        missing,
                        backend,
                        tokenizer,
                        cfg.supergpqa,
                        lambda rs: save_generated(cache_url, tag, rs),
                        bar=bar,
                    )
                    made += len(missing)
            finally:
                for c in held:
                    c.release()
    finally:
        bar.close()


def ensure_rollouts(
    units: list[Unit], cfg: PipelineConfig, cache_url: str, lm_factory, tokenizer, progress: bool = False
) -> None:
    """Fill supergpqa units with graded rollouts: stored ones are reused, missing ones generated
    (or waited for, while another process generates them), ungraded ones graded (forcing an
    answer needs the model) and saved per unit."""
    tag = rollout_tag(cfg)
    while True:
        generate_missing(units, cfg, cache_url, lm_factory, tokenizer, progress)
        stored = load_all_rollouts(cache_url, tag)
        if all(s in stored for u in units for s in u.seq_ids):
            break
        time.sleep(POLL_S)  # another process holds their generation: it saves them, or dies and we take over
    for u in units:
        rs = [stored[s] for s in u.seq_ids]
        if not all(r.graded for r in rs):
            rs = [r if r.graded else ro.grade_rollout(r, tokenizer, cfg.supergpqa, lm_factory) for r in rs]
            save_rollouts(cache_url, f"{tag}/graded/{u.key}", rs)
        u.token_ids = [r.token_ids for r in rs]
        u.records = [
            {
                "source": "supergpqa",
                "prompt_len": len(r.prompt_ids),
                **{k: ("" if v is None else v) for k, v in r.record.items()},
            }
            for r in rs
        ]


def as_rollout(unit: Unit, i: int) -> ro.Rollout:
    """The unit's i-th sequence as the rollout it was filled from."""
    rec = unit.records[i]
    n_p = rec["prompt_len"]
    ids = unit.token_ids[i]
    return ro.Rollout(unit.seq_ids[i], ids[:n_p], ids[n_p:], bool(rec.get("finished")), rec)


def rows_of(tokenizer, r: ro.Rollout, thinking: bool) -> tuple[np.ndarray, np.ndarray]:
    """Roles and labels of a rollout's tokens (prompt, then thinking until `</think>`, then answer)."""
    n_p, n_r = len(r.prompt_ids), len(r.response_ids)
    roles = np.empty(n_p + n_r, np.int8)
    roles[:n_p] = cf.ROLE_PROMPT
    end = tokenizer.convert_tokens_to_ids("</think>")
    split = n_r
    if not thinking:
        split = 0
    elif isinstance(end, int) and end >= 0 and end in r.response_ids:
        split = r.response_ids.index(end)
    roles[n_p : n_p + split] = cf.ROLE_THINKING
    roles[n_p + split :] = cf.ROLE_ANSWER
    labels = np.full(n_p + n_r, cf.LABEL_NONE, np.int8)
    labels[n_p:] = cf.LABEL_CORRECT if r.record.get("correct") else cf.LABEL_WRONG
    return roles, labels
