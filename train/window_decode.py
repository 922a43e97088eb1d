"""Decoding a shuffle window before its batches are gathered: its chunks into the slot buffers on
the decode pool's threads, then the norm-outlier filter.

The norm filter is the one row filter that reads residuals (the others are `row_filters`', on
metadata), so it runs per window as the rows are decoded, against median norms drawn once from
the first chunks of a fixed order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from cache_format.layout import bits_to_torch

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
