"""The commit log: numbered, immutable JSON records under `commits/`, and what they say.

Every change to a cache is one record created exclusively at the next free number
(`commits/0000000001.json`, ...). Readers replay the records in number order, so rows
come back in commit order and a commit never shifts rows that were visible before it
(only a `retract` removes rows). Kinds:

    segment    a new segment: its rows, sequences, and one entry per layer (objects + checksums)
    layer      a backfilled layer for an existing segment
    add_layer  declares a layer that segments committed from now on must carry
    retract    a tombstone that hides a segment
    root       record 0: the digest of the root attributes (format 2)
    copy       a partial copy's selection, widened by a later `sync` (docs/cache-format.md, partial copies)
    upgrade    chunk digests for segments written by format 1, and the digests of the records before it

Records are hash-chained (format 2): each carries `prev`, the digest of the record before
it, and `digest`, the sha256 of its own canonical JSON without `digest`; record 0 pins the
root attributes. Readers check the chain of every record they load and refuse a damaged
log in one line, so an edited record, a removed one or an edited root never changes
what is read without notice. The chain has no secret, so a reader also checks that every
key a record or the root names stays inside the format's layout (`layout.check_record`):
a cache rewritten and re-sealed by whoever can write it still cannot reach outside its root.

`load(loc)` reads the log once into a `LogSnapshot`: the root attributes, every record (chain
checked) and their replay (live and retracted segments, declared layers, a partial copy's
selection), with the fingerprints and object lists derived from them. `Cache` reads rows
through one; the record-level tools (verify, sync, info, gc, upgrade, stats) use it directly.

A commit may carry a check that it duplicates nothing before it (`commit(..., refuse=)`):
`sequences_taken`, `layer_taken` and `layer_declared` below, run against every record before
the number it creates, so that cooperating processes commit each unit once even when their
work claims (concurrency.py) fail them. A segment record carries its sequences as sorted runs
`[first, end)` of seq_ids (`seq_ranges`), so these checks and `train run`'s duplicate check
need the log alone, never a read of the rows.
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3
import numpy as np

from . import layout
from .errors import CacheError
from .provenance import FORMAT_NAME, FORMAT_VERSION

COMMITS = "commits"
ROOT_RECORD = "0000000000.json"
INDEX = "index.json"
ROOT_META = "zarr.json"
_NAME = re.compile(r"[0-9]{10}\.json")


def dumps(obj) -> bytes:
    """Canonical JSON: what is hashed is exactly what is stored."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sha256(data: bytes) -> str:
    """Fingerprints: sha256 of canonical JSON (small inputs)."""
    return hashlib.sha256(data).hexdigest()


# Object checksums. Each manifest entry names its own by its key, so every reader checks
# every cache; a cache's writers use the one its root names (`object_digest`). Format 3 writes
# BLAKE3-256: cryptographic like BLAKE2b-256 (formats 1-2, still read and appended to) at
# about 5× its rate on one core, so that copying or verifying a cache is bound by the disk or
# the network rather than by the check (docs/benchmarks.md, sync).
DIGEST, LEGACY_DIGEST = layout.OBJECT_DIGESTS  # what new caches use; what a root without `object_digest` uses
DIGESTS = {
    DIGEST: lambda: blake3.blake3(max_threads=1),
    LEGACY_DIGEST: lambda: hashlib.blake2b(digest_size=32),
}


def object_digest(root: dict) -> str:
    """The checksum this cache's writers put in new manifest entries."""
    return root.get("object_digest", LEGACY_DIGEST)


def digest(data, name: str = DIGEST) -> str:
    """The hex checksum `name` of one stored object (bytes or a buffer)."""
    h = DIGESTS[name]()
    h.update(data)
    return h.hexdigest()


def entry(data, name: str) -> dict:
    """A manifest entry {size, <name>: hex} for one object's bytes."""
    return {"size": len(memoryview(data).cast("B")), name: digest(data, name)}


def tag(entry: dict) -> str:
    """The content name of a manifest entry: the BLAKE2b hex alone (as formats 1-2 wrote it in
    fingerprints and S3 metadata), else `<digest>:<hex>`."""
    for name in DIGESTS:
        if name in entry:
            return entry[name] if name == LEGACY_DIGEST else f"{name}:{entry[name]}"
    raise KeyError("the manifest entry carries no object digest")


def hasher(tag: str):
    """A running checksum of the kind `tag` names; `tagged(h, tag)` says whether it matches."""
    name = tag.partition(":")[0] if ":" in tag else LEGACY_DIGEST
    return DIGESTS[name]()


def tagged(h, tag: str) -> bool:
    return h.hexdigest() == tag.rpartition(":")[2]


def matches(entry: dict, data) -> bool:
    """Whether `data` is the object `entry` describes (size, then checksum)."""
    if len(memoryview(data).cast("B")) != entry["size"]:
        return False
    t = tag(entry)
    h = hasher(t)
    h.update(data)
    return tagged(h, t)


class NotACacheError(CacheError):
    """Nothing at the URL is a cache (no zarr.json): a caller may create one there instead."""


class UnfinishedCacheError(NotACacheError):
    """zarr.json but no commit log: a creation was interrupted; creating it again finishes it
    (write.py, `make_root`)."""

    def __init__(self, url: str):
        super().__init__(
            f"{url}: its creation was interrupted (zarr.json but no commit log yet); re-run the command "
            "that created it (harvest, import, sync) to finish it"
        )


class DamagedLog(CacheError):
    """A commit record was edited, removed or inserted, or the root changed after creation."""

    def __init__(self, url: str, name: str, why: str):
        super().__init__(
            f"{url}: the commit log is damaged at {COMMITS}/{name} ({why}); nothing was read: restore "
            "that record from a good copy of the cache (or re-sync it), "
            "then run `python -m cache_format verify`"
        )


class RefusedRecord(CacheError):
    """A record (or the root) naming a key outside the layout: crafted, however well sealed."""

    def __init__(self, url: str, where: str, why: str):
        super().__init__(
            f"{url}: {where} is refused: {why}; a cache may only name keys inside its own layout "
            "(docs/cache-format.md, *Keys*), so nothing was read or written through it: get the "
            "cache from a copy you trust"
        )


class CommitRefused(CacheError):
    """A commit's `refuse` check found that the record would duplicate one before it."""


def read_root(loc) -> dict:
    """The cache's root attributes, or a one-line CacheError if the URL is not a cache."""
    try:
        return _read_root(loc)
    except CacheError:
        if not loc.transfers_can_tear:
            raise
        return _read_root(loc)  # a torn transfer of zarr.json reads as "not a cache": once more


def _read_root(loc) -> dict:
    try:
        raw = loc.read(ROOT_META)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise NotACacheError(
            f"{loc.url} is not a cache (no zarr.json); create one with cache_format.create_cache or check the URL"
        ) from None
    try:
        meta = json.loads(raw)
        attrs = meta["attributes"][FORMAT_NAME]
    except (ValueError, KeyError, TypeError):
        raise CacheError(f"{loc.url} holds a zarr.json but is not an {FORMAT_NAME} cache; check the URL") from None
    if not isinstance(attrs, dict):
        raise CacheError(f"{loc.url} holds a zarr.json but is not an {FORMAT_NAME} cache; check the URL")
    if attrs.get("format_version", 0) > FORMAT_VERSION:
        raise CacheError(
            f"{loc.url} uses cache format {attrs['format_version']}, newer than this code "
            f"({FORMAT_VERSION}); upgrade actcache"
        )
    try:
        layout.check_root(attrs)
    except layout.LayoutError as e:
        raise RefusedRecord(loc.url, ROOT_META, str(e)) from None
    return attrs


def record_digest(r: dict) -> str:
    """The digest a successor chains to: the record's own, or (format 1) that of its canonical JSON."""
    return r["digest"] if "digest" in r else sha256(dumps(r))


def root_digest(root: dict) -> str:
    return sha256(dumps(root))


def seal(record: dict, prev: str | None) -> dict:
    """The record as stored: chained to its predecessor and carrying its own digest."""
    body = {k: v for k, v in record.items() if k not in ("prev", "digest")}
    body["prev"] = prev
    body["digest"] = sha256(dumps(body))
    return body


def root_record(root: dict) -> dict:
    return seal({"kind": "root", "root": root_digest(root)}, None)


def check_log(url: str, root: dict, records: dict, checked: set | None = None) -> None:
    """Check the chain of every record not in `checked` (names already found good); raise DamagedLog."""
    names = list(records)
    checked = checked if checked is not None else set()
    v2 = root.get("format_version", 1) >= 2
    if v2 and not names:
        raise UnfinishedCacheError(url)
    if v2 and names[0] != ROOT_RECORD:
        raise DamagedLog(url, ROOT_RECORD, "the root record is missing")
    pins: dict = {}
    for i, name in enumerate(names):
        r = records[name]
        if not isinstance(r, dict) or not isinstance(r.get("kind"), str):
            raise DamagedLog(url, name, "not a commit record")
        if r.get("kind") == "upgrade":
            pins = r.get("pinned", {})
            if not isinstance(pins, dict) or not all(isinstance(d, str) for d in pins.values()):
                raise DamagedLog(url, name, "its table of pinned records is not a table of digests")
            legacy = {n for n in names[:i] if "digest" not in records[n]}
            if not legacy <= set(pins) or not set(pins) <= set(names[:i]):
                raise DamagedLog(url, name, "the records before the upgrade differ from those it pinned")
        if name in checked:
            continue
        if "digest" in r:
            body = {k: v for k, v in r.items() if k != "digest"}
            if sha256(dumps(body)) != r["digest"]:
                raise DamagedLog(url, name, "its content does not match its digest: it was edited")
            want = record_digest(records[names[i - 1]]) if i else None
            if r.get("prev") != want:
                raise DamagedLog(
                    url, name, "it does not follow the record before it: a record was edited, removed or inserted"
                )
        elif v2:
            raise DamagedLog(url, name, "it carries no digest")
        if r.get("kind") in ("root", "upgrade") and r.get("root") != root_digest(root):
            raise DamagedLog(url, name, "the root zarr.json attributes were changed after the cache was created")
        try:
            layout.check_record(r)
        except layout.LayoutError as e:
            raise RefusedRecord(url, f"{COMMITS}/{name}", str(e)) from None
    for name, d in pins.items():
        if record_digest(records[name]) != d:
            raise DamagedLog(url, name, "its content does not match the digest the upgrade pinned: it was edited")
    checked.update(names)


def _parse(url: str, name: str, raw) -> dict:
    try:
        r = json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError too
        raise DamagedLog(url, name, f"not valid UTF-8 JSON: {type(e).__name__}") from None
    if not isinstance(r, dict):
        raise DamagedLog(url, name, "not a JSON object")
    return r


def list_commits(loc) -> tuple[list[str], dict]:
    """Commit names in order, and records already known (HTTP's index carries them inline)."""
    if not loc.supports_listing:
        try:
            index = _parse(loc.url, INDEX, loc.read(INDEX))
        except FileNotFoundError:
            raise CacheError(
                f"{loc.url} has no index.json; run `python -m cache_format publish` on the "
                "cache before serving it over HTTP"
            ) from None
        try:
            recs = {c["name"]: c["record"] for c in index["commits"]}
        except (KeyError, TypeError):
            raise DamagedLog(loc.url, INDEX, "not a published index") from None
        bad = next((n for n in recs if not isinstance(n, str) or not _NAME.fullmatch(n)), None)
        if bad is not None:
            raise RefusedRecord(
                loc.url, INDEX, f"it lists a record named {bad!r}, not a commit name like {ROOT_RECORD}"
            )
        return sorted(recs), recs
    return [n for n in loc.list(COMMITS) if _NAME.fullmatch(n)], {}


def load_records(loc, known: dict, root: dict | None = None, checked: set | None = None) -> dict:
    """All commit records by name, their chain checked against `root` (read if not given);
    `known` ones (immutable) are not re-read, names in `checked` not re-hashed."""
    names, inline = list_commits(loc)
    out = {n: known[n] for n in names if n in known}
    out.update({n: r for n, r in inline.items() if n not in out})
    missing = [n for n in names if n not in out]

    def read(n):
        try:
            return n, _parse(loc.url, n, loc.read(f"{COMMITS}/{n}"))
        except CacheError:
            if not loc.transfers_can_tear:
                raise
            reread = loc.read(f"{COMMITS}/{n}", reread=True)  # a torn transfer: once more, from the store
            return n, _parse(loc.url, n, reread)

    if missing:
        if not loc.parallel_reads or len(missing) < 4:
            got = map(read, missing)
        else:
            with ThreadPoolExecutor(16) as ex:
                got = list(ex.map(read, missing))
        out.update(dict(got))
    out = dict(sorted(out.items()))
    check_log(loc.url, root if root is not None else read_root(loc), out, checked)
    return out


def _name(n: int) -> str:
    return f"{n:010d}.json"


def _read_one(loc, seen: dict, name: str) -> dict:
    """A record by name, read once (records are immutable) into `seen`."""
    if name not in seen:
        try:
            seen[name] = _parse(loc.url, name, loc.read(f"{COMMITS}/{name}"))
        except FileNotFoundError:
            raise DamagedLog(loc.url, name, "a record before the newest one is missing") from None
    return seen[name]


def commit(loc, record: dict, refuse=None, known: dict | None = None) -> str:
    """Create the record at the next free number, chained to the record before it; on a lost
    race, chain to the winner and try the number after it.

    `refuse(records)`, if given, sees every record before the number about to be created (name
    → record, in order) and returns why this record must not follow them, or None; the record
    is then not created (`CommitRefused`). Checked again at each number tried, so the check is
    race-free: a conflicting record lies before ours (seen) or after it (its writer sees ours).
    `known` holds records already read (immutable, so never re-read)."""
    names, _ = list_commits(loc)
    prev_name = names[-1] if names else None
    first = int(names[0][:10]) if names else 1  # format 1 logs start at 1, format 2 at the root record 0
    seen = dict(known or {})
    for _ in range(100_000):
        upto = int(prev_name[:10]) if prev_name else first - 1
        if prev_name:  # re-read to chain to: a `known` copy that differs is stale (a recreated cache)
            latest = _parse(loc.url, prev_name, loc.read(f"{COMMITS}/{prev_name}"))
            if seen.get(prev_name, latest) != latest:
                seen = {}
            seen[prev_name] = latest
        if refuse is not None:
            why = refuse({_name(n): _read_one(loc, seen, _name(n)) for n in range(first, upto + 1)})
            if why:
                raise CommitRefused(why)
        prev = record_digest(_read_one(loc, seen, prev_name)) if prev_name else None
        name = _name(upto + 1)
        if loc.create_exclusive(f"{COMMITS}/{name}", dumps(seal(record, prev))):
            return name
        prev_name = name
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
    copy_of: dict | None = None  # a partial copy: its source and selection (root `copy_of`, widened by `copy`)


def replay(root: dict, records: dict) -> LogState:
    segs: dict[str, SegmentState] = {}
    declared = set(root["layers"])
    copy_of = root.get("copy_of")
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
        elif kind == "upgrade":
            for s in segs.values():
                _attach_chunks(s, r.get("chunks", {}))
        elif kind == "copy" and copy_of is not None:
            copy_of = {**copy_of, "layers": r["layers"], "segments": r["segments"]}
    live = [s for s in segs.values() if not s.retracted]
    return LogState(live, [s for s in segs.values() if s.retracted], sorted(declared), copy_of)


def _with_chunks(part: dict, key: str, chunks: dict) -> dict:
    got = chunks.get(part[key])
    if not got:
        return part
    objs = {k: ({**v, "chunks": got[k]} if k in got and "chunks" not in v else v) for k, v in part["objects"].items()}
    return {**part, "objects": objs}


def _attach_chunks(s: SegmentState, chunks: dict) -> None:
    """An upgrade's chunk digests, attached to copies of the segment's entries (records stay as stored)."""
    s.layers = {L: _with_chunks(e, "array", chunks) for L, e in s.layers.items()}
    s.record = {**s.record, "rows": _with_chunks(s.record["rows"], "path", chunks)}


def unverified_parts(s: SegmentState) -> int:
    """Shard objects of a segment that carry no chunk digests (written by format 1, not upgraded)."""
    parts = [s.record["rows"]] + list(s.layers.values())
    return sum(1 for p in parts for k, v in p["objects"].items() if "/c/" in f"/{k}" and "chunks" not in v)


def objects_digest(objects: dict) -> str:
    """Digest of a part's objects by relative key: independent of where the part lives."""
    return sha256("\n".join(f"{k}:{v['size']}:{tag(v)}" for k, v in sorted(objects.items())).encode())


# Fingerprints list the segments sorted by their content, so they do not depend on the order
# in which the segments were committed (a resumed harvest has an uninterrupted one's).


def layer_fingerprint(root: dict, segments: list, layer: int) -> str:
    body = {
        "hook": root["hook"],
        "layer": layer,
        "d_model": root["d_model"],
        "segments": sorted(
            [
                s.record["n_rows"],
                objects_digest(s.record["rows"]["objects"]),
                objects_digest(s.layers[layer]["objects"]),
            ]
            for s in segments
        ),
    }
    return sha256(dumps(body))


def cache_fingerprint(root: dict, segments: list, layers: list) -> str:
    body = {
        "hook": root["hook"],
        "d_model": root["d_model"],
        "layers": layers,
        "segments": sorted(
            [
                s.record["n_rows"],
                objects_digest(s.record["rows"]["objects"]),
                tag(s.record["sequences"]) if s.record.get("sequences") else "",
                [objects_digest(s.layers[L]["objects"]) for L in layers],
            ]
            for s in segments
        ),
    }
    return sha256(dumps(body))


def part_objects(record_or_entry: dict, part_path: str | None = None) -> dict[str, dict]:
    """Keys (under the part's path) → manifest entries of one part: a rows group or a layer's array."""
    base = part_path or record_or_entry.get("path") or record_or_entry.get("array")
    return {f"{base}/{k}": v for k, v in record_or_entry["objects"].items()}


def segment_objects(seg: SegmentState) -> dict[str, dict]:
    """Every object a live segment references (all layers, rows, sequences, stats) → its manifest entry."""
    r = seg.record
    out = part_objects(r["rows"])
    for e in seg.layers.values():
        out.update(part_objects(e))
        out[e["stats"]["path"]] = e["stats"]
    if r.get("sequences"):
        out[r["sequences"]["path"]] = r["sequences"]
    return out


# ---------------------------------------------------------------------------------------
# a snapshot of the log


@dataclass(frozen=True)
class LogSnapshot:
    """What the log held when it was read (`load`): immutable; a later `load` gives a new one.

    `records` are every record by name in number order, their chain checked; `segments` the
    live segments in commit order (their `record`, `layers` {layer: entry} and the commits that
    added them), `retracted` the hidden ones, `declared` the layers declared at create or by
    `add_layer`, `copy_of` a partial copy's source and selection (None otherwise)."""

    loc: object  # the stores.Location it was read from
    root: dict  # the root attributes (shared, not a copy: do not modify)
    records: dict
    segments: list
    retracted: list
    declared: list
    copy_of: dict | None

    @property
    def url(self) -> str:
        return self.loc.url

    @property
    def layers(self) -> list[int]:
        """The layers every live segment holds."""
        return [L for L in self.declared if all(L in s.layers for s in self.segments)]

    def coverage(self) -> dict[int, int]:
        """Declared layer → how many live segments hold it (partial backfills show as fewer)."""
        return {L: sum(L in s.layers for s in self.segments) for L in self.declared}

    def check_layer(self, layer) -> int:
        """`layer` as an int if every live segment holds it, else a one-line CacheError saying why not."""
        layer = int(layer)
        have = self.layers
        if layer in have:
            return layer
        cov = self.coverage()
        if layer in cov:
            raise CacheError(
                f"layer {layer} is only in {cov[layer]} of {len(self.segments)} segments of {self.url} "
                "(backfill pending); finish it with add_layer before reading it"
            )
        listed = ", ".join(map(str, have)) or "none"
        raise CacheError(f"layer {layer} is not in the cache {self.url} (layers: {listed}); harvest it first")

    def fingerprint(self) -> str:
        return cache_fingerprint(self.root, self.segments, self.layers)

    def layer_fingerprint(self, layer: int) -> str:
        return layer_fingerprint(self.root, self.segments, self.check_layer(layer))

    def tokenizer(self) -> dict[str, dict]:
        """Tokenizer file name → its manifest entry in the root."""
        return self.root.get("tokenizer", {})


def load(loc, previous: LogSnapshot | None = None, root: dict | None = None) -> LogSnapshot:
    """The log at `loc` now. With `previous` (an earlier snapshot of the same cache) only the
    records committed since are read, and only theirs are checked; `root` is the root
    attributes when the caller has read them already.

    A store whose transfers can tear (HTTP: a truncated or corrupted body) gets one more try
    from the store before a CacheError stands, root included on a first load."""
    try:
        return _load(loc, previous, root)
    except CacheError:
        if not loc.transfers_can_tear or previous is not None:
            raise
        return _load(loc, None, None)


def _load(loc, previous: LogSnapshot | None, root: dict | None) -> LogSnapshot:
    if previous is not None:
        root = previous.root
    elif root is None:
        root = read_root(loc)
    known = previous.records if previous is not None else {}
    try:
        records = load_records(loc, known, root, set(known))
    except CacheError:
        if not loc.transfers_can_tear:
            raise
        records = load_records(loc, known, root, set(known))  # a torn or corrupted index.json: once more
    st = replay(root, records)
    return LogSnapshot(loc, root, records, st.segments, st.retracted, st.declared, st.copy_of)


# ---------------------------------------------------------------------------------------
# which sequences a segment holds: sorted half-open runs [a, b) of seq_ids
#
# A harvest unit's sequences are consecutive, so its segment has a run or two: the checks
# below are O(segments · runs) on the log alone.


def ranges_of(ids) -> list[list[int]]:
    """[3, 4, 5, 9, 4] → [[3, 6], [9, 10]]."""
    u = np.unique(np.asarray(ids, dtype=np.int64))
    if not len(u):
        return []
    breaks = np.flatnonzero(np.diff(u) != 1) + 1
    starts = np.r_[0, breaks]
    ends = np.r_[breaks, len(u)]
    return [[int(u[a]), int(u[b - 1]) + 1] for a, b in zip(starts, ends, strict=True)]


def seq_ranges_of(record: dict) -> list[list[int]] | None:
    """A segment record's runs (checked by layout.check_record), else harvest's meta's, which held
    them before the format did (free-form: used only if well formed); None if unknown."""
    if "seq_ranges" in record:
        return record["seq_ranges"]
    meta = record.get("meta")
    r = meta.get("seq_ranges") if isinstance(meta, dict) else None
    return r if layout.runs_ok(r) else None


def holders(ranges, held: list[tuple[list, object]]) -> list:
    """Owners (in `held` order) whose runs share an id with `ranges`: a linear scan, as a commit
    check needs it once per commit."""
    return [owner for runs, owner in held if overlap(ranges, runs)]


def overlapping_pairs(held: list[tuple[list, object]]) -> list[tuple[object, object]]:
    """Every pair of owners whose runs share an id: one sweep over the sorted runs,
    O(R log R) in the number of runs R plus the pairs found."""
    runs = sorted((a, b, i) for i, (rs, _) in enumerate(held) for a, b in rs)
    active: list[tuple[int, int]] = []  # (end, owner index) of runs still open
    pairs: set[tuple[int, int]] = set()
    for a, b, i in runs:
        active = [(e, j) for e, j in active if e > a]
        for _, j in active:
            if j != i:
                pairs.add((min(i, j), max(i, j)))
        active.append((b, i))
    return [(held[i][1], held[j][1]) for i, j in sorted(pairs)]


def overlap(x, y) -> list[list[int]]:
    """The ids two sorted run lists share, as runs."""
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append([a, b])
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def describe(ranges) -> str:
    """Runs for a message: 'seq_ids 4..7, 12'."""
    parts = [f"{a}" if b == a + 1 else f"{a}..{b - 1}" for a, b in ranges[:3]]
    return "seq_ids " + ", ".join(parts) + (", ..." if len(ranges) > 3 else "")


# ---------------------------------------------------------------------------------------
# what makes a commit a duplicate: `refuse` checks for `commit`, each naming what holds the work


def sequences_taken(root: dict, ranges: list):
    """Refuse a segment whose sequences a live segment before it already holds."""

    def refuse(records: dict) -> str | None:
        live = replay(root, records).segments
        held = [(seq_ranges_of(s.record) or [], s) for s in live]
        for s in holders(ranges, held):
            shared = overlap(ranges, seq_ranges_of(s.record))
            return f"{describe(shared)} are already in segment {s.id} (commit {s.commit})"
        return None

    return refuse


def layer_taken(root: dict, segment_id: str, layer: int):
    """Refuse a backfilled layer that its segment already has (or a segment no longer live)."""

    def refuse(records: dict) -> str | None:
        st = replay(root, records)
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
        return f"layer {layer} is already declared" if layer in replay(root, records).declared else None

    return refuse
