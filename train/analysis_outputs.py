"""How feature analysis publishes its files: strict JSON (NaN as null) and zstd parquet,
each written to a temporary file and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cache_format.atomic import atomic_path, write_atomic


def write_parquet(path: Path, columns: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for k, v in columns.items():
        if isinstance(v, np.ndarray) and v.dtype == object:
            arrays[k] = pa.array(v.tolist(), pa.string())
        elif isinstance(v, list) and v and isinstance(v[0], list):
            arrays[k] = pa.array(v, pa.list_(pa.int32()))
        else:
            arrays[k] = pa.array(v)
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(arrays), tmp, compression="zstd")


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
