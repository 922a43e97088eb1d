"""Adding a layer to rows already in the cache, from the stored sequences: never regenerates.

A layer asked for after the rows were captured (or declared by a run that was interrupted)
is rebuilt per committed segment by a fresh forward over the token ids the cache stores, so
the new layer lines up row for row with the layers written at capture time. Each (segment,
layer) is claimed and committed once, however many processes backfill the cache at once.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from cache_format.claims import Claims, wait_for
from cache_format.errors import CacheError

from .capture import LayerCapture, capture_batch
from .config import PipelineConfig
from .worker import WORKER


def add_layers(cfg: PipelineConfig, w, layers: list[int], progress: bool = True) -> list[int]:
    """Backfill `layers` into every committed segment, from stored sequences: never regenerates.

    Rows are rebuilt in each segment's stored order (write-time mixing included) by locating
    every (seq_id, position) in a fresh forward over the stored token ids; the tokens are
    checked against the stored rows before anything is written. Each (segment, layer) is
    claimed first, so processes sharing the cache split the work; one a live process holds is
    waited for at the end (and taken over if that process dies).
    """
    lm = WORKER.model(cfg.model, None)
    lm.check_layers(layers)
    bfs = {L: w.add_layer(L) for L in layers}
    claims = Claims(w.loc, "backfill")
    while True:
        skipped = _backfill_pass(cfg, w, lm, bfs, claims, progress)
        if not skipped:
            return layers
        wait_for(skipped, functools.partial(_committed, w), claims)  # then a pass over what is still pending


def _committed(w, items: dict) -> list[str]:
    """Names of (segment, layer) items whose layer is committed now (or whose segment was retracted)."""
    live = {s.id: s for s in w.snapshot().segments}
    return [n for n, (sid, L) in items.items() if sid not in live or L in live[sid].layers]


def _backfill_pass(cfg: PipelineConfig, w, lm, bfs: dict, claims: Claims, progress: bool) -> dict:
    """Backfill every pending (segment, layer) this process can claim; returns those others hold."""
    from tqdm import tqdm

    layers = sorted(bfs)
    pending = {L: {s.id for s in bf.pending()} for L, bf in bfs.items()}
    snap = w.snapshot()
    todo = [s for s in snap.segments if any(s.id in p for p in pending.values())]
    if not todo:
        return {}
    seqs = snap.sequences()
    tok_of = dict(zip(seqs.column("seq_id").to_pylist(), seqs.column("token_ids").to_pylist()))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    bs = max(1, cfg.harvest.batch_size)
    skipped: dict[str, tuple[str, int]] = {}
    bar = tqdm(
        total=sum(s.n_rows for s in todo),
        unit="tok",
        unit_scale=True,
        desc=f"add layers {layers}",
        disable=not progress,
        dynamic_ncols=True,
    )
    for s in todo:
        mine = {}
        for L in layers:
            if s.id in pending[L]:
                name = f"{s.id}-layer{L}"
                c = claims.take(name)
                if c is None:
                    skipped[name] = (s.id, L)
                else:
                    mine[L] = c
        live = {x.id: x for x in w.snapshot().segments}  # committed since the pass began? then not again
        for L in list(mine):
            if s.id not in live or L in live[s.id].layers:
                mine.pop(L).release()
        try:
            if mine:
                _backfill_segment(lm, snap, s, tok_of, pad, bs, {L: bfs[L] for L in mine}, mine)
        finally:
            for c in mine.values():
                c.release()  # normally released by its commit already
        bar.update(s.n_rows)
    bar.close()
    return skipped


def _backfill_segment(lm, snap, s, tok_of: dict, pad: int, bs: int, bfs: dict, claims: dict) -> None:
    """One segment's claimed layers: a forward over its stored sequences, rows in its stored order."""
    a, b = s.row_start, s.row_start + s.n_rows
    sid = np.asarray(snap.seq_ids[a:b])
    pos = np.asarray(snap.positions[a:b])
    tokens = np.asarray(snap.tokens[a:b])
    uniq = list(dict.fromkeys(sid.tolist()))
    missing = [x for x in uniq if x not in tok_of]
    if missing:
        raise CacheError(f"segment {s.id}: sequence {missing[0]} has no stored token ids; cannot add a layer")
    layers = sorted(bfs)
    offsets, parts, off = {}, {L: [] for L in layers}, 0
    with LayerCapture(lm.layers, layers) as cap:
        for i in range(0, len(uniq), bs):
            ids = uniq[i : i + bs]
            hb = capture_batch(cap, lm.model, [tok_of[x] for x in ids], ids, pad, lm.device).ready()
            for L in layers:
                parts[L].append(hb.residuals[L])
            for x in ids:
                offsets[x] = off
                off += len(tok_of[x])
    index = np.fromiter((offsets[x] for x in sid.tolist()), np.int64, len(sid)) + pos
    flat_tokens = np.concatenate([np.asarray(tok_of[x], np.int64) for x in uniq])
    if not np.array_equal(flat_tokens[index], tokens):
        raise CacheError(
            f"segment {s.id}: stored sequences do not match its token rows; "
            "the cache is inconsistent, run `python -m cache_format verify`"
        )
    t = torch.from_numpy(index)
    for L in layers:
        bfs[L].write(
            s.id, residuals={L: torch.cat(parts[L])[t]}, tokens=tokens, seq_ids=sid, positions=pos, claim=claims[L]
        )
