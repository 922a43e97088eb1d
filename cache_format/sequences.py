"""The per-sequence table as stored: one zstd-compressed parquet object per segment."""

from __future__ import annotations

from .layout import sequences_table


def sequences_bytes(records: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = sequences_table(records)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()
