"""`upgrade`: give a cache written by format 1 what format 2 readers check.

Format 1 recorded no chunk digests and did not chain its commit records. Stored objects
and records are immutable, so nothing is rewritten: one `upgrade` commit carries the chunk
digests of every shard object that lacks them (computed after the object's BLAKE2b is
checked against its manifest, so only good data gets digests), the digest of the root
attributes and the digest of every record before it. Commits after it are chained.
"""

from __future__ import annotations

import json

from . import commits, integrity, provenance
from .stores import Location


def _part_chunks(loc: Location, base: str, objects: dict) -> dict:
    out, per_shard = {}, {}
    for key, want in sorted(objects.items()):
        k = "/" + key
        if "/c/" not in k or "chunks" in want:
            continue
        pre = k[1 : k.index("/c/") + 1]  # "tokens/" for a row column, "" for a residual array
        if pre not in per_shard:
            meta = integrity.read_checked(loc, f"{base}/{pre}zarr.json", objects.get(f"{pre}zarr.json"), commits.digest)
            per_shard[pre] = integrity.per_shard_of(json.loads(meta))
        data = integrity.read_checked(loc, f"{base}/{key}", want, commits.digest)
        out[key] = integrity.shard_chunk_digests(data, per_shard[pre], f"{base}/{key}")
    return out


def upgrade(loc: Location) -> dict:
    """Commit one `upgrade` record if anything lacks digests; returns what it covered."""
    root = commits.read_root(loc)
    records = commits.load_records(loc, {}, root)
    state = commits.replay(root, records)
    chunks = {}
    for s in state.segments:
        for part, base in [(s.record["rows"], s.record["rows"]["path"])] + [(e, e["array"]) for e in s.layers.values()]:
            got = _part_chunks(loc, base, part["objects"])
            if got:
                chunks[base] = got
    last_pins = {}
    for r in records.values():
        if r.get("kind") == "upgrade":
            last_pins = r.get("pinned", {})
    unchained = [n for n, r in records.items() if "digest" not in r and n not in last_pins]
    if not chunks and not unchained:
        return {"objects": 0, "records": 0, "commit": None}
    record = {
        "kind": "upgrade",
        "root": commits.root_digest(root),
        "pinned": {n: commits.record_digest(r) for n, r in records.items()},
        "chunks": chunks,
        "provenance": provenance.record(),
    }
    name = commits.commit(loc, record)
    return {"objects": sum(len(v) for v in chunks.values()), "records": len(unchained), "commit": name}
