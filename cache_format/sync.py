"""`sync`: copy committed segments into DST, checked, in SRC's order: all of them, or a
partial copy of chosen layers and segments.

A plain sync copies the live segments DST lacks (with every layer) and layers SRC backfilled
into segments DST has. A partial sync (`layers`, `segments` or `tokens`) makes DST a partial
copy of SRC: the chosen layers' residual arrays and stats, with every copied segment's row
columns and sequences, and the tokenizer. Its root names SRC (URL, root digest) and the
selection; a later sync with more layers or segments widens it with a `copy` record, and a
plain sync into it catches up with SRC within its selection. The selection is always a
rectangle: every copied segment carries every copied layer, so `c.layers` is the selection's.

Objects move in bounded memory, checked as the bytes pass, resumable. A large object is read
in blocks (`BLOCK`, 16 MiB: also the S3 part size) into two of a few buffers shared by the
process (`BLOCKS`): while one block is received, a helper thread hashes the one before and
appends it to the destination's `Upload` (stores/base.py), so the source keeps sending while
the check runs, and copies hold a fixed amount of memory whatever the objects' size and the
number of threads. The checksum is the manifest's (BLAKE2b-256 of the whole object); an object
is published only when it matches, else copied once more, re-reading the source, then refused
in one line naming it (as integrity.read_checked does for small objects). A copy killed half
way leaves its upload behind, and the next copy continues at the byte where it stopped,
checksumming the bytes already there too. An object DST already holds whole with the same
checksum is not copied again.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import concurrency, integrity, layout, log, provenance, write
from .commandline import progress_bar
from .errors import CacheError, UserError
from .stores import Location

WINDOW = 8  # units (segments, layers) copied ahead of the one committing next
BLOCK = 16 << 20
SMALL = 1 << 20  # objects up to this size are read whole (metadata, stats, small row columns)


def parse_segments(text: str) -> tuple[int | None, int | None]:
    """`--segments A:B` (either end may be left out) → (A, B)."""
    a, sep, b = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return (int(a) if a.strip() else None, int(b) if b.strip() else None)
    except ValueError:
        raise UserError(
            f"--segments {text!r}: expected A:B, segment numbers in SRC's commit order (e.g. 0:10; see `info`)"
        ) from None


@dataclass
class Unit:
    """One commit's worth of copying: a segment, or one layer of a segment DST already has."""

    lease: str
    objects: dict  # key → manifest entry (None: unmanifested group metadata)
    record: dict
    layer_bytes: dict = field(default_factory=dict)  # layer (or "rows") → (objects, bytes)


@dataclass
class Plan:
    """What a sync will do; `dry_run` stops here."""

    create: dict | None  # DST's root attributes to create (None: DST exists)
    add_layers: list
    selection: dict | None  # a `copy` record widening a partial copy
    units: list
    tokenizer: dict  # key → manifest entry, copied with a new root

    def summary(self) -> dict:
        """Objects and bytes per part: each layer, the rows (columns, sequences, group metadata), the tokenizer."""
        out: dict = {}

        def add(name, n, b):
            o = out.setdefault(str(name), {"objects": 0, "bytes": 0})
            o["objects"] += n
            o["bytes"] += b

        for u in self.units:
            for name, (n, b) in u.layer_bytes.items():
                add(name, n, b)
        if self.tokenizer:
            add("tokenizer", len(self.tokenizer), sum(v["size"] for v in self.tokenizer.values()))
        order = sorted(out, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
        return {k: out[k] for k in order}  # layers in order, then rows and tokenizer


def _group_metadata_keys(sid: str, entries, hook: str, with_segment: bool) -> list[str]:
    base = layout.segment_dir(sid)
    keys = []
    if with_segment:  # the groups above the arrays (zarr opens the hierarchy through them; readers never need them)
        keys = [f"{layout.SEGMENTS}/zarr.json", f"{base}/zarr.json", f"{base}/{hook}/zarr.json"]
        keys.append(f"{layout.rows_dir(base)}/zarr.json")
    for e in entries:
        parts = e["array"].split("/")
        if parts[2].startswith(layout.BACKFILL_PREFIX):
            keys += [f"{base}/{parts[2]}/zarr.json", f"{base}/{parts[2]}/{hook}/zarr.json"]
        elif not with_segment:
            keys.append(f"{base}/{hook}/zarr.json")
    return sorted(set(keys))


def _layer_objects(e: dict) -> dict:
    objs = log.part_objects(e)
    objs[e["stats"]["path"]] = e["stats"]
    return objs


def _segment_unit(s, layers: list[int], src_url: str, hook: str) -> Unit:
    r = s.record
    record = json.loads(json.dumps(r))
    record["layers"] = {str(L): s.layers[L] for L in sorted(layers)}
    record["synced_from"] = {"url": src_url, "commit": s.commit}
    objs = log.part_objects(r["rows"])
    sizes = {"rows": (len(objs), sum(v["size"] for v in objs.values()))}
    if r.get("sequences"):
        objs[r["sequences"]["path"]] = r["sequences"]
        n, b = sizes["rows"]
        sizes["rows"] = (n + 1, b + r["sequences"]["size"])
    for L in sorted(layers):
        lo = _layer_objects(s.layers[L])
        objs.update(lo)
        sizes[L] = (len(lo), sum(v["size"] for v in lo.values()))
    groups = _group_metadata_keys(s.id, [s.layers[L] for L in layers], hook, True)
    objs.update({k: None for k in groups})
    n, b = sizes["rows"]
    sizes["rows"] = (n + len(groups), b)
    return Unit(layout.segment_dir(s.id), objs, record, sizes)


def _layer_unit(s, L: int, src_url: str, hook: str) -> Unit:
    e = s.layers[L]
    objs = _layer_objects(e)
    size = (len(objs), sum(v["size"] for v in objs.values()))
    objs.update({k: None for k in _group_metadata_keys(s.id, [e], hook, False)})
    record = {
        "kind": "layer",
        "segment": s.id,
        "layer": L,
        "entry": e,
        "synced_from": {"url": src_url, "commit": s.layer_commits[L]},
        "provenance": provenance.record(),
    }
    return Unit(layout.unit_of(e["array"]) or layout.segment_dir(s.id), objs, record, {L: size})


def _source_url(src) -> str:
    """What a partial copy records as its source: a local path made absolute."""
    return src.url if "://" in src.url else os.path.abspath(src.url)


def _check_layers(src: log.LogSnapshot, layers, what: str) -> None:
    have = src.layers
    for L in layers:
        if L in have:
            continue
        if L in src.coverage():
            src.check_layer(L)  # "only in k of n segments (backfill pending)"
        listed = ", ".join(map(str, have)) or "none"
        raise UserError(f"sync: layer {L}{what} is not in {src.url} (its layers: {listed}); choose among those")


def _selected(src: log.LogSnapshot, segments, tokens) -> list[str] | None:
    """Ids of the SRC segments a selection names (None: all, as of each sync)."""
    segs = src.segments
    if segments is not None:
        a, b = parse_segments(segments) if isinstance(segments, str) else segments
        n = len(segs)
        a, b = 0 if a is None else a, n if b is None else b
        if not 0 <= a < b <= n:
            raise UserError(
                f"sync: --segments {a}:{b} is outside {src.url}'s {n} segments (0:{n}); "
                "choose A:B with 0 <= A < B <= " + str(n)
            )
        return [s.id for s in segs[a:b]]
    if tokens is not None:
        total = sum(s.record["n_rows"] for s in segs)
        if tokens <= 0 or tokens > total:
            raise UserError(f"sync: --tokens {tokens}: {src.url} holds {total:,} rows; ask for 1 to {total}")
        out, n = [], 0
        for s in segs:
            if n >= tokens:
                break
            out.append(s.id)
            n += s.record["n_rows"]
        return out
    return None


def _read_dst(dloc: Location) -> tuple[dict | None, log.LogState | None, bool]:
    """DST's root attributes and replayed log (None, None: nothing there), and whether its
    creation was interrupted (a root without its log, which this sync finishes: write.make_root)."""
    try:
        root = log.read_root(dloc)
    except log.NotACacheError:
        return None, None, False
    except CacheError:
        if dloc.exists(log.ROOT_META):
            raise
        return None, None, False
    try:
        return root, log.replay(root, log.load_records(dloc, {}, root)), False
    except log.UnfinishedCacheError:
        return root, log.replay(root, {}), True


def plan(src: log.LogSnapshot, dloc: Location, layers=None, segments=None, tokens=None) -> Plan:
    """What `sync` would copy from SRC (its log, `src`) into `dloc`, every refusal checked first."""
    root = src.root
    droot, dst_state, unfinished = _read_dst(dloc)
    partial = layers is not None or segments is not None or tokens is not None
    if segments is not None and tokens is not None:
        raise UserError("sync: give --segments or --tokens, not both")
    src_digest = log.root_digest(root)
    if droot is not None:
        for k in ("d_model", "hook", "chunk_tokens"):
            if droot[k] != root[k]:
                raise UserError(
                    f"sync: {k} differs ({root[k]} in {src.url}, {droot[k]} in {dloc.url}); "
                    "these caches cannot share segments"
                )
        mine = droot.get("copy_of")
        if mine is not None and mine.get("root") != src_digest and log.root_digest(droot) != src_digest:
            raise UserError(
                f"sync: {dloc.url} is a partial copy of {mine.get('url')} (root {str(mine.get('root'))[:12]}), "
                f"not of {src.url}; sync into another location"
            )
        of_src = mine is not None and mine.get("root") == src_digest
        if partial and not of_src:
            raise UserError(
                f"sync: {dloc.url} already holds a cache that is not a partial copy of {src.url}; "
                "a partial sync (--layers, --segments, --tokens) writes into a new location or a partial copy of SRC"
            )
        partial = of_src
    if layers is not None:
        layers = sorted({int(L) for L in layers})
        _check_layers(src, layers, "")
    sel = _selected(src, segments, tokens)
    tokenizer = {}
    create = droot if unfinished else None
    selection = None
    if not partial:
        want_layers = src.declared
        chosen = src.segments
        if droot is None:
            create = root
    else:
        old = dst_state.copy_of if dst_state else None
        if old is None:  # a new partial copy
            want_layers = layers if layers is not None else src.layers
            want_ids = sel
        else:  # widen the selection DST has (a plain sync keeps it)
            _check_layers(src, dst_state.declared, f" (held by {dloc.url})")
            want_layers = sorted(set(dst_state.declared) | set(layers or []))
            want_ids = old.get("segments")
            if want_ids is not None and sel is not None:
                ids = set(want_ids) | set(sel)
                in_src = [s.id for s in src.segments if s.id in ids]
                want_ids = in_src + [i for i in want_ids if i not in set(in_src)]
        chosen = [s for s in src.segments if want_ids is None or s.id in set(want_ids)]
        if old is None:  # a new partial copy
            create = {
                **root,
                "layers": want_layers,
                "copy_of": {"url": _source_url(src), "root": src_digest, "layers": want_layers, "segments": want_ids},
            }
        elif old.get("layers") != want_layers or old.get("segments") != want_ids:
            selection = {"kind": "copy", "layers": want_layers, "segments": want_ids, "provenance": provenance.record()}
    if create is not None:
        tokenizer = {layout.tokenizer_key(n): want for n, want in root.get("tokenizer", {}).items()}
    declared = create["layers"] if create is not None else dst_state.declared
    add_layers = [L for L in want_layers if L not in declared]
    dsegs = {s.id: s for s in dst_state.segments + dst_state.retracted} if dst_state else {}
    units = []
    for s in chosen:
        if s.id not in dsegs:
            units.append(_segment_unit(s, [L for L in want_layers if L in s.layers], src.url, root["hook"]))
    for s in chosen:
        d = dsegs.get(s.id)
        if d is not None and not d.retracted:
            missing = [L for L in want_layers if L in s.layers and L not in d.layers]
            units += [_layer_unit(s, L, src.url, root["hook"]) for L in missing]
    return Plan(create, add_layers, selection, units, tokenizer)


def _make_root(src: log.LogSnapshot, dloc: Location, attrs: dict, dst_url: str) -> None:
    """Create DST's root crash-safely (write.make_root), or finish one an earlier sync was killed creating."""

    def tokenizer_bytes(name: str) -> bytes | None:
        want = src.tokenizer().get(name)
        return integrity.read_checked(src.loc, layout.tokenizer_key(name), want) if want else None

    try:
        made, status = write.make_root(dloc, attrs, tokenizer_bytes)
    except OSError as e:
        raise UserError(f"cannot write to {dst_url} ({e}); choose a writable location") from None
    if status == write.EXISTED and log.root_digest(made) != log.root_digest(attrs):
        raise UserError(f"sync: another command created a cache at {dst_url} meanwhile; re-run sync to see it")


def sync(
    src_url,
    dst_url,
    src_options=None,
    dst_options=None,
    layers=None,
    segments=None,
    tokens=None,
    dry_run: bool = False,
    threads: int = 4,
    block: int = BLOCK,
) -> dict:
    """Copy what DST lacks from SRC (see the module docstring); `layers`, `segments` ("A:B" or
    (A, B), in SRC's commit order) or `tokens` (the first segments holding that many rows) make
    a partial copy. Returns {segments, layers, bytes, plan} (`plan`: objects and bytes per part)."""
    src = log.load(Location(src_url, src_options))
    dloc = Location(dst_url, dst_options)
    if not dloc.supports_writes:
        raise UserError(f"sync: {dst_url} is read-only ({dloc.protocol}); sync into a local path or s3:// URL")
    p = plan(src, dloc, layers, segments, tokens)
    summary = p.summary()
    total = sum(v["bytes"] for v in summary.values())
    out = {
        "segments": sum(u.record["kind"] == "segment" for u in p.units),
        "layers": sum(u.record["kind"] == "layer" for u in p.units),
        "bytes": total,
        "plan": summary,
    }
    if dry_run:
        return out
    with progress_bar(total, f"sync → {dst_url}") as bar:
        lock = threading.Lock()

        def moved(n: int) -> None:  # bytes, rate and ETA, from every copying thread
            with lock:
                bar.update(n)

        if p.create is not None:
            _make_root(src, dloc, p.create, dst_url)
            moved(sum(v["size"] for v in p.tokenizer.values()))
        if p.selection is not None:
            log.commit(dloc, p.selection)
        for L in p.add_layers:
            log.commit(dloc, {"kind": "add_layer", "layer": L, "provenance": provenance.record()})
        _copy_units(src.loc, dloc, p.units, moved, threads, block)
    return out


def _copy_units(src: Location, dst: Location, units: list, moved, threads: int, block: int) -> None:
    """Copy every unit's objects (a few units ahead, `threads` objects at once) and commit each
    unit's record in plan order, holding its writer lease meanwhile (gc on DST leaves it alone)."""
    pending: deque = deque()
    todo = iter(units)
    with ThreadPoolExecutor(threads) as ex:
        try:
            while True:
                while len(pending) < WINDOW:
                    u = next(todo, None)
                    if u is None:
                        break
                    concurrency.hold(dst, u.lease)
                    there = _listed(dst, u.lease)
                    fs = [
                        ex.submit(_copy_object, src, dst, k, v, moved, block, there)
                        for k, v in sorted(u.objects.items())
                    ]
                    pending.append((u, fs))
                if not pending:
                    return
                u, fs = pending.popleft()
                try:
                    for f in fs:
                        f.result()
                    log.commit(dst, u.record)
                finally:
                    concurrency.release(dst, u.lease)
        except BaseException:
            for u, fs in pending:
                for f in fs:
                    f.cancel()
                concurrency.release(dst, u.lease)
            raise


class _Blocks:
    """Block buffers shared by every copy in the process, allocated once and reused: a copy's
    memory is theirs, whatever the number of threads or the size of the objects (a fresh
    buffer per block would leave one in each thread's malloc arena). A copy takes the blocks it
    needs at once (two for a large object), so copies never wait on each other holding some."""

    def __init__(self, n: int):
        self.cond = threading.Condition()
        self.left = n
        self.free: dict[int, list] = {}

    @contextlib.contextmanager
    def take(self, size: int, count: int = 1):
        with self.cond:
            self.cond.wait_for(lambda: self.left >= count)
            self.left -= count
            free = self.free.setdefault(size, [])
            bufs = [free.pop() if free else bytearray(size) for _ in range(count)]
        try:
            yield [memoryview(b) for b in bufs]
        finally:
            with self.cond:
                self.free[size] += bufs
                self.left += count
                self.cond.notify_all()


BLOCKS = _Blocks(8)  # 128 MiB of blocks: four large objects in flight at most, two blocks each


def _copy_object(
    src: Location,
    dst: Location,
    key: str,
    want: dict | None,
    moved: Callable[[int], None],
    block: int = BLOCK,
    listed: dict | None = None,
) -> None:
    """Copy one object; `want` is its manifest entry (None: unmanifested group
    metadata, a few hundred bytes); `moved(n)` is told of every n bytes that pass. `listed`
    ({key: size} at the destination, None: not listed) spares asking about objects that are
    not there."""
    if want is None:
        try:
            data = src.read(key)
        except FileNotFoundError:
            return  # a group the writer did not create: readers never need one
        dst.write(key, data)
        moved(len(data))
        return
    size, tag = want["size"], log.tag(want)
    if size <= SMALL:
        data = integrity.read_checked(src, key, want)
        dst.write(key, data)
        moved(size)
        return
    if (listed is None or listed.get(key) == size) and dst.holds(key, size, tag):
        moved(size)
        return
    for _ in range(2):  # a mismatch is copied once more: a torn transfer is not a bad object
        passed = _copy_once(src, dst, key, size, tag, moved, block)
        if passed is None:
            return
        moved(-passed)
    raise integrity.CorruptObject(src.url, key, "size or checksum mismatch")


def _copy_once(src: Location, dst: Location, key: str, size: int, tag: str, moved, block: int) -> int | None:
    """One pass over the object: None when it landed, else the bytes that passed (a mismatch)."""
    if size <= block:  # one block: written whole (an S3 object this size is one PUT)
        with BLOCKS.take(block) as (buf,), src.reader(key, 0, size) as r:
            view = buf[: r.readinto(buf)]
            moved(len(view))
            h = log.hasher(tag)
            h.update(view)
            if len(view) == size and log.tagged(h, tag):
                dst.write(key, view)
                return None
            return len(view)
    with BLOCKS.take(block, 2) as bufs:  # streams open only with blocks to fill
        up = dst.upload(key, tag, size, block)
        h = log.hasher(tag)
        passed = 0

        def read_source(a: int, b: int):  # a resumed S3 upload's parts, re-read to be checksummed
            with src.reader(key, a, b) as r:
                return bufs[0][: r.readinto(bufs[0][: b - a])]

        for piece in up.resumed(read_source):
            h.update(piece)
            passed += len(piece)
            moved(len(piece))
        with src.reader(key, up.offset, size) as r:
            passed += _pipeline(r, bufs, h, up, moved)
    if log.tagged(h, tag):
        up.commit()
        return None
    up.discard()
    return passed


def _pipeline(r, bufs: list, h, up, moved) -> int:
    """Receive into one block while a helper thread checksums and appends the one before, so
    the stream is read on (the sender keeps sending) while a block is hashed and written.
    Returns the bytes that landed; a failure on either side stops both and is raised."""
    filled: queue.SimpleQueue = queue.SimpleQueue()  # (block, n), in order; None: no more
    free: queue.SimpleQueue = queue.SimpleQueue()
    for b in bufs:
        free.put(b)
    landed, failed = [0], []

    def land() -> None:
        while (item := filled.get()) is not None:
            b, n = item
            if not failed:
                try:
                    h.update(b[:n])
                    up.append(b[:n])
                    landed[0] += n
                    moved(n)
                except BaseException as e:  # noqa: BLE001 - raised in the receiving thread
                    failed.append(e)
            free.put(b)

    t = threading.Thread(target=land, name="actcache-land", daemon=True)
    t.start()
    try:
        while not failed:
            b = free.get()
            n = r.readinto(b)
            if not n:
                break
            filled.put((b, n))
    finally:
        filled.put(None)
        t.join()  # the blocks are free again only when the helper is done with them
    if failed:
        raise failed[0]
    return landed[0]


def _listed(dst: Location, prefix: str) -> dict | None:
    """{key: size} of the objects under `prefix` at `dst` (one listing), None where it cannot list."""
    if not dst.supports_listing:
        return None
    return {o.key: o.size for o in dst.walk(prefix)}
