"""Which sequences a segment holds: now in cache_format.log."""

# shim: removed by the structure issue's last step
from .log import describe, holders, overlap, overlapping_pairs, ranges_of
from .log import seq_ranges_of as of_record

__all__ = ["describe", "holders", "of_record", "overlap", "overlapping_pairs", "ranges_of"]
