"""Row views over a snapshot (reader.py's `Cache`): `c.residuals(layer)[i:j]`, `c.tokens[i:j]` and the
other token-row columns, indexed like arrays. Apart from the snapshot so that reader.py keeps what a
snapshot knows (segments, layers, chunks); a view holds only its cache and what it reads. The `cache`
they take is not annotated: reader.py imports this module, never the other way round.
"""

from __future__ import annotations

import numpy as np

from .bf16 import bits_to_numpy, bits_to_torch
from .errors import UserError
from .layout import ROW_COLUMNS

__all__ = ["row_range", "ResidualView", "ColumnView"]


def row_range(key, n: int) -> tuple[int, int]:
    if isinstance(key, (int, np.integer)):
        i = int(key) + (n if key < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"row {key} out of range for {n} rows")
        return i, i + 1
    if not isinstance(key, slice) or key.step not in (None, 1):
        raise UserError("index the cache with a contiguous slice [i:j] (or one row)")
    a, b, _ = key.indices(n)
    return a, max(a, b)


class ResidualView:
    """`c.residuals(layer)[i:j]` → torch.bfloat16 (j-i, d_model); `.numpy(i, j)` → ml_dtypes bf16."""

    def __init__(self, cache, layer: int):
        self.cache, self.layer = cache, layer

    def __len__(self) -> int:
        return self.cache.n_tokens

    @property
    def shape(self) -> tuple[int, int]:
        return (self.cache.n_tokens, self.cache.d_model)

    def bits(self, i: int, j: int) -> np.ndarray:
        c = self.cache
        return c.gather(lambda s: c.layer_reader(s, self.layer), i, j, (c.d_model,), np.uint16)

    def numpy(self, i: int = 0, j: int | None = None) -> np.ndarray:
        i, j = row_range(slice(i, j), self.cache.n_tokens)
        return bits_to_numpy(self.bits(i, j))

    def __getitem__(self, key):
        i, j = row_range(key, self.cache.n_tokens)
        out = bits_to_torch(self.bits(i, j))
        return out[0] if isinstance(key, (int, np.integer)) else out


class ColumnView:
    """`c.tokens[i:j]` etc. → numpy, aligned row for row with the residuals."""

    def __init__(self, cache, name: str):
        self.cache, self.name = cache, name

    def __len__(self) -> int:
        return self.cache.n_tokens

    def __getitem__(self, key):
        i, j = row_range(key, self.cache.n_tokens)
        out = self.cache.gather(lambda s: self.cache.column_reader(s, self.name), i, j, (), ROW_COLUMNS[self.name])
        return out[0] if isinstance(key, (int, np.integer)) else out

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)
