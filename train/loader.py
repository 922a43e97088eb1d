"""The shuffled loader: cache chunks in random order, through a shuffle window, into batches.

The plan is a pure function of (seed, epoch), so batches do not depend on thread timing:

- each epoch permutes the storage chunks (`default_rng([seed, epoch])`);
- consecutive chunks of that order form a *window* of at least `window_tokens` eligible rows
  (the shuffle buffer); a window's rows are permuted with `default_rng([seed, epoch, window])`;
- the batches are consecutive slices of the concatenated window streams.

The loader's position is therefore (epoch, window, offset), and resuming re-reads one window:
the cost is independent of how much was consumed. Background threads decode the chunks of the
current and the next window (prefetch) straight into shuffled window buffers of the delivered
dtype, so a CPU batch is a slice of one (no copy); two buffers per layer are reused.

Rows enter a window only if they pass the filters: the train/held-out split (hashed sequence
id, `train.split`), the roles (thinking + answer by default on rollout caches, everything on
corpus text), optional exclusion of position 0, special tokens and norm outliers, and an
optional cap that keeps a random sample of rows. Metadata filters are planned up front into
a row bitmask; the norm filter is applied per window as the rows are decoded.

With several ranks every rank follows the same global plan and takes its slice of each
global batch, so a run resumes identically with any number of ranks.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from cache_format.errors import UserError

from .split import heldout_score

ROLE_CODES = {"text": 0, "prompt": 1, "thinking": 2, "answer": 3}
_META_SLICE = 1 << 20  # rows of metadata read at once while planning


@dataclass
class Batch:
    residuals: dict[int, torch.Tensor]  # layer -> (rows, d_model) float32 on the loader's device
    rows: np.ndarray  # global row indices (int64), this rank's slice
    epoch: int
    state: dict  # the loader state right after this batch (what a checkpoint saves)

    def __len__(self) -> int:
        return len(self.rows)


def _bf16_to_torch(arr: np.ndarray) -> torch.Tensor:
    """An ml_dtypes bfloat16 ndarray as a torch.bfloat16 tensor, without a copy."""
    return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)


def _chunk_bounds(cache) -> np.ndarray:
    b = np.asarray(cache.chunk_bounds(), dtype=np.int64)
    if b.ndim == 2:  # [(start, stop), ...]
        b = np.concatenate([b[:, 0], b[-1:, 1]]) if len(b) else np.zeros(1, np.int64)
    return b


def special_token_ids(cache) -> np.ndarray:
    """Ids of the cache tokenizer's special tokens (BOS/EOS/chat markers)."""
    try:
        tok = cache.tokenizer()
        ids = [i for i, t in tok.get_added_tokens_decoder().items() if getattr(t, "special", False)]
    except Exception as e:  # no tokenizer stored: the filter cannot be honoured
        raise UserError(f"exclude_special needs the cache's tokenizer ({e}); set train.exclude_special=false") from None
    return np.asarray(sorted(ids), dtype=np.int64)


def row_mask(cache, *, split: str, heldout_fraction: float, split_seed: int, roles=None,
             exclude_position0: bool = False, exclude_special: bool = False) -> np.ndarray:
    """The metadata filters over every row of the cache, as a bool array."""
    n = cache.n_tokens
    mask = np.zeros(n, dtype=bool)
    role_codes = None if roles is None else np.asarray([ROLE_CODES[r] for r in roles], dtype=np.int8)
    special = special_token_ids(cache) if exclude_special else None
    for lo in range(0, n, _META_SLICE):
        hi = min(n, lo + _META_SLICE)
        held = heldout_score(np.asarray(cache.seq_ids[lo:hi]), split_seed) < heldout_fraction
        m = held if split == "heldout" else ~held
        if role_codes is not None:
            m &= np.isin(np.asarray(cache.roles[lo:hi]), role_codes)
        if exclude_position0:
            m &= np.asarray(cache.positions[lo:hi]) != 0
        if special is not None and len(special):
            m &= ~np.isin(np.asarray(cache.tokens[lo:hi]), special)
        mask[lo:hi] = m
    return mask


def default_roles(cache) -> list[str] | None:
    """thinking + answer on rollout caches (any non-text role present), everything on corpus."""
    n = cache.n_tokens
    for lo in range(0, n, _META_SLICE):
        if np.any(np.asarray(cache.roles[lo:min(n, lo + _META_SLICE)]) != ROLE_CODES["text"]):
            return ["thinking", "answer"]
    return None


class ShuffledLoader:
    """Batches of `batch_size` rows (global across ranks) with residuals of several layers."""

    def __init__(self, cache, layers, batch_size: int, seed: int = 0, split: str = "train", *,
                 heldout_fraction: float = 0.01, split_seed: int = 0, roles: list[str] | None | str = "auto",
                 exclude_position0: bool = False, exclude_special: bool = False, norm_outlier: float = 0.0,
                 max_rows: int = 0, window_tokens: int = 262_144, threads: int = 4, prefetch: int = 2,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                 max_epochs: int | None = None, drop_last: bool = True, announce: bool = True,
                 dtype: torch.dtype = torch.float32):
        if split not in ("train", "heldout", "all"):
            raise UserError(f"split {split!r}: use train, heldout or all")
        self.cache = cache
        self.layers = [int(x) for x in layers]
        missing = [x for x in self.layers if x not in list(cache.layers)]
        if missing:
            raise UserError(f"layer(s) {missing} not in the cache (it holds {sorted(cache.layers)}); "
                            "pass --layers with stored layers or harvest them first")
        if batch_size <= 0 or batch_size % world_size:
            raise UserError(f"batch_size {batch_size} must be a positive multiple of the {world_size} ranks")
        self.batch_size, self.seed, self.split = batch_size, seed, split
        self.rank, self.world_size = rank, world_size
        self.window_tokens = max(window_tokens, batch_size)
        self.threads, self.prefetch = max(1, threads), max(1, prefetch)
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

        self.bounds = _chunk_bounds(cache)
        if split == "all":
            mask = np.ones(cache.n_tokens, dtype=bool)
        else:
            mask = row_mask(cache, split=split, heldout_fraction=heldout_fraction, split_seed=split_seed,
                            roles=roles, exclude_position0=exclude_position0, exclude_special=exclude_special)
        if max_rows and mask.sum() > max_rows:  # keep a random sample of exactly max_rows rows
            cand = np.flatnonzero(mask)
            score = heldout_score(cand, seed ^ 0x5EED)
            keep = cand[np.argpartition(score, max_rows - 1)[:max_rows]]
            mask[:] = False
            mask[keep] = True
        self.mask = np.packbits(mask)
        self.chunk_counts = np.add.reduceat(mask, self.bounds[:-1]) if len(self.bounds) > 1 else np.zeros(0, int)
        self.chunk_counts = np.where(np.diff(self.bounds) > 0, self.chunk_counts, 0)
        self.n_rows = int(mask.sum())
        if self.n_rows == 0:
            raise UserError(f"no rows in the {split} split after the filters (roles={roles}); "
                            "check train.roles, train.heldout_fraction and the cache's contents")
        if drop_last and batch_size > self.n_rows:
            raise UserError(f"batch_size {batch_size} is larger than the {self.n_rows} rows of the {split} split; "
                            "lower train.batch_size or harvest more tokens")
        self.median_norm = self._median_norms() if norm_outlier > 0 else None

        self._state = {"epoch": 0, "window": 0, "offset": 0, "batches": 0, "rows": 0}
        self._epoch_seen = 0
        self._plans: dict[int, list[np.ndarray]] = {}
        self._thread = None
        self._queue = None
        self._stop = threading.Event()
        self._pool = None
        self._bases: dict[int, list[np.ndarray]] = {}  # per layer: the window buffers (at most two live)

    # ---- plan ------------------------------------------------------------------------

    def windows(self, epoch: int) -> list[np.ndarray]:
        """The chunk ids of each shuffle window in `epoch` (deterministic in seed and epoch)."""
        if epoch not in self._plans:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunk_counts))
            order = order[self.chunk_counts[order] > 0]
            cum = np.cumsum(self.chunk_counts[order])
            wins, start, base = [], 0, 0
            for i, c in enumerate(cum):
                if c - base >= self.window_tokens:
                    wins.append(order[start:i + 1])
                    start, base = i + 1, c
            if start < len(order):
                if wins and cum[-1] - base < self.window_tokens // 2:
                    wins[-1] = np.concatenate([wins[-1], order[start:]])  # no tiny last window
                else:
                    wins.append(order[start:])
            self._plans = {e: w for e, w in self._plans.items() if e >= epoch - 1}  # current and previous
            self._plans[epoch] = wins
        return self._plans[epoch]

    def window_rows(self, epoch: int, window: int) -> np.ndarray:
        """Global row ids of a window's eligible rows before the norm filter, in plan order."""
        parts = [self._chunk_rows(c) for c in self.windows(epoch)[window]]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _chunk_rows(self, c: int) -> np.ndarray:
        lo, hi = int(self.bounds[c]), int(self.bounds[c + 1])
        # unpack only the bytes covering this chunk
        b0, b1 = lo // 8, (hi + 7) // 8
        bits = np.unpackbits(self.mask[b0:b1])[lo - b0 * 8: hi - b0 * 8].astype(bool)
        return lo + np.flatnonzero(bits)

    def planned_rows(self, n_batches: int):
        """The global row ids of the next `n_batches` batches, from metadata alone (no residuals read).

        What the loader will yield when no norm filter is set: for planning and mixing checks at
        scales whose residuals are not at hand.
        """
        epoch, window, offset = self._state["epoch"], self._state["window"], self._state["offset"]
        pending, made = [], 0
        while made < n_batches:
            rows = self.window_rows(epoch, window)
            rows = rows[self._perm(epoch, window, len(rows))][offset:]
            offset = 0
            while len(rows) and made < n_batches:
                need = self.batch_size - sum(len(p) for p in pending)
                pending.append(rows[:need])
                rows = rows[need:]
                if sum(len(p) for p in pending) == self.batch_size:
                    yield np.concatenate(pending)
                    pending, made = [], made + 1
            window += 1
            if window >= len(self.windows(epoch)):
                epoch, window = epoch + 1, 0

    def _perm(self, epoch: int, window: int, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, window, 1]).permutation(n)

    def _median_norms(self) -> dict[int, float]:
        """Median row norm per layer, from the first chunks of a fixed order (seed-independent)."""
        out = {}
        for layer in self.layers:
            norms, got = [], 0
            for c in np.flatnonzero(self.chunk_counts):
                x = self._read(layer, int(c))
                norms.append(np.linalg.norm(x.astype(np.float32), axis=1))
                got += len(x)
                if got >= 16384:
                    break
            out[layer] = float(np.median(np.concatenate(norms)))
        return out

    def _read(self, layer: int, c: int) -> np.ndarray:
        """Eligible rows of chunk c (bf16 ndarray); the batch path decodes into window buffers instead."""
        lo = int(self.bounds[c])
        arr = self.cache.read_chunk(layer, c)
        return arr[self._chunk_rows(c) - lo]

    # ---- state -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Position after the last batch handed out; `load_state_dict` resumes exactly there."""
        return dict(self._state, seed=self.seed, batch_size=self.batch_size, n_rows=self.n_rows)

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed or state.get("n_rows", self.n_rows) != self.n_rows:
            raise UserError("the saved loader state belongs to another seed or cache selection; "
                            "re-run with the original settings or start over with --fresh")
        self.close()
        self._state = {k: int(state[k]) for k in ("epoch", "window", "offset", "batches", "rows")}
        self._epoch_seen = self._state["epoch"]

    # ---- iteration -------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            self._start()
        item = self._queue.get()
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
            print(f"loader: epoch {epoch + 1} begins with a fresh permutation (the budget exceeds the "
                  f"{self.n_rows} rows of the {self.split} split{more})", file=sys.stderr)
        self._epoch_seen = max(self._epoch_seen, epoch)
        self._state = state
        return Batch(residuals, rows, epoch, dict(state))

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="loader-read")
        self._thread = threading.Thread(target=self._produce, args=(dict(self._state),), daemon=True,
                                        name="loader-batches")
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.05)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # ---- window buffers --------------------------------------------------------------
    # CPU batches are zero-copy slices of a window buffer, so the decode workers write each row
    # once, straight into its shuffled position and in the delivered dtype: bf16 bits as stored,
    # or for float32 the bf16 bits into the high halves of float32 words whose low halves stay
    # zero (exact: a bf16 is the top half of the float32 with the same value).

    @property
    def _wide(self) -> bool:
        return self.dtype == torch.float32 and self.device.type == "cpu"

    def _buffer(self, layer: int, n: int, force: bool) -> np.ndarray | None:
        """A window buffer of n rows: a released one that no batch still views, else a new one while
        fewer than two exist (the loader's memory is two windows per layer), else None (try later)
        unless `force`. Reuse matters: fresh pages cost a fault and a zeroing per row."""
        bases = self._bases.setdefault(layer, [])
        for base in bases:
            if len(base) >= n and sys.getrefcount(base) <= 3:  # held only by `bases`, `base` and the call
                return base[:n]
        if len(bases) >= 2 and not force:
            return None
        if len(bases) >= 2:  # a consumer keeps old batches alive: they keep their buffer, we let go of it
            del bases[0]
        m, d = n + n // 8, self.cache.d_model
        bases.append(np.zeros((m, d, 2), np.uint16) if self._wide else np.empty((m, d), np.uint16))
        return bases[-1][:n]

    def _tensor(self, bits: np.ndarray) -> torch.Tensor:
        """Window rows as a tensor of the window's dtype (float32 if wide, else bfloat16), no copy."""
        if bits.ndim == 3:
            return torch.from_numpy(bits.view(np.float32)[..., 0])
        return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)

    def _read_into(self, layer: int, c: int, buf: np.ndarray, dest: np.ndarray | None, at: int) -> None:
        """Decode chunk c's eligible rows into the window buffer: at their shuffled positions `dest`
        (so batches are contiguous slices), or contiguously from `at` when a norm filter must run first."""
        arr = self.cache.read_chunk(layer, c).view(np.uint16)
        n = int(self.chunk_counts[c])
        if n != len(arr):
            arr = arr[self._chunk_rows(c) - int(self.bounds[c])]
        target = buf[..., 1] if buf.ndim == 3 else buf
        if dest is None:
            target[at:at + n] = arr
        else:
            target[dest] = arr

    def _submit_window(self, epoch: int, window: int, force: bool = True):
        """Start decoding a window into buffers; None if no buffer is free yet (and not `force`)."""
        chunks = [int(c) for c in self.windows(epoch)[window]]
        counts = self.chunk_counts[chunks]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        n = int(starts[-1])
        bufs = {}
        for layer in self.layers:
            bufs[layer] = self._buffer(layer, n, force)
            if bufs[layer] is None:
                return None
        shuffle_now = self.median_norm is None
        dest = None
        if shuffle_now:  # window row i lands at position dest[i] of the shuffled stream
            dest = np.empty(n, np.int64)
            dest[self._perm(epoch, window, n)] = np.arange(n)
        futures = [self._pool.submit(self._read_into, layer, c, bufs[layer],
                                     None if dest is None else dest[starts[i]:starts[i + 1]], int(starts[i]))
                   for layer in self.layers for i, c in enumerate(chunks)]
        return bufs, futures, shuffle_now

    def _collect_window(self, epoch: int, window: int, submitted, poll=lambda: None):
        """A window's rows and residual bits per layer, both in shuffled order; `poll` runs while waiting."""
        bufs, futures, shuffled = submitted
        for f in futures:
            while not self._stop.is_set():
                try:
                    f.result(timeout=0.002)
                    break
                except TimeoutError:
                    poll()
        rows = self.window_rows(epoch, window)
        if not shuffled:  # the norm filter changes the row count, so the shuffle follows it
            keep = np.ones(len(rows), dtype=bool)
            for layer, buf in bufs.items():
                for a in range(0, len(buf), 8192):
                    x = self._tensor(buf[a:a + 8192]).float()
                    keep[a:a + 8192] &= (x.norm(dim=1) <= self.norm_outlier * self.median_norm[layer]).numpy()
            perm = np.flatnonzero(keep)[self._perm(epoch, window, int(keep.sum()))]
            return rows[perm], {layer: buf[perm] for layer, buf in bufs.items()}
        return rows[self._perm(epoch, window, len(rows))], bufs

    # ---- the producer thread ---------------------------------------------------------

    def _produce(self, state: dict) -> None:
        try:
            self._produce_loop(state)
        except BaseException as e:  # hand the failure to the consumer
            self._put(e)

    def _produce_loop(self, state: dict) -> None:
        epoch, window, offset = state["epoch"], state["window"], state["offset"]
        batches, seen = state["batches"], state["rows"]
        B, lo_r, hi_r = self.batch_size, self.rank * self.batch_size // self.world_size, \
            (self.rank + 1) * self.batch_size // self.world_size
        pending: list[tuple[np.ndarray, dict, int]] = []  # (rows, data, start) pieces of the next batch
        pending_n = 0
        cur, nxt = self._submit_window(epoch, window), None
        while not self._stop.is_set():
            f_epoch, f_window = (epoch, window + 1) if window + 1 < len(self.windows(epoch)) else (epoch + 1, 0)
            last_epoch = self.max_epochs is not None and f_epoch >= self.max_epochs
            # the following window is decoded into the buffer of the one before as soon as no batch
            # views it any more: the last batch of a window is a copy, so that happens when the
            # consumer takes it, and the decoders move on while this window still decodes

            def want_next(f_epoch=f_epoch, f_window=f_window, last_epoch=last_epoch):
                nonlocal nxt
                if not last_epoch and nxt is None:
                    nxt = self._submit_window(f_epoch, f_window, force=False)

            want_next()
            rows, data = self._collect_window(epoch, window, cur, want_next)
            cur = None
            pos = offset
            while pos < len(rows) and not self._stop.is_set():
                want_next()
                take = min(B - pending_n, len(rows) - pos)
                pending.append((rows[pos:pos + take], data, pos))
                pending_n += take
                pos += take
                if pending_n == B:
                    nstate = self._advance(epoch, window, pos, len(rows), f_epoch, f_window)
                    batches, seen = batches + 1, seen + B
                    nstate.update(batches=batches, rows=seen)
                    if not self._emit(pending, lo_r, hi_r, epoch, nstate, copy=pos == len(rows)):
                        return
                    pending, pending_n = [], 0
            offset = 0
            if last_epoch:
                if pending_n and not self.drop_last:
                    nstate = {"epoch": f_epoch, "window": 0, "offset": 0, "batches": batches + 1, "rows": seen + pending_n}
                    lo = self.rank * pending_n // self.world_size
                    hi = (self.rank + 1) * pending_n // self.world_size
                    self._emit(pending, lo, hi, epoch, nstate)
                self._put(None)
                return
            del rows, data
            while nxt is None and not self._stop.is_set():  # the consumer is still on the window before
                want_next()
                if nxt is None and self._queue.empty():  # ...and keeps its batches: they keep that buffer
                    nxt = self._submit_window(f_epoch, f_window)
                elif nxt is None:
                    time.sleep(0.001)
            cur, nxt = nxt, None
            epoch, window = f_epoch, f_window

    def _advance(self, epoch, window, pos, n, f_epoch, f_window) -> dict:
        if pos < n:
            return {"epoch": epoch, "window": window, "offset": pos}
        return {"epoch": f_epoch, "window": f_window, "offset": 0}

    def _emit(self, pieces, lo: int, hi: int, epoch: int, state: dict, copy: bool = False) -> bool:
        """Hand over this rank's slice [lo, hi) of the pending rows."""
        rows = np.concatenate([p[0] for p in pieces])[lo:hi]
        return self._put((rows, epoch, state, self._assemble(pieces, lo, hi, copy)))

    def _assemble(self, pieces, lo: int, hi: int, copy: bool) -> dict[int, torch.Tensor]:
        """This rank's rows [lo, hi) of a batch: a slice of the shuffled window buffer (a copy for
        a window's last batch, a batch that spans two windows, or pinned for a GPU)."""
        out = {}
        for layer in self.layers:
            parts, at = [], 0
            for r, bufs, start in pieces:
                a, b = max(lo - at, 0), min(hi - at, len(r))
                if a < b:
                    parts.append(bufs[layer][start + a:start + b])
                at += len(r)
            x = self._tensor(parts[0] if len(parts) == 1 else np.concatenate(parts))
            if self.device.type == "cuda":
                out[layer] = x.pin_memory()  # converted to the training dtype on the GPU
            elif x.dtype != self.dtype:
                out[layer] = x.to(self.dtype)
            else:
                out[layer] = x.clone() if copy and len(parts) == 1 else x
        return out
