"""The commit log: numbered, immutable JSON records under `commits/`.

Every change to a cache is one record created exclusively at the next free number
(`commits/0000000001.json`, ...). Readers replay the records in number order, so rows
come back in commit order and a commit never shifts rows that were visible before it
(only a `retract` removes rows). Kinds:

    segment    a new segment: its rows, sequences, and one entry per layer (objects + checksums)
    layer      a backfilled layer for an existing segment
    add_layer  declares a layer that segments committed from now on must carry
    retract    a tombstone that hides a segment
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .errors import CacheError
from .provenance import FORMAT_NAME, FORMAT_VERSION

COMMITS = "commits"
INDEX = "index.json"
ROOT_META = "zarr.json"
_NAME = re.compile(r"^\d{10}\.json$")


def dumps(obj) -> bytes:
    """Canonical JSON: what is hashed is exactly what is stored."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sha256(data: bytes) -> str:
    """Fingerprints: sha256 of canonical JSON (small inputs)."""
    return hashlib.sha256(data).hexdigest()


DIGEST = "blake2b"  # object checksums: BLAKE2b-256, ~3× sha256's rate on CPUs without SHA extensions


def digest(data) -> str:
    """The checksum of one stored object (bytes or a buffer)."""
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def read_root(loc) -> dict:
    """The cache's root attributes, or a one-line CacheError if the URL is not a cache."""
    try:
        raw = loc.read(ROOT_META)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise CacheError(f"{loc.url} is not a cache (no zarr.json); create one with cache_format.create_cache "
                         "or check the URL") from None
    try:
        meta = json.loads(raw)
        attrs = meta["attributes"][FORMAT_NAME]
    except (ValueError, KeyError, TypeError):
        raise CacheError(f"{loc.url} holds a zarr.json but is not an {FORMAT_NAME} cache; check the URL") from None
    if attrs.get("format_version", 0) > FORMAT_VERSION:
        raise CacheError(f"{loc.url} uses cache format {attrs['format_version']}, newer than this code "
                         f"({FORMAT_VERSION}); upgrade actcache")
    return attrs


def list_commits(loc) -> tuple[list[str], dict]:
    """Commit names in order, and records already known (HTTP's index carries them inline)."""
    if loc.http:
        try:
            index = json.loads(loc.read(INDEX))
        except FileNotFoundError:
            raise CacheError(f"{loc.url} has no index.json; run `python -m cache_format publish` on the "
                             "cache before serving it over HTTP") from None
        recs = {c["name"]: c["record"] for c in index["commits"]}
        return sorted(recs), recs
    return [n for n in loc.list(COMMITS) if _NAME.match(n)], {}


def load_records(loc, known: dict) -> dict:
    """All commit records by name; `known` ones (immutable) are not re-read."""
    names, inline = list_commits(loc)
    out = {n: known[n] for n in names if n in known}
    out.update({n: r for n, r in inline.items() if n not in out})
    missing = [n for n in names if n not in out]

    def read(n):
        return n, json.loads(loc.read(f"{COMMITS}/{n}"))

    if missing:
        if loc.local or len(missing) < 4:
            got = map(read, missing)
        else:
            with ThreadPoolExecutor(16) as ex:
                got = list(ex.map(read, missing))
        out.update(dict(got))
    return dict(sorted(out.items()))


def commit(loc, record: dict) -> str:
    """Create the record at the next free number; retry upward on a lost race."""
    data = dumps(record)
    names, _ = list_commits(loc)
    n = int(names[-1][:10]) + 1 if names else 1
    for _ in range(100_000):
        name = f"{n:010d}.json"
        if loc.create_exclusive(f"{COMMITS}/{name}", data):
            return name
        n += 1
    raise CacheError(f"{loc.url}: could not find a free commit number")  # pragma: no cover


@dataclass
class SegmentState:
    id: str
    commit: str
    record: dict
    layers: dict = field(default_factory=dict)  # int → layer entry
    layer_commits: dict = field(default_factory=dict)  # int → commit name
    retracted: bool = False


@dataclass
class LogState:
    segments: list  # live SegmentState, commit order
    retracted: list
    declared: list  # sorted layers declared at create time or by add_layer


def replay(root: dict, records: dict) -> LogState:
    segs: dict[str, SegmentState] = {}
    declared = set(root["layers"])
    for name, r in records.items():
        kind = r.get("kind")
        if kind == "segment":
            if r["segment"] in segs:
                continue  # a duplicate commit of the same segment (e.g. a retried sync): first wins
            s = SegmentState(r["segment"], name, r)
            s.layers = {int(k): v for k, v in r["layers"].items()}
            s.layer_commits = {L: name for L in s.layers}
            segs[s.id] = s
        elif kind == "layer":
            s = segs.get(r["segment"])
            if s is not None and int(r["layer"]) not in s.layers:
                s.layers[int(r["layer"])] = r["entry"]
                s.layer_commits[int(r["layer"])] = name
        elif kind == "add_layer":
            declared.add(int(r["layer"]))
        elif kind == "retract":
            if r["segment"] in segs:
                segs[r["segment"]].retracted = True
    live = [s for s in segs.values() if not s.retracted]
    return LogState(live, [s for s in segs.values() if s.retracted], sorted(declared))


def objects_digest(objects: dict) -> str:
    """Digest of a part's objects by relative key: independent of where the part lives."""
    return sha256("\n".join(f"{k}:{v['size']}:{v[DIGEST]}" for k, v in sorted(objects.items())).encode())


def layer_fingerprint(root: dict, segments: list, layer: int) -> str:
    body = {"hook": root["hook"], "layer": layer, "d_model": root["d_model"],
            "segments": [[s.record["n_rows"], objects_digest(s.record["rows"]["objects"]),
                          objects_digest(s.layers[layer]["objects"])] for s in segments]}
    return sha256(dumps(body))


def cache_fingerprint(root: dict, segments: list, layers: list) -> str:
    body = {"hook": root["hook"], "d_model": root["d_model"], "layers": layers,
            "segments": [[s.record["n_rows"], objects_digest(s.record["rows"]["objects"]),
                          (s.record.get("sequences") or {}).get(DIGEST),
                          [objects_digest(s.layers[L]["objects"]) for L in layers]] for s in segments]}
    return sha256(dumps(body))
