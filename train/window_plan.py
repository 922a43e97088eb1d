"""The loader's plan: which rows each batch holds, as a pure function of (seed, epoch, ranks).

- each epoch permutes the storage chunks (`default_rng([seed, epoch])`);
- consecutive chunks of that order form a *window* of about `window_tokens` eligible rows (the
  shuffle buffer); a window's rows are permuted with `default_rng([seed, epoch, window, 1])`;
- the batches are consecutive slices of the concatenated window streams.

With N ranks the windows are the same and each rank takes every N-th chunk of the epoch's order.
Nothing here reads residuals, so the plan can be checked at scales whose residuals are not at hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def epoch_windows(
    chunk_counts: np.ndarray, seed: int, epoch: int, window_tokens: int, rank: int = 0, world_size: int = 1
) -> list[np.ndarray]:
    """The chunk ids of this rank's share of each shuffle window in `epoch`; `chunk_counts` holds
    every chunk's eligible rows."""
    order = np.random.default_rng([seed, epoch]).permutation(len(chunk_counts))
    order = order[chunk_counts[order] > 0]
    # m windows of equal eligible rows, each at most window_tokens plus one chunk (no small
    # last window that mixes badly, no large one that breaks the memory budget)
    cum = np.cumsum(chunk_counts[order])
    total = int(cum[-1]) if len(cum) else 0
    m = max(1, -(-total // window_tokens))
    cuts = np.unique(np.searchsorted(cum, np.arange(1, m) * (total / m), side="left") + 1)
    wins = np.split(order, cuts)
    if world_size > 1:  # every N-th chunk of the epoch's order is this rank's
        mine = np.arange(len(order)) % world_size == rank
        wins = [w[k] for w, k in zip(wins, np.split(mine, cuts), strict=True)]
    return [w for w in wins if len(w)]


def window_perm(seed: int, epoch: int, window: int, n: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """The shuffle of a window's `n` rows (per rank when there are several)."""
    ranks = [world_size, rank] if world_size > 1 else []
    return np.random.default_rng([seed, epoch, window, 1, *ranks]).permutation(n)


def chunk_rows(packed_mask: np.ndarray, bounds: np.ndarray, c: int) -> np.ndarray:
    """Global ids of chunk c's eligible rows, from the packed row mask."""
    lo, hi = int(bounds[c]), int(bounds[c + 1])
    # unpack only the bytes covering this chunk
    b0, b1 = lo // 8, (hi + 7) // 8
    bits = np.unpackbits(packed_mask[b0:b1])[lo - b0 * 8 : hi - b0 * 8].astype(bool)
    return lo + np.flatnonzero(bits)


def window_layout(chunks: Iterable[int], packed_mask: np.ndarray, bounds: np.ndarray, chunk_buffer: np.ndarray):
    """How a window's chunks lie in its buffer: per chunk (id, buffer offset, local eligible rows or
    None when decoded whole), the buffer rows, and the global rows and buffer positions of the
    eligible rows in plan order. `chunk_buffer` holds each chunk's buffer rows (stored rows when
    decoded whole, else its eligible rows)."""
    plan, rows, pos, at = [], [], [], 0
    for c in chunks:
        c = int(c)
        lo, stored = int(bounds[c]), int(bounds[c + 1] - bounds[c])
        r = chunk_rows(packed_mask, bounds, c)
        dense = chunk_buffer[c] == stored
        plan.append((c, at, None if dense else r - lo))
        rows.append(r)
        pos.append(at + (r - lo if dense else np.arange(len(r))))
        at += stored if dense else len(r)
    empty = np.zeros(0, np.int64)
    return plan, at, np.concatenate(rows or [empty]), np.concatenate(pos or [empty])


def cut_batches(streams: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Consecutive batches of `size` rows out of a stream of row arrays (a batch may span arrays)."""
    pending = []
    for rows in streams:
        while len(rows):
            need = size - sum(len(p) for p in pending)
            pending.append(rows[:need])
            rows = rows[need:]
            if sum(len(p) for p in pending) == size:
                yield np.concatenate(pending)
                pending = []
