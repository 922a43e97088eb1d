"""A published cache over plain HTTP(S): read-only, and without listings.

Readers take the commit records from the `index.json` that `publish` writes; everything
else is ranged GETs through fsspec's HTTP filesystem, retried like any remote read.
"""

from __future__ import annotations

from .base import ObjectInfo, ReadOnlyError
from .fsspec import FsspecLocation


class HttpLocation(FsspecLocation):
    protocols = ("http", "https")
    supports_listing = False
    supports_writes = False

    def exists(self, key: str) -> bool:
        """No listings to ask: a GET of the object (retried like any read) returns a body or a 404."""
        try:
            return bool(self.read(key))
        except FileNotFoundError:
            return False

    def list(self, prefix: str) -> list[str]:
        raise ReadOnlyError(f"{self.url}: HTTP has no listings; read it through its published index.json")

    def walk(self, prefix: str) -> list[ObjectInfo]:
        raise ReadOnlyError(f"{self.url}: HTTP has no listings")

    def _refuse_write(self):
        raise ReadOnlyError(f"{self.url}: HTTP caches are read-only; write to a local path or s3:// URL and publish it")

    def write(self, key: str, data: bytes) -> None:
        self._refuse_write()

    def create_exclusive(self, key: str, data: bytes) -> bool:
        self._refuse_write()

    def delete(self, keys: list[str]) -> None:
        self._refuse_write()
