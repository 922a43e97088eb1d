"""bfloat16 in and out of the cache, bit for bit.

The arrays store bf16 as its raw 16-bit pattern (zarr `uint16`, tagged
`"actcache_dtype": "bfloat16"` in the array attributes), so every zarr reader in every
language can open them and no value is ever converted on the way in or out.
"""

from __future__ import annotations

import sys

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "dtype") and "torch" in sys.modules


def to_bits(x, what: str = "residuals") -> np.ndarray:
    """A bf16 torch tensor or ml_dtypes array → its uint16 bit patterns (no copy where possible)."""
    from .errors import UserError

    if _is_torch(x):
        import torch

        if x.dtype != torch.bfloat16:
            raise UserError(f"{what}: expected torch.bfloat16, got {x.dtype}; cast with .to(torch.bfloat16) first")
        return x.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
    a = np.asarray(x)
    if a.dtype == BF16:
        return np.ascontiguousarray(a).view(np.uint16)
    if a.dtype == np.uint16:
        return np.ascontiguousarray(a)
    raise UserError(
        f"{what}: expected bfloat16 (torch.bfloat16 or ml_dtypes.bfloat16), got {a.dtype}; "
        "convert explicitly so that any rounding is your choice"
    )


def bits_to_numpy(bits: np.ndarray) -> np.ndarray:
    return bits.view(BF16)


def bits_to_torch(bits: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)


def bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Exact widening: a bf16 pattern is the top half of the float32 with the same value."""
    out = np.zeros(bits.shape, np.uint32)
    out.view(np.uint16).reshape(*bits.shape, 2)[..., 1] = bits  # little-endian: high half
    return out.view(np.float32)
