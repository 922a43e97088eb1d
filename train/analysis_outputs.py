"""How feature analysis publishes its files: strict JSON (NaN as null) and zstd parquet,
each written to a temporary file and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cache_format.stores.local import atomic_path, write_atomic


def write_parquet(path: Path, columns: dict[str, Any], row_group_size: int | None = None) -> None:
    """Columns of equal length as one zstd parquet file. Lists of lists become list columns of
    int32, float32 or string, by their first element. `row_group_size` keeps row groups small
    where readers fetch a few rows at a time (the browser reads one feature's examples)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for k, v in columns.items():
        if isinstance(v, np.ndarray) and v.dtype == object:
            arrays[k] = pa.array(v.tolist(), pa.string())
        elif isinstance(v, list) and v and isinstance(v[0], (list, np.ndarray)):
            arrays[k] = _list_array(v)
        else:
            arrays[k] = pa.array(v)
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(arrays), tmp, compression="zstd", row_group_size=row_group_size)


def _list_array(lists: list):
    """A list column built from one flat array and offsets (no per-element Python objects)."""
    import pyarrow as pa

    first = next((x for x in lists if len(x)), [])
    kind = np.asarray(first).dtype.kind if len(first) else "i"
    lengths = np.fromiter((len(x) for x in lists), np.int64, len(lists))
    offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
    if kind in "UO":
        flat = pa.array([t for x in lists for t in x], pa.string())
    else:
        dtype = np.float32 if kind == "f" else np.int32
        flat = np.concatenate([np.asarray(x) for x in lists]).astype(dtype) if lengths.sum() else np.zeros(0, dtype)
        flat = pa.array(flat)
    return pa.ListArray.from_arrays(offsets, flat)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=False))


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if np.isnan(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def clean(x):
    """NaN → None, recursively, so the JSON is strict."""
    if isinstance(x, float):
        return None if np.isnan(x) else x
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x
