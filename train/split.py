"""The train/held-out split: now in cache_format.split (both stages read it)."""

# shim: removed by the structure issue's last step
from cache_format.split import MIN_HELDOUT_SEQUENCES, Split, heldout_score, is_heldout

__all__ = ["MIN_HELDOUT_SEQUENCES", "heldout_score", "is_heldout", "split_counts"]


def split_counts(cache, seed: int, fraction: float, role_codes=None, slice_rows: int = 1 << 22) -> dict:
    return Split(seed, fraction).counts(cache, role_codes, slice_rows)
