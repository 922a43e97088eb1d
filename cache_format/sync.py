"""`sync`: copy the committed segments and backfilled layers DST lacks, checked, in SRC's order."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from . import commits, creation, integrity, layout, leases, provenance
from .errors import UserError
from .opener import open_cache
from .progress import progress_bar
from .stores import Location
from .verify import part_objects, segment_objects


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
    if not dloc.supports_writes:
        raise UserError(f"sync: {dst_url} is HTTP (read-only); sync into a local path or s3:// URL")
    root = src.root

    def tokenizer_bytes(name: str) -> bytes | None:
        want = root.get("tokenizer", {}).get(name)
        return integrity.read_checked(src.location, layout.tokenizer_key(name), want, commits.digest) if want else None

    try:  # a new destination is created crash-safely, or finished if an earlier sync was killed creating it
        droot, _ = creation.make_root(dloc, root, tokenizer_bytes)
    except OSError as e:
        raise UserError(f"cannot write to {dst_url} ({e}); choose a writable location") from None
    for k in ("d_model", "hook", "chunk_tokens"):
        if droot[k] != root[k]:
            raise UserError(
                f"sync: {k} differs ({root[k]} in {src_url}, {droot[k]} in {dst_url}); "
                "these caches cannot share segments"
            )
    dstate = commits.replay(droot, commits.load_records(dloc, {}))
    dsegs = {s.id: s for s in dstate.segments + dstate.retracted}
    for L in src.declared_layers:
        if L not in dstate.declared:
            commits.commit(dloc, {"kind": "add_layer", "layer": L, "provenance": provenance.record()})
    todo_segs = [s for s in src.committed_segments if s.id not in dsegs]
    todo_layers = [
        (s, L)
        for s in src.committed_segments
        if s.id in dsegs and not dsegs[s.id].retracted
        for L in s.layers
        if L not in dsegs[s.id].layers
    ]
    total = sum(sum(v["size"] for v in segment_objects(s).values()) for s in todo_segs)
    total += sum(sum(v["size"] for v in s.layers[L]["objects"].values()) for s, L in todo_layers)
    with progress_bar(total, f"sync → {dst_url}") as bar:
        for s in todo_segs:  # each copy holds a writer lease, so gc on DST leaves it alone
            objs = segment_objects(s)
            objs.update({k: None for k in _group_metadata_keys(s, root["hook"]) if _exists(src.location, k)})
            unit = layout.segment_dir(s.id)
            leases.hold(dloc, unit)
            try:
                _copy(src.location, dloc, objs, bar)
                record = json.loads(json.dumps(s.record))
                record["layers"] = {str(L): e for L, e in sorted(s.layers.items())}
                record["synced_from"] = {"url": src.url, "commit": s.commit}
                commits.commit(dloc, record)
            finally:
                leases.release(dloc, unit)
        for s, L in todo_layers:
            e = s.layers[L]
            objs = part_objects(e)
            objs[e["stats"]["path"]] = e["stats"]
            unit = layout.unit_of(e["array"]) or layout.segment_dir(s.id)
            leases.hold(dloc, unit)
            try:
                _copy(src.location, dloc, objs, bar)
                commits.commit(
                    dloc,
                    {
                        "kind": "layer",
                        "segment": s.id,
                        "layer": L,
                        "entry": e,
                        "synced_from": {"url": src.url, "commit": s.layer_commits[L]},
                        "provenance": provenance.record(),
                    },
                )
            finally:
                leases.release(dloc, unit)
    return {"segments": len(todo_segs), "layers": len(todo_layers), "bytes": total}


def _exists(loc: Location, key: str) -> bool:
    try:
        return loc.exists(key)
    except (FileNotFoundError, OSError, UserError):
        return False
