"""`verify`: re-hash every object the live segments reference against its committed manifest,
and find duplicated rows and sequence records (duplicates.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from . import commits, duplicates, layout
from .commandline import progress_bar
from .errors import RemoteError
from .reader import Cache
from .stores import Location, ShortRead


def part_objects(record_or_entry: dict, part_path: str | None = None) -> dict[str, dict]:
    """Keys (under the part's path) → manifest entries of one part: a rows group or a layer's array."""
    base = part_path or record_or_entry.get("path") or record_or_entry.get("array")
    return {f"{base}/{k}": v for k, v in record_or_entry["objects"].items()}


def segment_objects(seg) -> dict[str, dict]:
    """Every object a live segment references (all layers, rows, sequences, stats) → {size, blake2b}."""
    r = seg.record
    out = part_objects(r["rows"])
    for e in seg.layers.values():
        out.update(part_objects(e))
        out[e["stats"]["path"]] = e["stats"]
    if r.get("sequences"):
        out[r["sequences"]["path"]] = r["sequences"]
    return out


def _hash_objects(loc: Location, objects: dict, threads: int = 4, desc: str = "verify") -> list[tuple[str, str]]:
    bad = []
    with progress_bar(sum(v["size"] for v in objects.values()), desc) as bar:

        def check(item):
            key, want = item
            for attempt in range(2):  # a mismatch is re-read once: a torn transfer is not a bad object
                try:
                    data = loc.read(key, fresh=attempt > 0, size=want["size"])
                except FileNotFoundError:
                    return key, "missing"
                except RemoteError as e:
                    if not isinstance(e.__cause__, ShortRead):
                        raise
                    data = b""  # shorter than its manifest on every attempt
                if len(data) != want["size"]:
                    why = f"size {len(data)} != {want['size']}"
                elif commits.digest(data) != want[commits.DIGEST]:
                    why = "checksum mismatch"
                else:
                    why = None
                if why is None:
                    break
            bar.update(len(data))
            return None if why is None else (key, why)

        with ThreadPoolExecutor(threads) as ex:
            for res in ex.map(check, sorted(objects.items())):
                if res:
                    bad.append(res)
    return bad


def verify(cache: Cache, threads: int = 4) -> tuple[int, list[tuple[str, str]]]:
    """Re-hash every object the live segments reference, then look for duplicated rows and
    sequences (only in a cache whose objects are intact); returns (objects checked, problems)."""
    objects = {}
    for s in cache.committed_segments:
        objects.update(segment_objects(s))
    for name, want in cache.tokenizer_manifest.items():
        objects[layout.tokenizer_key(name)] = want
    bad = _hash_objects(cache.location, objects, threads)
    return len(objects), bad or duplicates.full(cache)
