"""A work unit is one segment: the sequences it holds, which sequences are done, and capturing it.

A unit is `harvest.segment_sequences` corpus sequences or `supergpqa.questions_per_unit`
rollouts, in fixed blocks of sequence ids, so every process sharing a cache plans the same
units. Which sequences are done is read from the committed segments' `seq_ranges`, so a
re-run after a crash or kill plans only what is missing and ends with the same set of rows
as an uninterrupted run.

Capturing a unit: the forward in batches on the caller's thread (`harvest.capture`), the rows
mixed within windows (write-time mixing), appended and committed on a writer thread. The
writer thread owns the segment for its whole life, so the forward loop never waits on
compression or I/O; a failure abandons the segment at once, so that later segments waiting
for their plan-order turn (cache_format.concurrency) are not held up by this one.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

import cache_format as cf
from cache_format.concurrency import QueueThread

from . import rollouts as ro
from .capture import HostBatch, LayerCapture, capture_batch
from .config import PipelineConfig
from .model import LoadedModel


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


def fill_rollouts(unit: Unit, cfg: PipelineConfig, cache_url: str, lm_factory, tokenizer) -> None:
    """Fill a supergpqa unit with its graded rollouts (`harvest.rollouts`): their token ids and
    the records the sequences table keeps."""
    rs = ro.unit_rollouts(unit.key, list(zip(unit.seq_ids, unit.questions)), cfg, cache_url, lm_factory, tokenizer)
    unit.token_ids = [r.token_ids for r in rs]
    unit.records = [ro.sequence_record(r) for r in rs]


def rollout_rows(tokenizer, unit: Unit, i: int, thinking: bool) -> tuple[np.ndarray, np.ndarray]:
    """Roles and labels of the unit's i-th sequence, a rollout it was filled with."""
    rec = unit.records[i]
    return ro.rows_of(tokenizer, unit.token_ids[i], rec["prompt_len"], bool(rec.get("correct")), thinking)


# ---------------------------------------------------------------------------------------
# capturing a unit into its segment


def window_permutation(seed: int, first_seq_id: int, n_rows: int) -> np.ndarray:
    """The recorded write-time mixing: a permutation seeded by (mix_seed, first sequence id)."""
    return np.random.default_rng([seed, first_seq_id]).permutation(n_rows)


class UnitWriter:
    """Owns one segment in the writer thread: mixes rows within windows, appends, commits."""

    def __init__(
        self,
        writer,
        unit: Unit,
        meta: dict,
        mix_window: int,
        mix_seed: int,
        on_rows: Callable,
        turn=None,
        defer: bool = False,
        claim=None,
    ):
        # turn: commit in plan order (cache_format.concurrency); defer: leave the record to the coordinator;
        # once: never commit sequences another process committed first; claim: released with the segment
        self._open = contextlib.ExitStack()  # holds the segment's `with` block from here until close()
        self.seg = self._open.enter_context(writer.segment(meta=meta, turn=turn, defer=defer, once=True, claim=claim))
        self.unit, self.mix_window, self.mix_seed = unit, mix_window, mix_seed
        self.pending: list[tuple[HostBatch, np.ndarray, np.ndarray]] = []
        self.pending_seqs = 0
        self.on_rows = on_rows

    @contextlib.contextmanager
    def _abandon_on_error(self):
        """Abandon now on any error: later segments must not wait for this one's turn."""
        try:
            yield
        except BaseException:
            with self._open:  # the segment's block exits with the error: it abandons, releasing its turn
                raise

    def add(self, hb: HostBatch, roles: np.ndarray, labels: np.ndarray, n_seqs: int) -> None:
        with self._abandon_on_error():
            self._add(hb, roles, labels, n_seqs)

    def _add(self, hb: HostBatch, roles: np.ndarray, labels: np.ndarray, n_seqs: int) -> None:
        hb.ready()
        if self.mix_window <= 1:
            self._append(hb.residuals, hb.tokens, hb.seq_ids, hb.positions, roles, labels)
            return
        self.pending.append((hb, roles, labels))
        self.pending_seqs += n_seqs
        if self.pending_seqs >= self.mix_window:
            self._flush_window()

    def _flush_window(self) -> None:
        if not self.pending:
            return
        hbs = self.pending
        self.pending, self.pending_seqs = [], 0
        res = {L: torch.cat([h.residuals[L] for h, _, _ in hbs]) for L in hbs[0][0].residuals}
        cols = [np.concatenate(x) for x in zip(*[(h.tokens, h.seq_ids, h.positions, r, lab) for h, r, lab in hbs])]
        perm = window_permutation(self.mix_seed, int(cols[1][0]), len(cols[0]))
        t = torch.from_numpy(perm)
        self._append({L: v[t] for L, v in res.items()}, *[c[perm] for c in cols])

    def _append(self, residuals, tokens, seq_ids, positions, roles, labels) -> None:
        self.seg.append(residuals, tokens=tokens, seq_ids=seq_ids, positions=positions, labels=labels, roles=roles)
        self.on_rows(len(tokens), sum(v.numel() * 2 for v in residuals.values()))

    def close(self) -> None:
        with self._abandon_on_error():
            self._flush_window()
            self.seg.add_sequences(
                [
                    {"seq_id": s, "token_ids": list(map(int, t)), **rec}
                    for s, t, rec in zip(self.unit.seq_ids, self.unit.token_ids, self.unit.records)
                ]
            )
        self._open.close()  # commits in its turn (or abandons, releasing the turn)


def capture_unit(
    lm: LoadedModel,
    w,
    unit: Unit,
    cfg: PipelineConfig,
    wt: QueueThread,
    on_rows: Callable = lambda rows, nbytes: None,
    turn=None,
    defer: bool = False,
    claim=None,
) -> dict:
    """Forward the unit's sequences in batches; the writer thread appends and commits its segment.

    Returns once every batch is queued: the commit happens in `wt` while the caller moves on.
    """
    layers = w.layers
    lm.check_layers(layers)
    meta = {
        "unit": unit.key,
        "source": unit.source,
        "writer": {"host": socket.gethostname(), "pid": os.getpid(), "device": str(lm.device)},
        "mix": {
            "window": cfg.harvest.mix_window,
            "seed": cfg.harvest.mix_seed,
            "scheme": "numpy default_rng([seed, first seq_id of window]).permutation(rows of window)",
        }
        if cfg.harvest.mix_window > 1
        else None,
        **unit.meta,
    }
    if unit.source == "supergpqa" and unit.records:
        meta["generation"] = {k: unit.records[0].get(k, "") for k in ("backend", "backend_version", "backend_params")}
        meta["outcomes"] = ro.outcome_counts(unit.records)
    holder: dict = {}

    def open_unit():
        holder["uw"] = UnitWriter(
            w, unit, meta, cfg.harvest.mix_window, cfg.harvest.mix_seed, on_rows, turn, defer, claim
        )

    wt.submit(open_unit)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    thinking = cfg.supergpqa.enable_thinking
    bs = max(1, cfg.harvest.batch_size)
    with LayerCapture(lm.layers, layers) as cap:
        for a in range(0, len(unit.seq_ids), bs):
            seqs, sids = unit.token_ids[a : a + bs], unit.seq_ids[a : a + bs]
            hb = capture_batch(cap, lm.model, seqs, sids, pad, lm.device)
            if unit.source == "supergpqa":
                rl = [rollout_rows(lm.tokenizer, unit, a + i, thinking) for i in range(len(seqs))]
                roles = np.concatenate([r for r, _ in rl])
                labels = np.concatenate([lab for _, lab in rl])
            else:
                roles = np.full(len(hb.tokens), cf.ROLE_TEXT, np.int8)
                labels = np.full(len(hb.tokens), cf.LABEL_NONE, np.int8)
            wt.submit(lambda hb=hb, roles=roles, labels=labels, n=len(seqs): holder["uw"].add(hb, roles, labels, n))  # noqa: B008 (binds this batch)
    wt.submit(lambda: holder["uw"].close())
    return holder  # holder["uw"].seg: the segment, once `wt` has run the jobs
