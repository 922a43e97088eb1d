"""A training run's directory read by key, at a local path or any URL the cache accepts (through
`cache_format.stores`): its JSON files, and the rows of one feature in a per-feature parquet
file, fetched from the row groups that hold them (a 65k-feature file is never read whole).
"""

from __future__ import annotations

import json
import threading
from pathlib import PurePosixPath

import numpy as np

from cache_format.errors import UserError


class RunFiles:
    """The files of a run directory at a local path or URL, through the cache's store backends."""

    def __init__(self, url: str):
        from cache_format.stores import Location

        self.url = url
        self.loc = Location(url)

    def read(self, key: str) -> bytes | None:
        try:
            return self.loc.read(key)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def json(self, key: str) -> dict | None:
        raw = self.read(key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"{self.url}/{key}: not valid JSON ({e}); re-run the step that wrote it") from None

    def exists(self, key: str) -> bool:
        if self.loc.fs is None:
            return self.loc.exists(key)
        # ask the filesystem (a HEAD over HTTP): the store's own check GETs the whole object there
        try:
            return bool(self.loc.fs.exists(self.loc.path(key)))
        except OSError as e:
            raise UserError(f"{self.url}: cannot reach {key} ({e}); check that the run is reachable") from None

    def open(self, key: str):
        """A seekable binary file: pyarrow reads a parquet file's footer and row groups from it
        with ranged reads, never the whole object."""
        if self.loc.fs is None:  # a local directory
            return open(self.loc.path(key), "rb")
        return self.loc.fs.open(self.loc.path(key), "rb")


def _sae_key(item: dict, name: str) -> str:
    """Where an SAE's directory is, relative to the run: run.json's relative path, else its name."""
    path = str(item.get("path") or item.get("dir") or "")
    p = PurePosixPath(path)
    if path and not p.is_absolute() and ".." not in p.parts:
        return str(p.parent) if p.suffix else str(p)
    return name


class FeatureRows:
    """The rows of one feature in a parquet file sorted by feature, read from the row groups
    that hold them (a 65k-feature file is never read whole)."""

    def __init__(self, files: RunFiles, key: str):
        import pyarrow.parquet as pq

        self.key = key
        self.file = pq.ParquetFile(files.open(key))
        feats = self.file.read(columns=["feature"]).column("feature").to_numpy()
        if len(feats) and np.any(np.diff(feats) < 0):
            raise UserError(f"{files.url}/{key}: rows are not sorted by feature; re-run `python -m train analyze`")
        # where each feature's rows start (kept instead of the column: 8 bytes a feature, not 4 a row)
        self.starts = np.searchsorted(feats, np.arange(int(feats.max(initial=-1)) + 2))
        md = self.file.metadata
        self.group_starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        self.columns = tuple(self.file.schema_arrow.names)
        self.lock = threading.Lock()

    def range(self, first: int, stop: int, columns: list[str] | None = None):
        """A pyarrow table of the rows of features [first, stop) (of `columns`, those present)."""
        cols = [c for c in columns if c in self.columns] if columns is not None else None
        last = len(self.starts) - 1
        a, b = int(self.starts[min(first, last)]), int(self.starts[min(stop, last)])
        if a == b:
            return self.file.schema_arrow.empty_table().select(cols if cols is not None else list(self.columns))
        g0 = int(np.searchsorted(self.group_starts, a, "right")) - 1
        g1 = int(np.searchsorted(self.group_starts, b, "left"))
        with self.lock:
            t = self.file.read_row_groups(list(range(g0, g1)), columns=cols)
        return t.slice(a - int(self.group_starts[g0]), b - a)


def sae_key(item: dict, name: str) -> str:
    """Where an SAE's directory is, relative to the run: run.json's relative path, else its name."""
    path = str(item.get("path") or item.get("dir") or "")
    p = PurePosixPath(path)
    if path and not p.is_absolute() and ".." not in p.parts:
        return str(p.parent) if p.suffix else str(p)
    return name
