"""The shuffled loader: cache chunks in random order, through a shuffle window, into batches.

Which rows pass is `row_filters`; which batch holds which rows is `window_plan` (a pure function
of seed, epoch and ranks, so batches do not depend on thread timing); the memory the rows move
through is `loader_buffers`; decoding a window and the norm filter are `window_decode`'s, the
producer thread `prefetch`'s, and the checks on a saved position `loader_state`'s. This module
runs the plan: background threads decode the chunks of the current and the next window
(prefetch) straight into two reused buffers per layer, the norm-outlier filter is applied per
window as the rows are decoded, and each batch is one gather of its shuffled rows out of them.

The loader's position is (epoch, window, offset), and resuming re-reads one window: the cost is
independent of how much was consumed. With N ranks each rank decodes only its own chunks (every
N-th of the epoch's order), shuffles its share of each window and yields batches of
batch_size / N rows from it, so a global batch draws from the whole window as one process's
batch would. The position is per rank; a run resumes exactly with the same number of ranks.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import partial
from itertools import islice

import numpy as np
import torch

from cache_format.errors import UserError
from cache_format.layout import ROLE_CODES

from .loader_buffers import BatchBuilder, DecodingWindow, Recycler, window_array
from .loader_state import resume_position
from .prefetch import Prefetcher
from .row_filters import RowMetadata, cap_rows, chunk_bounds, default_roles, row_mask
from .window_decode import DENSE, median_norms, start_decode, wait_decoded, within_norm
from .window_plan import chunk_rows, cut_batches, epoch_windows, window_layout, window_perm

__all__ = ["Batch", "ShuffledLoader", "auto_threads"]


@dataclass
class Batch:
    residuals: dict[int, torch.Tensor]  # layer -> (rows, d_model) float32 on the loader's device
    rows: np.ndarray  # global row indices (int64), this rank's batch_size / world_size of them
    epoch: int
    state: dict  # the loader state right after this batch (what a checkpoint saves)

    def __len__(self) -> int:
        return len(self.rows)


def auto_threads() -> int:
    """Decode threads when none are set: the cores this process may use (its share when torchrun
    starts several on a host) less one for the batch gather and the trainer, 1 to 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 2
    cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(16, cores - 1))


class ShuffledLoader:
    """Batches of `batch_size` rows (global across ranks) with residuals of several layers."""

    def __init__(
        self,
        cache: RowMetadata,
        layers,
        batch_size: int,
        seed: int = 0,
        split: str = "train",
        *,
        heldout_fraction: float = 0.01,
        split_seed: int = 0,
        roles: list[str] | None | str = "auto",
        exclude_position0: bool = False,
        exclude_special: bool = False,
        norm_outlier: float = 0.0,
        max_rows: int = 0,
        window_tokens: int = 262_144,
        threads: int = 0,
        prefetch: int = 2,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        max_epochs: int | None = None,
        drop_last: bool = True,
        announce: bool = True,
        dtype: torch.dtype = torch.float32,
    ):
        if split not in ("train", "heldout", "all"):
            raise UserError(f"split {split!r}: use train, heldout or all")
        self.cache = cache
        self.layers = [int(x) for x in layers]
        missing = [x for x in self.layers if x not in list(cache.layers)]
        if missing:
            raise UserError(
                f"layer(s) {missing} not in the cache (it holds {sorted(cache.layers)}); "
                "pass --layers with stored layers or harvest them first"
            )
        if batch_size <= 0 or batch_size % world_size:
            raise UserError(f"batch_size {batch_size} must be a positive multiple of the {world_size} ranks")
        if world_size > 1 and not drop_last:
            raise ValueError("drop_last=False is for single-process loaders: ranks must yield equal batches")
        self.batch_size, self.seed, self.split = batch_size, seed, split
        self.rank, self.world_size = rank, world_size
        self.window_tokens = max(window_tokens, batch_size)
        self.threads, self.prefetch = (threads if threads > 0 else auto_threads()), max(1, prefetch)
        self.device = torch.device(device)
        self.max_epochs, self.drop_last, self.announce = max_epochs, drop_last, announce
        self.norm_outlier = norm_outlier
        self.dtype = dtype  # float32 for training; bfloat16 delivers the stored bits as they are
        if roles == "auto":
            roles = default_roles(cache)
        unknown = [r for r in (roles or []) if r not in ROLE_CODES]
        if unknown:
            raise UserError(f"unknown role(s) {unknown}: use {sorted(ROLE_CODES)}")
        self.roles = roles

        self.bounds = chunk_bounds(cache)
        if split == "all":
            mask = np.ones(cache.n_tokens, dtype=bool)
        else:
            mask = row_mask(
                cache,
                split=split,
                heldout_fraction=heldout_fraction,
                split_seed=split_seed,
                roles=roles,
                exclude_position0=exclude_position0,
                exclude_special=exclude_special,
            )
        cap_rows(mask, max_rows, seed)
        self.mask = np.packbits(mask)
        self.chunk_counts = np.add.reduceat(mask, self.bounds[:-1]) if len(self.bounds) > 1 else np.zeros(0, int)
        self.chunk_counts = np.where(np.diff(self.bounds) > 0, self.chunk_counts, 0)
        stored = np.diff(self.bounds)
        # buffer rows per chunk: decoded whole when mostly eligible, else just its eligible rows
        self._chunk_buffer = np.where(self.chunk_counts >= DENSE * stored, stored, self.chunk_counts)
        self.n_rows = int(mask.sum())
        if self.n_rows == 0:
            raise UserError(
                f"no rows in the {split} split after the filters (roles={roles}); "
                "check train.roles, train.heldout_fraction and the cache's contents"
            )
        if drop_last and batch_size > self.n_rows:
            raise UserError(
                f"batch_size {batch_size} is larger than the {self.n_rows} rows of the {split} split; "
                "lower train.batch_size or harvest more tokens"
            )
        if int((self.chunk_counts > 0).sum()) < world_size:
            raise UserError(
                f"the {split} split spans {int((self.chunk_counts > 0).sum())} cache chunks, fewer than "
                f"the {world_size} ranks that divide them; use fewer ranks or a larger cache"
            )
        self.median_norm = None
        if norm_outlier > 0:
            self.median_norm = median_norms(cache, self.layers, self.chunk_counts, self.bounds, self._chunk_rows)

        self._state = {"epoch": 0, "window": 0, "offset": 0, "batches": 0, "rows": 0}
        self._epoch_seen = 0
        self._plans: dict[int, list[np.ndarray]] = {}
        self._prefetcher: Prefetcher | None = None  # the producer thread, while batches are being made
        self._slots: dict[int, list[np.ndarray | None]] = {}  # per layer: the two window buffers
        self._arrays = Recycler(keep=(self.prefetch + 3) * len(self.layers) * (2 if dtype != torch.bfloat16 else 1))

    # ---- plan ------------------------------------------------------------------------

    def windows(self, epoch: int) -> list[np.ndarray]:
        """The chunk ids of this rank's share of each shuffle window in `epoch` (deterministic in
        seed, epoch and the number of ranks)."""
        if epoch not in self._plans:
            wins = epoch_windows(self.chunk_counts, self.seed, epoch, self.window_tokens, self.rank, self.world_size)
            self._plans = {e: w for e, w in self._plans.items() if e >= epoch - 1}  # current and previous
            self._plans[epoch] = wins
        return self._plans[epoch]

    def window_rows(self, epoch: int, window: int) -> np.ndarray:
        """Global row ids of a window's eligible rows before the norm filter, in plan order."""
        return self._layout(epoch, window)[2]

    def _chunk_rows(self, c: int) -> np.ndarray:
        return chunk_rows(self.mask, self.bounds, c)

    def planned_rows(self, n_batches: int):
        """The global row ids of this rank's next `n_batches` batches, from metadata alone (no residuals read).

        What the loader will yield when no norm filter is set: for planning and mixing checks at
        scales whose residuals are not at hand.
        """
        epoch, window, offset = self._state["epoch"], self._state["window"], self._state["offset"]

        def streams():
            nonlocal epoch, window, offset
            while True:
                rows = self.window_rows(epoch, window)
                yield rows[self._perm(epoch, window, len(rows))][offset:]
                offset = 0
                window += 1
                if window >= len(self.windows(epoch)):
                    epoch, window = epoch + 1, 0

        yield from islice(cut_batches(streams(), self.local_batch), n_batches)

    @property
    def local_batch(self) -> int:
        """Rows of this rank's batches."""
        return self.batch_size // self.world_size

    def _perm(self, epoch: int, window: int, n: int) -> np.ndarray:
        return window_perm(self.seed, epoch, window, n, self.rank, self.world_size)

    # ---- state -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's position after the last batch handed out; `load_state_dict` resumes exactly there."""
        return dict(
            self._state,
            seed=self.seed,
            batch_size=self.batch_size,
            n_rows=self.n_rows,
            rank=self.rank,
            world_size=self.world_size,
        )

    def load_state_dict(self, state: dict) -> None:
        """One rank's state, or {"ranks": [every rank's state]} (what a data-parallel checkpoint holds)."""
        position = resume_position(
            state, rank=self.rank, world_size=self.world_size, seed=self.seed, n_rows=self.n_rows
        )
        self.close()
        self._state = position
        self._epoch_seen = self._state["epoch"]

    # ---- iteration -------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(partial(self._produce, dict(self._state)), self.prefetch, self.threads)
        item = self._prefetcher.queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item is None:
            self.close()
            raise StopIteration
        rows, epoch, state, tensors = item
        residuals = {layer: t.to(self.device, non_blocking=True).to(self.dtype) for layer, t in tensors.items()}
        if epoch > self._epoch_seen and self.announce and self.rank == 0 and (epoch == 1 or (epoch + 1) % 10 == 0):
            more = "; further epochs are announced every 10th" if epoch == 1 else ""
            print(
                f"loader: epoch {epoch + 1} begins with a fresh permutation (the budget exceeds the "
                f"{self.n_rows} rows of the {self.split} split{more})",
                file=sys.stderr,
            )
        self._epoch_seen = max(self._epoch_seen, epoch)
        self._state = state
        return Batch(residuals, rows, epoch, self.state_dict())

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._prefetcher = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- window buffers --------------------------------------------------------------
    # Two buffers ("slots") per layer alternate: the window being served and the next one
    # decoding. A chunk whose rows mostly pass the filters is decoded whole, so the filters cost
    # nothing; a sparse one (say on the held-out split) is decoded aside and its eligible rows
    # compacted, so a buffer never holds more than twice its window's rows.

    def buffer_rows(self, epoch: int) -> int:
        """Rows of a window buffer in `epoch` (the largest window's). The loader holds two per layer:
        2 x rows x d_model x 2 bytes, plus the prefetched batches."""
        return max(int(self._chunk_buffer[w].sum()) for w in self.windows(epoch))

    def _slot(self, layer: int, slot: int, n: int, epoch: int) -> np.ndarray:
        """Rows [0, n) of a layer's reusable buffer `slot`, sized for the largest window of the epoch."""
        slots = self._slots.setdefault(layer, [None, None])
        if slots[slot] is None or len(slots[slot]) < n:
            slots[slot] = None  # let the old one go before the new one is allocated
            slots[slot] = window_array((max(n, self.buffer_rows(epoch)), self.cache.d_model))
        return slots[slot][:n]

    def _layout(self, epoch: int, window: int):
        """Per chunk (id, buffer offset, local eligible rows or None when decoded whole), the buffer
        rows, and the global rows and buffer positions of the eligible rows in plan order."""
        return window_layout(self.windows(epoch)[window], self.mask, self.bounds, self._chunk_buffer)

    def _decode(self, pf: Prefetcher, epoch: int, window: int, slot: int) -> DecodingWindow:
        """Start decoding a window into `slot`'s buffers; the pool's threads do the work."""
        plan, n, rows, pos = self._layout(epoch, window)
        bufs = {layer: self._slot(layer, slot, n, epoch) for layer in self.layers}
        return DecodingWindow(epoch, window, bufs, start_decode(pf.pool, self.cache, plan, n, bufs), rows, pos)

    def _serve(self, pf: Prefetcher, win: DecodingWindow) -> tuple[np.ndarray, np.ndarray]:
        """Wait for a window's decode, apply the norm filter, and shuffle: (rows, buffer positions)."""
        wait_decoded(win.futures, pf.stop)
        rows, pos = win.rows, win.pos
        if self.median_norm is not None:  # the norm filter changes the row count, so the shuffle follows it
            keep = within_norm(win.buffers, pos, self.norm_outlier, self.median_norm)
            rows, pos = rows[keep], pos[keep]
        perm = self._perm(win.epoch, win.window, len(rows))
        return rows[perm], pos[perm]

    # ---- the producer thread ---------------------------------------------------------

    def _produce(self, state: dict, pf: Prefetcher) -> None:
        """Batches from `state` on, into the prefetcher's queue, then None (after max_epochs)."""
        epoch, window, offset = state["epoch"], state["window"], state["offset"]
        batches, seen = state["batches"], state["rows"]
        B = self.local_batch
        building: BatchBuilder | None = None
        slot = 0
        cur = self._decode(pf, epoch, window, slot)
        while not pf.stop.is_set():
            f_epoch, f_window = (epoch, window + 1) if window + 1 < len(self.windows(epoch)) else (epoch + 1, 0)
            last_epoch = self.max_epochs is not None and f_epoch >= self.max_epochs
            # the following window decodes into the other slot while this one is served: every
            # batch row of the window before was gathered out of it already
            nxt = None if last_epoch else self._decode(pf, f_epoch, f_window, 1 - slot)
            rows, pos = self._serve(pf, cur)
            p = offset
            while p < len(rows) and not pf.stop.is_set():
                if building is None:
                    building = BatchBuilder(B, self.cache.d_model, self.layers, self.device, self._arrays, self.dtype)
                take = min(B - building.n, len(rows) - p)
                building.add(rows[p : p + take], cur.buffers, pos[p : p + take])
                p += take
                if building.n == B:
                    nstate = (
                        {"epoch": epoch, "window": window, "offset": p}
                        if p < len(rows)
                        else {"epoch": f_epoch, "window": f_window, "offset": 0}
                    )
                    batches, seen = batches + 1, seen + self.batch_size
                    nstate.update(batches=batches, rows=seen)
                    if not pf.put(building.result(epoch, nstate)):
                        return
                    building = None
            offset = 0
            if last_epoch:
                if building is not None and building.n and not self.drop_last and not pf.stop.is_set():
                    n = building.n
                    nstate = {"epoch": f_epoch, "window": 0, "offset": 0, "batches": batches + 1, "rows": seen + n}
                    pf.put(building.result(epoch, nstate))
                pf.put(None)
                return
            del rows, pos
            cur, slot = nxt, 1 - slot
            epoch, window = f_epoch, f_window
