"""Whole-cache operations, the work behind `python -m cache_format`: info, verify (checksums
and duplicated rows), gc, upgrade, publish, stats recomputed with dask, and a Hub dataset card.

Each reads the commit log through a `Cache`'s `log` snapshot (log.py) or `log.load`: records,
manifests, root attributes. Sharing (`sync`) and `import` have modules of their own.
"""

from __future__ import annotations

import collections
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import concurrency, integrity, layout, log, provenance
from .commandline import dask_client, progress_bar
from .errors import CacheError, RemoteError, UserError
from .read import ArrayReader, Cache
from .stats import RunningStats
from .stores import Location, ShortRead

# -- info ---------------------------------------------------------------------------------


def rows_by_source(cache: Cache) -> dict[str, int]:
    """Rows per corpus source, summed from the segments' `rows_by_source` meta (a mixture's measured shares)."""
    out: dict[str, int] = {}
    for s in cache.segments:
        for name, n in (s.meta.get("rows_by_source") or {}).items():
            out[name] = out.get(name, 0) + int(n)
    return out


def info(cache: Cache) -> dict:
    """What a cache holds, as one dict (the CLI prints it or dumps it as JSON)."""
    segs = cache.log.segments
    stored = {}
    for L in cache.declared_layers:
        stored[L] = sum(v["size"] for s in segs if L in s.layers for v in s.layers[L]["objects"].values())
    cov = cache.layer_coverage()
    n_segs = len(segs)
    raw = cache.n_tokens * cache.d_model * 2
    return {
        "url": cache.url,
        "fingerprint": cache.fingerprint,
        "d_model": cache.d_model,
        "hook": cache.hook,
        "layers": cache.layers,
        "n_tokens": cache.n_tokens,
        "n_segments": n_segs,
        "codec": cache.codec,
        "chunk_tokens": cache.chunk_tokens,
        "shard_rows": cache.shard_rows,
        "layer_fingerprints": {str(L): cache.layer_fingerprint(L) for L in cache.layers},
        "declared_layers": {
            str(L): {
                "segments": cov[L],
                "complete": cov[L] == n_segs,
                "stored_bytes": stored[L],
                "ratio_vs_raw_bf16": (stored[L] / raw) if raw and cov[L] == n_segs else None,
            }
            for L in cache.declared_layers
        },
        "retracted": cache.retracted,
        "copy_of": cache.copy_of,
        "rows_by_source": rows_by_source(cache),
        "meta": cache.meta,
        "segments": [
            {
                "id": s.id,
                "row_start": s.row_start,
                "n_rows": s.n_rows,
                "layers": s.layers,
                "commit": s.commit,
                "meta": s.meta,
            }
            for s in cache.segments
        ],
    }


# -- verify: every object against its manifest, then duplicated rows -------------------------


def _hash_objects(loc: Location, objects: dict, threads: int = 4, desc: str = "verify") -> list[tuple[str, str]]:
    bad = []
    with progress_bar(sum(v["size"] for v in objects.values()), desc) as bar:

        def check(item):
            key, want = item
            for attempt in range(2):  # a mismatch is re-read once: a torn transfer is not a bad object
                try:
                    data = loc.read(key, reread=attempt > 0, size=want["size"])
                except FileNotFoundError:
                    return key, "missing"
                except RemoteError as e:
                    if not isinstance(e.__cause__, ShortRead):
                        raise
                    data = b""  # shorter than its manifest on every attempt
                if len(data) != want["size"]:
                    why = f"size {len(data)} != {want['size']}"
                elif not log.matches(want, data):
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
    snap = cache.log
    objects = {}
    for s in snap.segments:
        objects.update(log.segment_objects(s))
    for name, want in snap.tokenizer().items():
        objects[layout.tokenizer_key(name)] = want
    bad = _hash_objects(snap.loc, objects, threads)
    return len(objects), bad or all_duplicates(cache)


# -- duplicated rows: a (seq_id, position) held by two live segments, or a sequence recorded twice
#
# A cache holding a row twice serves it twice per epoch, and nothing else notices: the loader,
# the stats and the fingerprint all take it as data.


def _pairs(seq_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    out = np.empty(len(seq_ids), dtype=[("s", "<i8"), ("p", "<i8")])
    out["s"], out["p"] = seq_ids, positions
    return out


def _fix(url: str, seg_id: str) -> str:
    return f"retract one copy: python -m cache_format retract {url} {seg_id}"


def _segment_pairs(cache: Cache, seg) -> np.ndarray:
    """One segment's (seq_id, position) pairs (`seg`: a SegmentInfo)."""
    a, b = seg.row_start, seg.row_start + seg.n_rows
    return _pairs(cache.seq_ids[a:b], cache.positions[a:b])


class _Columns:
    """Segments' (seq_id, position) pairs, read once and dropped when no pair needs them."""

    def __init__(self, cache: Cache, needed: collections.Counter):
        self.cache, self.needed, self.got = cache, needed, {}
        self.info = {s.id: s for s in cache.segments}

    def __call__(self, seg_id: str) -> np.ndarray:
        if seg_id not in self.got:
            self.got[seg_id] = _segment_pairs(self.cache, self.info[seg_id])
        out = self.got[seg_id]
        self.needed[seg_id] -= 1
        if self.needed[seg_id] <= 0:
            del self.got[seg_id]
        return out


def _confirm(cache: Cache, held: list[tuple[list, str]], stop_at_first: bool) -> list[tuple[str, str]]:
    """Read the columns of segments whose runs overlap; a problem per pair that shares rows."""
    order = {s.id: i for i, s in enumerate(cache.segments)}
    pairs = sorted(log.overlapping_pairs(held), key=lambda p: (order[p[0]], order[p[1]]))
    runs = dict((o, r) for r, o in held)
    columns = _Columns(cache, collections.Counter(x for p in pairs for x in p))
    problems = []
    for a, b in pairs:
        a, b = sorted((a, b), key=order.get)  # b: the later commit, the one to retract
        shared = log.overlap(runs[a], runs[b])
        pa, pb = columns(a), columns(b)
        both = np.intersect1d(_within(pa, shared), _within(pb, shared))
        if len(both):
            problems.append(
                (
                    f"segments {a} and {b}",
                    f"both hold {len(both)} rows (first: seq_id {int(both[0]['s'])}, position "
                    f"{int(both[0]['p'])}), so every reader sees them twice; {_fix(cache.url, b)}",
                )
            )
            if stop_at_first:
                break
    return problems


def _within(pairs: np.ndarray, runs: list) -> np.ndarray:
    keep = np.zeros(len(pairs), bool)
    for a, b in runs:
        keep |= (pairs["s"] >= a) & (pairs["s"] < b)
    return pairs[keep]


def quick_duplicates(cache: Cache, stop_at_first: bool = False) -> list[tuple[str, str]]:
    """Duplicated rows found from the log's runs: `train run`'s check; [(where, why)].

    Segments whose recorded sequence runs (`seq_ranges`) overlap are the only candidates, and
    only their seq_id and position columns are read to confirm: O(R log R) in the log's runs
    (about one per segment) plus the rows of overlapping segments, none in a cache without
    duplicates, so a 200M-token cache is checked without reading a row. Segments that record no
    runs (written before the format did, and not by harvest) are left to `verify`."""
    held = [(s.seq_ranges, s.id) for s in cache.segments if s.seq_ranges]
    return _confirm(cache, held, stop_at_first)


def all_duplicates(cache: Cache) -> list[tuple[str, str]]:
    """Every duplicated row and sequence record of the live segments: `verify`'s check. It trusts
    no record: it reads every segment's seq_ids and positions (one segment at a time) and its
    sequences table, checks each segment's runs against its rows and its rows against each
    other, then confirms overlapping pairs."""
    problems, held = [], []
    recorded_twice: dict[int, list[str]] = collections.defaultdict(list)
    for s, st in zip(cache.segments, cache.log.segments, strict=True):
        pairs = _segment_pairs(cache, s)
        runs = log.ranges_of(pairs["s"])
        if s.seq_ranges is not None and s.seq_ranges != runs:
            problems.append(
                (f"segment {s.id}", "its record's seq_ranges differ from its rows' seq_ids; " + _fix(cache.url, s.id))
            )
        uniq, counts = np.unique(pairs, return_counts=True)
        if (counts > 1).any():
            first = uniq[np.argmax(counts > 1)]
            problems.append(
                (
                    f"segment {s.id}",
                    f"holds {int((counts > 1).sum())} rows twice (first: seq_id {int(first['s'])}, position "
                    f"{int(first['p'])}); {_fix(cache.url, s.id)}",
                )
            )
        held.append((runs, s.id))
        for sid in _recorded_seq_ids(cache.log.loc, st.record.get("sequences")):
            recorded_twice[sid].append(s.id)
    problems += _confirm(cache, held, stop_at_first=False)
    twice = {sid: segs for sid, segs in recorded_twice.items() if len(segs) > 1}
    by_segments = collections.defaultdict(list)
    for sid, segs in sorted(twice.items()):
        by_segments[tuple(dict.fromkeys(segs))].append(sid)
    for segs, sids in by_segments.items():
        where = f"segment {segs[0]}" if len(segs) == 1 else "segments " + " and ".join(segs)
        what = (
            f"{len(sids)} sequences are recorded more than once (first: seq_id {sids[0]})"
            if len(sids) > 1
            else f"sequence {sids[0]} is recorded more than once"
        )
        problems.append((where, f"{what}; {_fix(cache.url, segs[-1])}"))
    return problems


def _recorded_seq_ids(loc: Location, q: dict | None) -> list[int]:
    """The seq_ids of one segment's sequences table (`q`: its record's entry), read checked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not q:
        return []
    data = integrity.read_checked(loc, q["path"], q)
    return pq.read_table(pa.BufferReader(data), columns=["seq_id"]).column("seq_id").to_pylist()


def refuse_duplicates(cache: Cache) -> None:
    """A one-line CacheError if the log shows duplicated rows (`quick_duplicates`): the check `train run` makes."""
    found = quick_duplicates(cache, stop_at_first=True)
    if found:
        where, why = found[0]
        raise CacheError(f"{cache.url} holds duplicated rows: {where} {why} (then run verify)")


# -- gc: what no commit references (crashed writers' leftovers), never a leased unit ----------


def parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise UserError(f"--older-than {text!r}: use a duration like 24h, 90m, 2d or 3600s")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


MIN_GRACE_S = 3600  # below this, gc needs force=True (--force)


def gc(
    loc: Location, older_than_s: float = 86400, retracted: bool = False, dry_run: bool = False, force: bool = False
) -> list[str]:
    """Delete objects no commit references (crashed writers' leftovers) older than the grace period.

    The unit is a segment directory (or a backfill directory): it is removed only when its
    newest object is older than the grace period and it holds no live writer lease
    (concurrency.py), so a live writer's work is never touched, whatever the grace period.
    With `retracted`, retracted segments' data goes too (their tombstones stay).
    """
    if older_than_s < MIN_GRACE_S and not force:
        raise UserError(
            f"gc --older-than {older_than_s:g}s is under an hour: a slow writer's uncommitted work "
            "could go (leased segments are always kept); add --force if you mean it"
        )
    # List the objects first, then read the log: a writer that commits (and drops its lease)
    # between the two is then seen as committed, never as an unleased leftover.
    now = time.time()
    units: dict[str, list] = {}
    for o in loc.walk(layout.SEGMENTS):
        unit = layout.unit_of(o.key)
        if unit is None:
            continue  # segments/zarr.json
        units.setdefault(unit, []).append(o)
    snap = log.load(loc)
    keep_units, dead_units = set(), set()
    for r in snap.records.values():
        if r.get("kind") == "segment":
            keep_units.add(layout.segment_dir(r["segment"]))
        elif r.get("kind") == "layer":
            keep_units.add(r["entry"]["array"].split("/")[0] + "/" + "/".join(r["entry"]["array"].split("/")[1:3]))
    if retracted:
        for s in snap.retracted:
            dead_units.add(layout.segment_dir(s.id))
    doomed = []
    for unit, objs in units.items():
        seg_unit = layout.segment_of_unit(unit)
        if seg_unit in dead_units:
            doomed += [o.key for o in objs]
        elif unit in keep_units or any(
            o.key.endswith(f"/{concurrency.LEASE}") and concurrency.live(o.mtime, now) for o in objs
        ):
            continue  # committed, or a live writer's (its lease is live)
        elif now - max(o.mtime for o in objs) >= older_than_s:
            doomed += [o.key for o in objs]
    for o in loc.walk(log.COMMITS):
        if o.key.split("/")[-1].startswith(".tmp-") and now - o.mtime >= older_than_s:
            doomed.append(o.key)
    if not dry_run and doomed:
        loc.delete(doomed)
        loc.remove_empty_dirs(layout.SEGMENTS)
    return doomed


# -- upgrade: a format-1 cache gets chunk digests and a chained log --------------------------


def _part_chunks(loc: Location, base: str, objects: dict) -> dict:
    out, per_shard = {}, {}
    for key, want in sorted(objects.items()):
        k = "/" + key
        if "/c/" not in k or "chunks" in want:
            continue
        pre = k[1 : k.index("/c/") + 1]  # "tokens/" for a row column, "" for a residual array
        if pre not in per_shard:
            meta = integrity.read_checked(loc, f"{base}/{pre}zarr.json", objects.get(f"{pre}zarr.json"))
            per_shard[pre] = integrity.per_shard_of(json.loads(meta))
        data = integrity.read_checked(loc, f"{base}/{key}", want)
        out[key] = integrity.shard_chunk_digests(data, per_shard[pre], f"{base}/{key}")
    return out


def upgrade(loc: Location) -> dict:
    """Give a cache written by format 1 what format 2 readers check: one `upgrade` commit, if
    anything lacks digests, carrying the chunk digests of every shard object that lacks them
    (computed after the object's BLAKE2b is checked against its manifest, so only good data gets
    digests), the digest of the root attributes and the digest of every record before it.
    Stored objects and records are immutable, so nothing is rewritten; commits after it are
    chained. Returns what it covered."""
    snap = log.load(loc)
    root, records = snap.root, snap.records
    chunks = {}
    for s in snap.segments:
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
        "root": log.root_digest(root),
        "pinned": {n: log.record_digest(r) for n, r in records.items()},
        "chunks": chunks,
        "provenance": provenance.record(),
    }
    name = log.commit(loc, record)
    return {"objects": sum(len(v) for v in chunks.values()), "records": len(unchained), "commit": name}


# -- publish: an index.json of every commit record, for readers without listings (HTTP) -------


def publish(loc: Location) -> int:
    """Write index.json: every commit record inline, for readers without listings (HTTP)."""
    records = log.load(loc).records
    loc.write(
        log.INDEX,
        log.dumps(
            {
                "format": provenance.FORMAT_NAME,
                "version": provenance.FORMAT_VERSION,
                "commits": [{"name": n, "record": r} for n, r in records.items()],
            }
        ),
    )
    return len(records)


# -- stats: recomputed from the shards with dask, one task per shard ---------------------------


def _shard_stats(url: str, storage_options: dict | None, path: str, objects: dict, shard: int) -> dict:
    """Decode one shard and return its RunningStats as JSON (runs on a dask worker)."""
    r = ArrayReader(Location(url, storage_options), path, objects)
    st = RunningStats(r.shape[1])
    k0 = shard * r.per_shard
    for k in range(k0, min(k0 + r.per_shard, r.n_chunks)):
        st.update_bits(r.chunk(k))
    return st.to_json()


def dask_stats(
    cache: Cache, layers: list[int] | None = None, scheduler: str | None = None, storage_options: dict | None = None
) -> dict[int, dict]:
    """Recompute per-layer statistics from the shards: one dask task per shard, merged in order."""
    import dask

    snap = cache.log
    layers = layers or cache.layers
    for L in layers:
        snap.check_layer(L)
    tasks, owners = [], []
    for L in layers:
        for s in snap.segments:
            r = ArrayReader(snap.loc, s.layers[L]["array"], s.layers[L]["objects"])
            for sh in range(-(-r.shape[0] // r.shard_rows)):
                tasks.append(dask.delayed(_shard_stats, pure=True)(cache.url, storage_options, r.path, r.objects, sh))
                owners.append(L)
    if scheduler:
        from distributed import as_completed

        with dask_client(scheduler, fix="check the address") as client:
            futures = client.compute(tasks)
            index = {f.key: i for i, f in enumerate(futures)}
            results = [None] * len(futures)
            with progress_bar(len(futures), "stats", unit="shard") as bar:
                for f in as_completed(futures):
                    results[index[f.key]] = f.result()
                    bar.update(1)
    else:
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=sys.stderr, minimum=2):
            results = list(dask.compute(*tasks, scheduler="threads"))
    out = {L: RunningStats(cache.d_model) for L in layers}
    for L, j in zip(owners, results, strict=True):
        out[L].merge(RunningStats.from_json(j))
    return {L: st.summary() for L, st in out.items()}


# -- card: a Hugging Face dataset card (README.md), written from the cache's own provenance ----
#
# What a reader of the Hub page needs to trust and use the activations without opening them:
# the model and revision, the hook and layers, rows and sequences, the source, the codec and
# stored size, the fingerprints an SAE records, how to load it, and the license. The YAML front
# matter is what the Hub reads (license, pretty_name, tags, size_categories, source_datasets);
# `viewer: false` because the Hub's dataset viewer cannot read zarr shards.

_HUB = (
    re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@[^/]+)?(?:/(?P<path>.*))?$"),
    re.compile(r"^https?://[^/]+/datasets/(?P<repo>[^/]+/[^/]+)/resolve/[^/]+(?:/(?P<path>.*))?$"),
)
_SIZES = [(1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (1e6, "100K<n<1M"), (1e7, "1M<n<10M")]
_SIZES += [(1e8, "10M<n<100M"), (1e9, "100M<n<1B"), (1e10, "1B<n<10B"), (1e11, "10B<n<100B"), (1e12, "100B<n<1T")]


def hub_address(url: str) -> tuple[str, str] | None:
    """(repo id, path in the repo) of a Hub cache URL; None for any other URL."""
    for pat in _HUB:
        m = pat.match(url.rstrip("/"))
        if m:
            return m["repo"], m["path"] or ""
    return None


def size_category(n: int) -> str:
    """The Hub's `size_categories` bucket for n rows."""
    return next((name for top, name in _SIZES if n < top), "n>1T")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _source_lines(source: dict) -> tuple[list[str], list[str]]:
    """Table rows describing the source, and the hub datasets it drew from."""
    if not source:
        return ["| source | not recorded |"], []
    name = source.get("name", "?")
    if name == "supergpqa":
        ds = source.get("dataset", "")
        rev = source.get("revision") or "main"
        rows = [f"| source | SuperGPQA rollouts: `{ds}` @ `{rev}`, split `{source.get('split')}`, "]
        rows[0] += f"seed {source.get('seed')} |"
        return rows, [ds] if "/" in ds else []
    if name == "corpus":
        parts, hub = [], []
        for s in source.get("sources", []):
            label = s.get("name") or s.get("path")
            parts.append(f"`{label}` (weight {s.get('weight')})")
            if "/" in str(s.get("path", "")) and not str(s.get("path")).startswith(("/", ".")):
                hub.append(s["path"])
        rows = [f"| source | packed corpus text, {source.get('seq_len')}-token sequences, seed {source.get('seed')}: "]
        rows[0] += ", ".join(parts) + " |"
        return rows, hub
    return [f"| source | `{name}` |"], []


def card(cache: Cache, repo: str | None = None, path: str | None = None, license: str = "other") -> str:
    """The README.md text for `cache` as uploaded to dataset `repo` at `path` (read from a Hub
    URL when the cache was opened from one)."""
    where = hub_address(cache.url)
    if repo is None and where is None:
        raise UserError(
            "card: name the Hub dataset repo the cache will be uploaded to with --repo ORG/NAME "
            "(and --path if it goes in a folder of the repo)"
        )
    repo = repo or where[0]
    path = (path if path is not None else (where[1] if where else "")).strip("/")
    from huggingface_hub import DatasetCard, DatasetCardData

    d = info(cache)
    meta = d["meta"]
    model = meta.get("model", {})
    name = model.get("name_or_path") or "an unrecorded model"
    hook = meta.get("hook", {})
    layers = ", ".join(map(str, d["layers"])) or "none"
    sequences = sum((s.record.get("sequences") or {}).get("count", 0) for s in cache.log.segments)
    stored = sum(v["stored_bytes"] for v in d["declared_layers"].values())
    source_rows, hub_sources = _source_lines(meta.get("source", {}))
    address = f"hf://datasets/{repo}" + (f"/{path}" if path else "")
    data = DatasetCardData(
        license=license,
        pretty_name=f"{name} activations ({d['hook']}, layers {layers})",
        tags=["activations", "interpretability", "sparse-autoencoders", "residual-stream", "zarr", "actcache"],
        size_categories=[size_category(d["n_tokens"])],
        source_datasets=hub_sources or None,
        viewer=False,
    )
    first = d["layers"][0] if d["layers"] else "LAYER"
    ratios = [v["ratio_vs_raw_bf16"] for v in d["declared_layers"].values() if v["ratio_vs_raw_bf16"]]
    ratio = f" ({sum(ratios) / len(ratios):.2f}× raw bf16)" if ratios else ""
    revision = model.get("revision") or "main"
    commit = f", commit `{model['commit']}`" if model.get("commit") else ""
    prov = meta.get("cache_format", {})
    code = prov.get("code", {})
    lines = [
        f"# {data.pretty_name}",
        "",
        f"Residual-stream activations of `{name}`, one bf16 row per token, in an actcache cache: a zarr v3 "
        "group of sharded, checksummed, append-only segments. Train sparse autoencoders on it without "
        "running the model.",
        "",
        "| | |",
        "|---|---|",
        f"| model | `{name}` @ `{revision}`{commit}, run in {model.get('dtype', '?')} |",
        f"| hook | `{d['hook']}`: {hook.get('meaning', 'see the cache provenance')}"
        + (f" (`{hook['module_path']}`)" if hook.get("module_path") else "")
        + " |",
        f"| layers | {layers} (d_model {d['d_model']}) |",
        f"| tokens | {d['n_tokens']:,} rows in {d['n_segments']} segments |",
        f"| sequences | {sequences:,} |",
        *source_rows,
        f"| storage | {_gib(stored)}{ratio}; codec `{d['codec']}`, chunks of {d['chunk_tokens']:,} rows, "
        f"shards of {d['shard_rows']:,} rows |",
        f"| format | actcache cache format {prov.get('format', {}).get('version', '?')}, written by actcache "
        f"{code.get('version', '?')}" + (f" ({code['git_commit'][:12]})" if code.get("git_commit") else "") + " |",
    ]
    if cache.copy_of:
        sel = cache.copy_of
        segs = "all segments" if sel["segments"] is None else f"{len(sel['segments'])} segments"
        lines.append(
            f"| partial copy | of `{sel['url']}` (root `{sel['root'][:16]}`): layers {sel['layers']}, {segs} |"
        )
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "import cache_format as cf  # actcache",
        "",
        f'c = cf.open_cache("{address}")  # pinned to the commit main names now; add @<commit> to fix one',
        f"x = c.residuals({first})[0:4096]  # torch.bfloat16 (4096, {d['d_model']})",
        "tokens, roles, labels = c.tokens[0:4096], c.roles[0:4096], c.labels[0:4096]",
        "```",
        "",
        f"Train SAEs from it: `python -m train run --cache {address} --out runs/x`. Copy one layer: "
        f"`python -m cache_format sync {address} ./cache --layers {first}`. The same cache is at "
        f"`https://huggingface.co/datasets/{repo}/resolve/main{'/' + path if path else ''}` over plain HTTP.",
        "",
        "## Fingerprints",
        "",
        "Content fingerprints (sha256 over the committed manifests): an SAE trained on a layer records that "
        "layer's, and `python -m cache_format verify` re-hashes every object against the manifests.",
        "",
        "| | fingerprint |",
        "|---|---|",
        f"| cache | `{d['fingerprint']}` |",
        *(f"| layer {L} | `{fp}` |" for L, fp in d["layer_fingerprints"].items()),
        "",
        "## License",
        "",
        f"`{license}`. These activations are derived from `{name}`; its license applies to them too.",
        "",
    ]
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines)))
