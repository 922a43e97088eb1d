"""One process's side of a run: its loaded model and open cache writer, reused by every unit
it runs, and running one unit with them.

A process (this one, or a dask worker) loads the model once and opens the cache once; every
unit it is given captures through them, one capture at a time.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections.abc import Callable

import torch

import cache_format as cf
from cache_format.commits import read_root

from .capture import BackgroundWriter
from .config import ModelConfig
from .model import LoadedModel, load_model, reference_kernel_note
from .unit_rollouts import ensure_rollouts
from .unit_writer import capture_unit
from .units import Context, Unit


class WorkerState:
    """This process's model and cache writer (one of each, kept across units)."""

    def __init__(self):
        self.model_key: str | None = None
        self.loaded: LoadedModel | None = None
        self.writer = None
        self.writer_url: str | None = None
        self.kernel_note_said = False
        # One model per process, hooked by one capture at a time: a dask worker with several threads
        # (or several in-process workers) would otherwise mix two units' residuals in the same hooks.
        self.lock = threading.RLock()

    def model(self, model_cfg: ModelConfig, device: str | None) -> LoadedModel:
        """The model for these settings, loaded on first use (or when the settings change)."""
        key = repr((dataclasses.asdict(model_cfg), device))
        if self.model_key != key:
            lm = self.loaded = load_model(model_cfg, device=device)
            self.model_key = key
            if not self.kernel_note_said:  # said at the first load, before any generation
                note = reference_kernel_note(lm.model, lm.device)
                if note:
                    self.kernel_note_said = True
                    print(note, file=sys.stderr)
        return self.loaded

    def cache_writer(self, url: str):
        """The cache at `url` opened for appending, once per process (again if it was recreated)."""
        if self.writer is None or self.writer_url != url or read_root(self.writer.loc) != self.writer.root:
            self.writer = cf.open_cache(url, mode="a")
            self.writer_url = url
        return self.writer


WORKER = WorkerState()  # this process's


def process_unit(
    unit: Unit,
    ctx: Context,
    writer_thread: BackgroundWriter | None = None,
    on_rows: Callable = lambda rows, nbytes: None,
    turn=None,
    defer: bool = False,
    claim=None,
) -> dict:
    """Capture one unit and commit it as one segment (in `turn`'s place in the plan; or, with
    `defer`, return its prepared record for the coordinator to commit), once: a segment whose
    sequences another process committed first is dropped. `claim` (the unit's work claim) is
    released when the segment ends. Returns counts for progress."""
    cfg = ctx.config
    threads = ctx.threads or cfg.harvest.torch_threads
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    own_thread = writer_thread is None
    wt = writer_thread or BackgroundWriter(cfg.harvest.queue_depth)
    with WORKER.lock:
        lm = WORKER.model(cfg.model, ctx.device)
        w = WORKER.cache_writer(ctx.cache_url)
        if unit.source == "supergpqa" and not unit.token_ids:
            ensure_rollouts([unit], cfg, ctx.cache_url, lambda: lm, lm.tokenizer)
        holder = capture_unit(lm, w, unit, cfg, wt, on_rows, turn, defer, claim)
    if own_thread:
        wt.close()
    out = {
        "unit": unit.key,
        "rows": unit.n_tokens,
        "sequences": len(unit.seq_ids),
        "bytes": unit.n_tokens * len(w.layers) * w.d_model * 2,
    }
    if defer:
        out["record"] = holder["uw"].seg.prepared
    return out
