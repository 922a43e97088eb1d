"""bfloat16 in and out of the cache: now in cache_format.layout."""

# shim: removed by the structure issue's last step
from .layout import BF16, bits_to_float32, bits_to_numpy, bits_to_torch, to_bits

__all__ = ["BF16", "bits_to_float32", "bits_to_numpy", "bits_to_torch", "to_bits"]
