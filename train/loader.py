"""The shuffled loader: cache chunks in random order, through a shuffle window, into batches.

Which rows pass and which batch holds which rows is `loader_plan` (a pure function of seed,
epoch and ranks, so batches do not depend on thread timing). This module runs the plan: a
producer thread (`cache_format.concurrency.QueueThread`) has a pool of decode threads decode
the chunks of the current and the next window straight into two reused buffers per layer,
applies the norm-outlier filter per window as the rows are decoded (the one filter that reads
residuals, against median norms drawn once from the first chunks of a fixed order), and
gathers each batch's shuffled rows out of them into arrays of its own, recycled once the
consumer drops the batch: the one copy the shuffle needs. Batches never view the window
buffers, so consumers may keep them.

The loader's position is (epoch, window, offset), and resuming re-reads one window: the cost is
independent of how much was consumed. With N ranks each rank decodes only its own chunks (every
N-th of the epoch's order), shuffles its share of each window and yields batches of
batch_size / N rows from it, so a global batch draws from the whole window as one process's
batch would. The position is per rank; resuming with another number of ranks, another seed or
another row selection would read other rows, so each is a one-line error.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice

import numpy as np
import torch

from cache_format.concurrency import QueueThread
from cache_format.errors import UserError
from cache_format.layout import bits_to_torch, role_codes

from .loader_plan import (
    RowMetadata,
    cap_rows,
    chunk_bounds,
    chunk_rows,
    cut_batches,
    default_roles,
    epoch_windows,
    row_mask,
    window_layout,
    window_perm,
)

# -- memory: window buffers, recycled batch arrays, the gather ---------------------------------


def window_array(shape: tuple[int, int]) -> np.ndarray:
    """An uninitialized uint16 array on transparent huge pages where the OS offers them (Linux):
    batches gather rows at random from the whole window, and with 4 KiB pages nearly every row
    is a TLB miss (a 2 MiB page makes the gather about 15% faster)."""
    nbytes = shape[0] * shape[1] * 2
    if not hasattr(mmap, "MADV_HUGEPAGE") or nbytes < (16 << 20):
        return np.empty(shape, np.uint16)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(m, np.uint16).reshape(shape)  # the array keeps the mapping alive


@dataclass
class DecodingWindow:
    """A window being decoded into its slot's buffers: the eligible rows and their buffer positions."""

    epoch: int
    window: int
    buffers: dict[int, np.ndarray]
    futures: list
    rows: np.ndarray
    pos: np.ndarray


class Recycler:
    """Batch arrays handed out again once nothing views them any more: a new 8-40 MiB array costs
    a page fault and a zeroing per page, about a tenth of a batch's decode. Every user gets its
    own view of the array and the recycler keeps weak references to those views (reference
    counts would be a CPython detail)."""

    def __init__(self, keep: int):
        self.keep, self.entries = keep, []  # [array, weak references to the views lent out]

    def lend(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A view of a free array of this shape and dtype (uninitialized), held until the view dies."""
        for a, views in self.entries:
            if a.shape == shape and a.dtype == dtype and all(r() is None for r in views):
                views.clear()
                return self.view(a, views)
        self.entries = self.entries[-(self.keep - 1) :] if self.keep > 1 else []
        self.entries.append((np.empty(shape, dtype), []))
        return self.view(*self.entries[-1])

    @staticmethod
    def view(a: np.ndarray, views: list, dtype=None, rows: slice = slice(None)) -> np.ndarray:
        v = (a.view(dtype) if dtype is not None else a.view())[rows]
        views.append(weakref.ref(v))
        return v

    def keep_for(self, lent: np.ndarray, dtype, rows: slice) -> np.ndarray:
        """Rows of a lent array as a new view for a consumer (torch keeps exactly this object alive)."""
        for a, views in self.entries:
            if lent.base is a:
                return self.view(a, views, dtype, rows)
        raise AssertionError("keep_for on an array this recycler did not lend")


class BatchBuilder:
    """A batch being gathered, piece by piece as windows are served."""

    def __init__(
        self, size: int, d_model: int, layers: list[int], device: torch.device, arrays: Recycler, dtype: torch.dtype
    ):
        self.arrays, self.dtype = arrays, dtype
        shape = (size, d_model)
        if device.type == "cuda":  # gathered into pinned memory, converted on the GPU
            self.out = {layer: torch.empty(shape, dtype=torch.bfloat16, pin_memory=True) for layer in layers}
        else:
            self.out = {layer: arrays.lend(shape, np.uint16) for layer in layers}
        self.rows: list[np.ndarray] = []
        self.n = 0

    def add(self, rows: np.ndarray, buffers: dict[int, np.ndarray], pos: np.ndarray) -> None:
        for layer, buf in buffers.items():
            out = self.out[layer][self.n : self.n + len(rows)]
            if isinstance(out, np.ndarray):  # numpy's gather: one thread, no OpenMP pool spinning
                np.take(buf, pos, axis=0, out=out, mode="clip")  # "raise" would buffer
            else:
                torch.index_select(bits_to_torch(buf), 0, torch.from_numpy(pos), out=out)
        self.rows.append(rows)
        self.n += len(rows)

    def result(self, epoch: int, state: dict):
        """The queue item for the rows gathered so far (float32 on the CPU when asked)."""
        n = self.n
        out = {}
        for layer, t in self.out.items():
            if isinstance(t, np.ndarray):
                bits = self.arrays.keep_for(t, np.int16, slice(0, n))  # lent to the batch
                t = torch.from_numpy(bits).view(torch.bfloat16)
                if self.dtype != torch.bfloat16:
                    t = torch.from_numpy(self.arrays.lend(tuple(t.shape), np.float32)).copy_(t)
            else:
                t = t[:n]
            out[layer] = t
        return np.concatenate(self.rows), epoch, state, out


# -- decoding a window, and the norm filter ----------------------------------------------------

DENSE = 0.5  # decode a chunk whole into the window when at least this share of its rows is eligible


def decode_chunk(cache, layer: int, c: int, dest: np.ndarray, local: np.ndarray | None) -> None:
    """Chunk c of `layer` into `dest`: whole and in place, or just its `local` rows."""
    if local is None:
        cache.read_chunk(layer, c, out=dest)
    else:
        dest[:] = cache.read_chunk(layer, c).view(np.uint16)[local]


def start_decode(pool: ThreadPoolExecutor, cache, plan: list, n: int, buffers: dict[int, np.ndarray]) -> list[Future]:
    """Submit every chunk of a window's `plan` (id, buffer offset, local rows) for every layer."""
    futures = []
    for layer, buf in buffers.items():
        for i, (c, at, local) in enumerate(plan):
            end = plan[i + 1][1] if i + 1 < len(plan) else n
            futures.append(pool.submit(decode_chunk, cache, layer, c, buf[at:end], local))
    return futures


def wait_decoded(futures: list[Future], stop: threading.Event) -> None:
    """Wait for a window's decode (a failure raises here), giving up when the loader stops."""
    for f in futures:
        while not stop.is_set():
            try:
                f.result(timeout=0.05)
                break
            except TimeoutError:
                pass


def median_norms(
    cache, layers: list[int], chunk_counts: np.ndarray, bounds: np.ndarray, chunk_rows: Callable[[int], np.ndarray]
) -> dict[int, float]:
    """Median row norm per layer, from the first chunks of a fixed order (seed-independent)."""
    out = {}
    for layer in layers:
        norms, got = [], 0
        for c in np.flatnonzero(chunk_counts):
            c = int(c)
            x = cache.read_chunk(layer, c)[chunk_rows(c) - int(bounds[c])]  # the chunk's eligible rows
            norms.append(np.linalg.norm(x.astype(np.float32), axis=1))
            got += len(x)
            if got >= 16384:
                break
        out[layer] = float(np.median(np.concatenate(norms)))
    return out


def within_norm(buffers: dict[int, np.ndarray], pos: np.ndarray, norm_outlier: float, median: dict[int, float]):
    """Which of the rows at buffer positions `pos` have a norm within norm_outlier x the layer's
    median in every layer (a bool array)."""
    keep = np.ones(len(pos), dtype=bool)
    for layer, buf in buffers.items():
        t = bits_to_torch(buf)
        norms = torch.cat([t[a : a + 8192].float().norm(dim=1) for a in range(0, len(t), 8192)])
        keep &= (norms[torch.from_numpy(pos)] <= norm_outlier * median[layer]).numpy()
    return keep


# -- the saved position ------------------------------------------------------------------------

POSITION = ("epoch", "window", "offset", "batches", "rows")


def resume_position(state: dict, *, rank: int, world_size: int, seed: int, n_rows: int) -> dict[str, int]:
    """This rank's position out of one rank's state or {"ranks": [every rank's state]} (what a
    data-parallel checkpoint holds)."""
    if "ranks" in state:
        if len(state["ranks"]) != world_size:
            raise UserError(
                f"the checkpoint was written by {len(state['ranks'])} ranks and this run has "
                f"{world_size}; resume with the same number of processes "
                "or start over with --fresh"
            )
        state = state["ranks"][rank]
    if state.get("world_size", 1) != world_size:
        raise UserError(
            f"the saved loader state belongs to a run of {state.get('world_size', 1)} ranks, not "
            f"{world_size}; resume with the same number of processes or start over with --fresh"
        )
    if state.get("seed", seed) != seed or state.get("n_rows", n_rows) != n_rows:
        raise UserError(
            "the saved loader state belongs to another seed or cache selection; "
            "re-run with the original settings or start over with --fresh"
        )
    return {k: int(state[k]) for k in POSITION}


# -- the loader --------------------------------------------------------------------------------

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
        roles: list[str | int] | None | str = "auto",  # names or codes; auto = loader_plan.default_roles
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
        roles = default_roles(cache) if roles == "auto" else (None if roles is None else role_codes(roles))
        self.roles = roles  # role codes, None = every role

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
        self._prefetcher: QueueThread | None = None  # the producer thread, while batches are being made
        self._pool: ThreadPoolExecutor | None = None  # its decode threads
        self._slots: dict[int, list[np.ndarray | None]] = {}  # per layer: the two window buffers
        self._allocations = 0  # window buffers allocated (memory())
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
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="loader-read")
            self._prefetcher = QueueThread.producer(
                partial(self._produce, dict(self._state)), self.prefetch, name="loader-batches"
            )
        try:
            item = self._prefetcher.get()
        except BaseException:
            self.close()
            raise
        if item is QueueThread.END:
            self.close()
            raise StopIteration
        rows, epoch, state, tensors = item
        residuals = {layer: t.to(self.device, non_blocking=True).to(self.dtype) for layer, t in tensors.items()}
        if epoch > self._epoch_seen and self.announce and self.rank == 0 and (epoch == 1 or (epoch + 1) % 10 == 0):
            more = "; further epochs are announced every 10th" if epoch == 1 else ""
            print(
                f"loader: epoch {epoch + 1} begins with a new permutation (the budget exceeds the "
                f"{self.n_rows} rows of the {self.split} split{more})",
                file=sys.stderr,
            )
        self._epoch_seen = max(self._epoch_seen, epoch)
        self._state = state
        return Batch(residuals, rows, epoch, self.state_dict())

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._pool.shutdown(wait=True, cancel_futures=True)
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

    def memory(self) -> dict[str, int]:
        """The window buffers held now (bytes), and how many were allocated so far: two per layer,
        grown at most once per epoch (what bench_loader reports against the memory target)."""
        held = [b for v in self._slots.values() for b in v if b is not None]
        return {"window_buffer_bytes": sum(b.nbytes for b in held), "window_buffer_allocations": self._allocations}

    def _slot(self, layer: int, slot: int, n: int, epoch: int) -> np.ndarray:
        """Rows [0, n) of a layer's reusable buffer `slot`, sized for the largest window of the epoch."""
        slots = self._slots.setdefault(layer, [None, None])
        if slots[slot] is None or len(slots[slot]) < n:
            slots[slot] = None  # let the old one go before the new one is allocated
            slots[slot] = window_array((max(n, self.buffer_rows(epoch)), self.cache.d_model))
            self._allocations += 1
        return slots[slot][:n]

    def _layout(self, epoch: int, window: int):
        """Per chunk (id, buffer offset, local eligible rows or None when decoded whole), the buffer
        rows, and the global rows and buffer positions of the eligible rows in plan order."""
        return window_layout(self.windows(epoch)[window], self.mask, self.bounds, self._chunk_buffer)

    def _decode(self, pf: QueueThread, epoch: int, window: int, slot: int) -> DecodingWindow:
        """Start decoding a window into `slot`'s buffers; the pool's threads do the work."""
        plan, n, rows, pos = self._layout(epoch, window)
        bufs = {layer: self._slot(layer, slot, n, epoch) for layer in self.layers}
        return DecodingWindow(epoch, window, bufs, start_decode(self._pool, self.cache, plan, n, bufs), rows, pos)

    def _serve(self, pf: QueueThread, win: DecodingWindow) -> tuple[np.ndarray, np.ndarray]:
        """Wait for a window's decode, apply the norm filter, and shuffle: (rows, buffer positions)."""
        wait_decoded(win.futures, pf.stopped)
        rows, pos = win.rows, win.pos
        if self.median_norm is not None:  # the norm filter changes the row count, so the shuffle follows it
            keep = within_norm(win.buffers, pos, self.norm_outlier, self.median_norm)
            rows, pos = rows[keep], pos[keep]
        perm = self._perm(win.epoch, win.window, len(rows))
        return rows[perm], pos[perm]

    # ---- the producer thread ---------------------------------------------------------

    def _produce(self, state: dict, pf: QueueThread) -> None:
        """Batches from `state` on, into the producer's queue; returns after max_epochs (the end of the stream)."""
        epoch, window, offset = state["epoch"], state["window"], state["offset"]
        batches, seen = state["batches"], state["rows"]
        B = self.local_batch
        building: BatchBuilder | None = None
        slot = 0
        cur = self._decode(pf, epoch, window, slot)
        while not pf.stopped.is_set():
            f_epoch, f_window = (epoch, window + 1) if window + 1 < len(self.windows(epoch)) else (epoch + 1, 0)
            last_epoch = self.max_epochs is not None and f_epoch >= self.max_epochs
            # the following window decodes into the other slot while this one is served: every
            # batch row of the window before was gathered out of it already
            nxt = None if last_epoch else self._decode(pf, f_epoch, f_window, 1 - slot)
            rows, pos = self._serve(pf, cur)
            p = offset
            while p < len(rows) and not pf.stopped.is_set():
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
                if building is not None and building.n and not self.drop_last and not pf.stopped.is_set():
                    n = building.n
                    nstate = {"epoch": f_epoch, "window": 0, "offset": 0, "batches": batches + 1, "rows": seen + n}
                    pf.put(building.result(epoch, nstate))
                return
            del rows, pos
            cur, slot = nxt, 1 - slot
            epoch, window = f_epoch, f_window
