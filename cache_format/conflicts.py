"""What makes a commit a duplicate: the checks `commits.commit` runs against every record
before the one it creates (its `refuse`), so that cooperating processes commit each unit
once even when their claims (claims.py) fail them.

Each check replays the records before it and names what already holds the work.
"""

from __future__ import annotations

from . import commits, seq_ranges


def sequences_taken(root: dict, ranges: list):
    """Refuse a segment whose sequences a live segment before it already holds."""

    def refuse(records: dict) -> str | None:
        live = commits.replay(root, records).segments
        held = [(seq_ranges.of_record(s.record) or [], s) for s in live]
        for s in seq_ranges.holders(ranges, held):
            shared = seq_ranges.overlap(ranges, seq_ranges.of_record(s.record))
            return f"{seq_ranges.describe(shared)} are already in segment {s.id} (commit {s.commit})"
        return None

    return refuse


def layer_taken(root: dict, segment_id: str, layer: int):
    """Refuse a backfilled layer that its segment already has (or a segment no longer live)."""

    def refuse(records: dict) -> str | None:
        st = commits.replay(root, records)
        seg = next((s for s in st.segments if s.id == segment_id), None)
        if seg is None:
            return f"segment {segment_id} is no longer live (retracted)"
        if layer in seg.layers:
            return f"segment {segment_id} already has layer {layer} (commit {seg.layer_commits[layer]})"
        return None

    return refuse


def layer_declared(root: dict, layer: int):
    """Refuse declaring a layer twice."""

    def refuse(records: dict) -> str | None:
        return f"layer {layer} is already declared" if layer in commits.replay(root, records).declared else None

    return refuse
