"""The loader's plan: which rows it serves, and which batch holds which of them, from row metadata alone.

Rows pass if they are on the split's side (`cache_format.split`, by hashed sequence id), have
one of the roles (thinking + answer by default on rollout caches, everything on corpus text),
and optionally are not at position 0 or special tokens; an optional cap keeps a random sample.

The batches are a pure function of (seed, epoch, ranks):

- each epoch permutes the storage chunks (`default_rng([seed, epoch])`);
- consecutive chunks of that order form a *window* of about `window_tokens` eligible rows (the
  shuffle buffer); a window's rows are permuted with `default_rng([seed, epoch, window, 1])`;
- the batches are consecutive slices of the concatenated window streams.

With N ranks the windows are the same and each rank takes every N-th chunk of the epoch's order.
Nothing here reads residuals, so the plan can be checked at scales whose residuals are not at hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cache_format.errors import UserError
from cache_format.layout import ROLE_CODES, role_codes
from cache_format.split import heldout_score

# -- which rows: the metadata filters ----------------------------------------------------------

META_SLICE = 1 << 20  # rows of metadata read at once while planning


@runtime_checkable
class RowMetadata(Protocol):
    """What the loader's planner always reads of a cache: `cache_format.Cache` has it, and so
    has a benchmark's stand-in for a cache too large to write (bench/bench_loader.py). The
    optional filters read more (`positions` for exclude_position0, `tokens` and `tokenizer()`
    for exclude_special); the stand-in has none of those and runs with the filters off."""

    n_tokens: int
    layers: list[int]
    d_model: int
    seq_ids: Any  # sliceable to an int64 array per row
    roles: Any  # sliceable to an int8 array per row

    def chunk_bounds(self) -> np.ndarray: ...


def chunk_bounds(cache: RowMetadata) -> np.ndarray:
    """The first row of every chunk and the end of the last, as one int64 array."""
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


def row_mask(
    cache: RowMetadata,
    *,
    split: str,
    heldout_fraction: float,
    split_seed: int,
    roles=None,
    exclude_position0: bool = False,
    exclude_special: bool = False,
) -> np.ndarray:
    """The metadata filters over every row of the cache, as a bool array."""
    n = cache.n_tokens
    mask = np.zeros(n, dtype=bool)
    codes = None if roles is None else np.asarray(role_codes(roles), dtype=np.int8)
    special = special_token_ids(cache) if exclude_special else None
    for lo in range(0, n, META_SLICE):
        hi = min(n, lo + META_SLICE)
        held = heldout_score(np.asarray(cache.seq_ids[lo:hi]), split_seed) < heldout_fraction
        m = held if split == "heldout" else ~held
        if codes is not None:
            m &= np.isin(np.asarray(cache.roles[lo:hi]), codes)
        if exclude_position0:
            m &= np.asarray(cache.positions[lo:hi]) != 0
        if special is not None and len(special):
            m &= ~np.isin(np.asarray(cache.tokens[lo:hi]), special)
        mask[lo:hi] = m
    return mask


def cap_rows(mask: np.ndarray, max_rows: int, seed: int) -> None:
    """Keep a random sample of exactly `max_rows` of the mask's rows (in place), when it has more."""
    if max_rows and mask.sum() > max_rows:
        cand = np.flatnonzero(mask)
        score = heldout_score(cand, seed ^ 0x5EED)
        keep = cand[np.argpartition(score, max_rows - 1)[:max_rows]]
        mask[:] = False
        mask[keep] = True


def default_roles(cache: RowMetadata) -> tuple[int, ...] | None:
    """The role codes a run trains on when train.roles is empty, and analysis scans to match:
    thinking + answer on rollout caches (any non-text role present), None (every row) on corpus."""
    n = cache.n_tokens
    for lo in range(0, n, META_SLICE):
        if np.any(np.asarray(cache.roles[lo : min(n, lo + META_SLICE)]) != ROLE_CODES["text"]):
            return role_codes(["thinking", "answer"])
    return None


# -- which batch holds which rows --------------------------------------------------------------


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
