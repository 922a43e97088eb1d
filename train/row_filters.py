"""Which cache rows a loader may serve: the metadata filters, planned up front into a row mask.

Rows pass if they are in the train/held-out split (hashed sequence id, `train.split`), have one
of the roles (thinking + answer by default on rollout caches, everything on corpus text), and
optionally are not at position 0 or special tokens; an optional cap keeps a random sample.
Everything here reads row metadata only (`RowMetadata`), never residuals.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from cache_format.errors import UserError
from cache_format.layout import ROLE_CODES

from .split import heldout_score

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
    role_codes = None if roles is None else np.asarray([ROLE_CODES[r] for r in roles], dtype=np.int8)
    special = special_token_ids(cache) if exclude_special else None
    for lo in range(0, n, META_SLICE):
        hi = min(n, lo + META_SLICE)
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


def cap_rows(mask: np.ndarray, max_rows: int, seed: int) -> None:
    """Keep a random sample of exactly `max_rows` of the mask's rows (in place), when it has more."""
    if max_rows and mask.sum() > max_rows:
        cand = np.flatnonzero(mask)
        score = heldout_score(cand, seed ^ 0x5EED)
        keep = cand[np.argpartition(score, max_rows - 1)[:max_rows]]
        mask[:] = False
        mask[keep] = True


def default_roles(cache: RowMetadata) -> list[str] | None:
    """thinking + answer on rollout caches (any non-text role present), everything on corpus."""
    n = cache.n_tokens
    for lo in range(0, n, META_SLICE):
        if np.any(np.asarray(cache.roles[lo : min(n, lo + META_SLICE)]) != ROLE_CODES["text"]):
            return ["thinking", "answer"]
    return None
