"""Whole-cache operations behind the CLI: verify, gc, sync, publish, stats, import, info."""

from __future__ import annotations

import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from . import commits, integrity, layout, leases, provenance
from .errors import CacheError, RemoteError, UserError
from .importer import import_dump, load_dump  # noqa: F401  (the CLI's `import` lives in importer.py)
from .arrays import _ArrayReader
from .opener import open_cache
from .reader import Cache
from .stats import RunningStats
from .store import Location, ShortRead


def _bar(total: int, desc: str, unit: str = "B", disable: bool | None = None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                file=sys.stderr, leave=False, disable=disable)


def _objects(record_or_entry: dict, part_path: str | None = None) -> dict[str, dict]:
    base = part_path or record_or_entry.get("path") or record_or_entry.get("array")
    return {f"{base}/{k}": v for k, v in record_or_entry["objects"].items()}


def segment_objects(seg) -> dict[str, dict]:
    """Every object a live segment references (all layers, rows, sequences, stats) → {size, blake2b}."""
    r = seg.record
    out = _objects(r["rows"])
    for e in seg.layers.values():
        out.update(_objects(e))
        out[e["stats"]["path"]] = e["stats"]
    if r.get("sequences"):
        out[r["sequences"]["path"]] = r["sequences"]
    return out


def _hash_objects(loc: Location, objects: dict, threads: int = 4, desc: str = "verify") -> list[tuple[str, str]]:
    bad = []
    with _bar(sum(v["size"] for v in objects.values()), desc) as bar:
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
    """Re-hash every object the live segments reference; returns (objects checked, problems)."""
    objects = {}
    for s in cache._segs:
        objects.update(segment_objects(s))
    for name, want in cache._root.get("tokenizer", {}).items():
        objects[layout.tokenizer_key(name)] = want
    return len(objects), _hash_objects(cache._loc, objects, threads)


def parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise UserError(f"--older-than {text!r}: use a duration like 24h, 90m, 2d or 3600s")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


MIN_GRACE_S = 3600  # below this, gc needs force=True (--force)


def gc(loc: Location, older_than_s: float = 86400, retracted: bool = False, dry_run: bool = False,
       force: bool = False) -> list[str]:
    """Delete objects no commit references (crashed writers' leftovers) older than the grace period.

    The unit is a segment directory (or a backfill directory): it is removed only when its
    newest object is older than the grace period and it holds no fresh writer lease
    (leases.py), so a live writer's work is never touched, whatever the grace period.
    With `retracted`, retracted segments' data goes too (their tombstones stay).
    """
    if older_than_s < MIN_GRACE_S and not force:
        raise UserError(f"gc --older-than {older_than_s:g}s is under an hour: a slow writer's uncommitted work "
                        "could go (leased segments are always kept); add --force if you mean it")
    # List the objects first, then read the log: a writer that commits (and drops its lease)
    # between the two is then seen as committed, never as an unleased leftover.
    now = time.time()
    units: dict[str, list] = {}
    for o in loc.walk(layout.SEGMENTS):
        unit = layout.unit_of(o.key)
        if unit is None:
            continue  # segments/zarr.json
        units.setdefault(unit, []).append(o)
    root = commits.read_root(loc)
    records = commits.load_records(loc, {})
    state = commits.replay(root, records)
    keep_units, dead_units = set(), set()
    for r in records.values():
        if r.get("kind") == "segment":
            keep_units.add(layout.segment_dir(r["segment"]))
        elif r.get("kind") == "layer":
            keep_units.add(r["entry"]["array"].split("/")[0] + "/" + "/".join(r["entry"]["array"].split("/")[1:3]))
    if retracted:
        for s in state.retracted:
            dead_units.add(layout.segment_dir(s.id))
    doomed = []
    for unit, objs in units.items():
        seg_unit = layout.segment_of_unit(unit)
        if seg_unit in dead_units:
            doomed += [o.key for o in objs]
        elif unit in keep_units or any(o.key.endswith(f"/{leases.LEASE}") and leases.fresh(o.mtime, now) for o in objs):
            continue  # committed, or a live writer's (its lease is fresh)
        elif now - max(o.mtime for o in objs) >= older_than_s:
            doomed += [o.key for o in objs]
    for o in loc.walk(commits.COMMITS):
        if o.key.split("/")[-1].startswith(".tmp-") and now - o.mtime >= older_than_s:
            doomed.append(o.key)
    if not dry_run and doomed:
        loc.delete(doomed)
        loc.remove_empty_dirs(layout.SEGMENTS)
    return doomed


def publish(loc: Location) -> int:
    """Write index.json: every commit record inline, for readers without listings (HTTP)."""
    records = commits.load_records(loc, {})
    loc.write(commits.INDEX, commits.dumps({"format": provenance.FORMAT_NAME, "version": provenance.FORMAT_VERSION,
                                    "commits": [{"name": n, "record": r} for n, r in records.items()]}))
    return len(records)


def _group_metadata_keys(seg, hook: str) -> list[str]:
    base = layout.segment_dir(seg.id)
    keys = [f"{base}/zarr.json", f"{base}/{hook}/zarr.json", f"{layout.rows_dir(base)}/zarr.json"]
    for e in seg.layers.values():
        parts = e["array"].split("/")
        if parts[2].startswith(layout.BACKFILL_PREFIX):
            keys += [f"{base}/{parts[2]}/zarr.json", f"{base}/{parts[2]}/{hook}/zarr.json"]
    return keys


def _copy(src: Location, dst: Location, objects: dict, bar) -> None:
    def one(item):
        key, want = item
        # sized and checked: a short body or a flipped byte in transit is re-read (retried like a
        # 500), and a copy that still does not match fails in one line naming the object
        data = src.read(key) if want is None else integrity.read_checked(src, key, want, commits.digest)
        dst.write(key, data)
        bar.update(len(data))

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(one, sorted(objects.items())))


def sync(src_url, dst_url, src_options=None, dst_options=None) -> dict:
    """Copy the committed segments (and backfilled layers) that DST lacks, verified, in SRC's order."""
    src = open_cache(src_url, storage_options=src_options)
    dloc = Location(dst_url, dst_options)
    if dloc.http:
        raise UserError(f"sync: {dst_url} is HTTP (read-only); sync into a local path or s3:// URL")
    root = src._root
    try:
        droot = commits.read_root(dloc)
    except CacheError:
        if dloc.exists(commits.ROOT_META):
            raise
        droot = None
    if droot is None:
        for name, want in root.get("tokenizer", {}).items():
            with _bar(0, "tokenizer") as bar:
                _copy(src._loc, dloc, {layout.tokenizer_key(name): want}, bar)
        doc = {"zarr_format": 3, "node_type": "group", "attributes": {provenance.FORMAT_NAME: root}}
        try:
            dloc.create_exclusive(commits.ROOT_META, commits.dumps(doc))
            dloc.create_exclusive(f"{commits.COMMITS}/{commits.ROOT_RECORD}", commits.dumps(commits.root_record(root)))
        except OSError as e:
            raise UserError(f"cannot write to {dst_url} ({e}); choose a writable location") from None
        droot = commits.read_root(dloc)
    for k in ("d_model", "hook", "chunk_tokens"):
        if droot[k] != root[k]:
            raise UserError(f"sync: {k} differs ({root[k]} in {src_url}, {droot[k]} in {dst_url}); "
                            "these caches cannot share segments")
    dstate = commits.replay(droot, commits.load_records(dloc, {}))
    dsegs = {s.id: s for s in dstate.segments + dstate.retracted}
    for L in src._state.declared:
        if L not in dstate.declared:
            commits.commit(dloc, {"kind": "add_layer", "layer": L, "provenance": provenance.record()})
    todo_segs = [s for s in src._segs if s.id not in dsegs]
    todo_layers = [(s, L) for s in src._segs if s.id in dsegs and not dsegs[s.id].retracted
                   for L in s.layers if L not in dsegs[s.id].layers]
    total = sum(sum(v["size"] for v in segment_objects(s).values()) for s in todo_segs)
    total += sum(sum(v["size"] for v in s.layers[L]["objects"].values()) for s, L in todo_layers)
    with _bar(total, f"sync → {dst_url}") as bar:
        for s in todo_segs:  # each copy holds a writer lease, so gc on DST leaves it alone
            objs = segment_objects(s)
            objs.update({k: None for k in _group_metadata_keys(s, root["hook"]) if _exists(src._loc, k)})
            unit = layout.segment_dir(s.id)
            leases.hold(dloc, unit)
            try:
                _copy(src._loc, dloc, objs, bar)
                record = json.loads(json.dumps(s.record))
                record["layers"] = {str(L): e for L, e in sorted(s.layers.items())}
                record["synced_from"] = {"url": src.url, "commit": s.commit}
                commits.commit(dloc, record)
            finally:
                leases.release(dloc, unit)
        for s, L in todo_layers:
            e = s.layers[L]
            objs = _objects(e)
            objs[e["stats"]["path"]] = e["stats"]
            unit = layout.unit_of(e["array"]) or layout.segment_dir(s.id)
            leases.hold(dloc, unit)
            try:
                _copy(src._loc, dloc, objs, bar)
                commits.commit(dloc, {"kind": "layer", "segment": s.id, "layer": L, "entry": e,
                                  "synced_from": {"url": src.url, "commit": s.layer_commits[L]},
                                  "provenance": provenance.record()})
            finally:
                leases.release(dloc, unit)
    return {"segments": len(todo_segs), "layers": len(todo_layers), "bytes": total}


def _exists(loc: Location, key: str) -> bool:
    try:
        return loc.exists(key) if not loc.http else bool(loc.read(key))
    except (FileNotFoundError, OSError, UserError):
        return False


# -- stats with dask: one task per shard ----------------------------------------------------


def _shard_stats(url: str, storage_options: dict | None, path: str, objects: dict, shard: int) -> dict:
    """Decode one shard and return its RunningStats as JSON (runs on a dask worker)."""
    r = _ArrayReader(Location(url, storage_options), path, objects)
    st = RunningStats(r.shape[1])
    k0 = shard * r.per_shard
    for k in range(k0, min(k0 + r.per_shard, r.n_chunks)):
        st.update_bits(r.chunk(k))
    return st.to_json()


def dask_stats(cache: Cache, layers: list[int] | None = None, scheduler: str | None = None,
               storage_options: dict | None = None) -> dict[int, dict]:
    """Recompute per-layer statistics from the shards: one dask task per shard, merged in order."""
    import dask

    layers = layers or cache.layers
    for L in layers:
        cache._check_layer(L)
    tasks, owners = [], []
    for L in layers:
        for si, s in enumerate(cache._segs):
            r = cache._array(si, L)
            n_shards = -(-r.shape[0] // r.shard_rows)
            for sh in range(n_shards):
                tasks.append(dask.delayed(_shard_stats, pure=True)(cache.url, storage_options, r.path, r.objects, sh))
                owners.append(L)
    if scheduler:
        from distributed import Client, as_completed

        try:
            client = Client(scheduler, timeout=10)
        except (OSError, TimeoutError) as e:
            raise UserError(f"cannot reach the dask scheduler at {scheduler} ({e}); check the address") from None
        with client:
            futures = client.compute(tasks)
            index = {f.key: i for i, f in enumerate(futures)}
            results = [None] * len(futures)
            with _bar(len(futures), "stats", unit="shard") as bar:
                for f in as_completed(futures):
                    results[index[f.key]] = f.result()
                    bar.update(1)
    else:
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=sys.stderr, minimum=2):
            results = list(dask.compute(*tasks, scheduler="threads"))
    out = {L: RunningStats(cache.d_model) for L in layers}
    for L, j in zip(owners, results):
        out[L].merge(RunningStats.from_json(j))
    return {L: st.summary() for L, st in out.items()}


# -- info -------------------------------------------------------------------------------------


def rows_by_source(cache: Cache) -> dict[str, int]:
    """Rows per corpus source, summed from the segments' `rows_by_source` meta (a mixture's measured shares)."""
    out: dict[str, int] = {}
    for s in cache.segments:
        for name, n in (s.meta.get("rows_by_source") or {}).items():
            out[name] = out.get(name, 0) + int(n)
    return out


def info(cache: Cache) -> dict:
    stored = {}
    for L in cache.declared_layers:
        stored[L] = sum(v["size"] for s in cache._segs if L in s.layers for v in s.layers[L]["objects"].values())
    cov = cache.layer_coverage()
    n_segs = len(cache._segs)
    raw = cache.n_tokens * cache.d_model * 2
    return {
        "url": cache.url, "fingerprint": cache.fingerprint, "d_model": cache.d_model, "hook": cache.hook,
        "layers": cache.layers, "n_tokens": cache.n_tokens, "n_segments": n_segs, "codec": cache.codec,
        "chunk_tokens": cache.chunk_tokens, "shard_rows": cache._root["shard_rows"],
        "layer_fingerprints": {str(L): cache.layer_fingerprint(L) for L in cache.layers},
        "declared_layers": {str(L): {"segments": cov[L], "complete": cov[L] == n_segs,
                                     "stored_bytes": stored[L],
                                     "ratio_vs_raw_bf16": (stored[L] / raw) if raw and cov[L] == n_segs else None}
                            for L in cache.declared_layers},
        "retracted": cache.retracted,
        "rows_by_source": rows_by_source(cache),
        "meta": cache.meta,
        "segments": [{"id": s.id, "row_start": s.row_start, "n_rows": s.n_rows, "layers": s.layers,
                      "commit": s.commit, "meta": s.meta} for s in cache.segments],
    }
