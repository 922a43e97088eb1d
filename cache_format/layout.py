"""The on-disk layout in one place: where each object of a cache lives, and what its codes mean.

Writers, readers, gc, leases, sync and backfill all build object keys here, so a path is
spelled once; the row columns' dtypes and the role/label codes are the format's contract
with every reader (train included), so they live beside the paths.
"""

from __future__ import annotations

ROW_COLUMNS = {"tokens": "int32", "seq_ids": "int64", "positions": "int32", "labels": "int8", "roles": "int8"}
TOKENIZER_DIR = "tokenizer"
SEGMENTS = "segments"
BACKFILL_PREFIX = "backfill-"

ROLE_TEXT, ROLE_PROMPT, ROLE_THINKING, ROLE_ANSWER = 0, 1, 2, 3
LABEL_CORRECT, LABEL_WRONG, LABEL_NONE = 1, 0, -1
ROLE_CODES = {"text": ROLE_TEXT, "prompt": ROLE_PROMPT, "thinking": ROLE_THINKING, "answer": ROLE_ANSWER}
ROLE_NAMES = {code: name for name, code in ROLE_CODES.items()}


def tokenizer_key(name: str) -> str:
    return f"{TOKENIZER_DIR}/{name}"


def segment_dir(segment_id: str) -> str:
    """A segment's directory: the unit its writer leases and gc keeps or removes whole."""
    return f"{SEGMENTS}/{segment_id}"


def backfill_dir(segment_id: str, part: str) -> str:
    """One backfill's directory inside its segment: leased and collected like a segment."""
    return f"{segment_dir(segment_id)}/{BACKFILL_PREFIX}{part}"


def layer_array(base: str, hook: str, layer: int) -> str:
    """The sharded residual array of one layer under a segment or backfill directory."""
    return f"{base}/{hook}/{layer}"


def stats_key(base: str, layer: int) -> str:
    return f"{base}/stats/{layer}.json"


def rows_dir(base: str) -> str:
    return f"{base}/rows"


def sequences_key(base: str) -> str:
    return f"{base}/sequences.parquet"


def unit_of(key: str) -> str | None:
    """The leased unit (segment or backfill directory) an object key belongs to; None outside one."""
    parts = key.split("/")
    if len(parts) < 3:
        return None  # segments/zarr.json
    return "/".join(parts[:3]) if parts[2].startswith(BACKFILL_PREFIX) else "/".join(parts[:2])


def segment_of_unit(unit: str) -> str:
    """The segment directory a unit lies in (itself for a segment)."""
    return "/".join(unit.split("/")[:2])


def sequences_table(records: list[dict]):
    """Per-sequence records as the pyarrow table every reader gets: seq_id int64, token_ids list<int32>."""
    import pyarrow as pa

    if not records:
        return pa.table({"seq_id": pa.array([], pa.int64()), "token_ids": pa.array([], pa.list_(pa.int32()))})
    table = pa.Table.from_pylist(records)
    table = table.set_column(table.schema.get_field_index("seq_id"), "seq_id", table["seq_id"].cast(pa.int64()))
    table = table.set_column(
        table.schema.get_field_index("token_ids"), "token_ids", table["token_ids"].cast(pa.list_(pa.int32()))
    )
    return table
