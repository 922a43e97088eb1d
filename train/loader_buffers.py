"""The loader's memory: window buffers, recycled batch arrays, and the gather that fills a batch.

A window's chunks are decoded straight into one reused buffer per layer (no allocation, no copy);
a batch is then one gather of its shuffled rows out of it (`np.take`; into pinned memory for a
GPU) into arrays of its own, recycled once the consumer drops the batch: the one copy the shuffle
needs. Batches never view the window buffers, so consumers may keep them.
"""

from __future__ import annotations

import mmap
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from cache_format.layout import bits_to_torch


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
    """Batch arrays handed out again once nothing views them any more: a fresh 8-40 MiB array costs
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
