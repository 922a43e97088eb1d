"""`harvest run`: open or create the cache, add new layers, then capture what is missing.

The run, in order (each step in a section below):

- **Open or create** the cache, refusing one harvested with another model or source selection.
- **Add layers** asked for after the rows were captured (or declared by an interrupted run):
  rebuilt per committed segment by a fresh forward over the token ids the cache stores, so the
  new layer lines up row for row; never regenerates.
- **Plan** the units still missing (`harvest.units`): SuperGPQA questions by seed
  (`harvest.supergpqa`; their rollouts generated first, `harvest.rollouts`), corpus units
  streamed while the run goes (`harvest.corpus`).
- **Share** them with every other `harvest run` on the same cache: a unit is claimed before
  it is computed, and a unit a live process holds is waited for at the end.
- **Run** the units in this process (one background writer thread per in-flight segment behind
  a bounded queue, so the forward loop never waits on compression or I/O) or as dask tasks,
  one model per worker process, each worker writing its own segments' objects. Either way
  commits land in plan order (cache_format.concurrency), so identical runs commit identical logs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

import cache_format as cf
from cache_format import log
from cache_format.commandline import dask_client
from cache_format.concurrency import Claim, Claims, CommitOrder, QueueThread, wait_for
from cache_format.errors import CacheError, UserError
from cache_format.log import NotACacheError, read_root
from cache_format.stores import Location
from cache_format.write import CacheExistsError

from . import corpus, supergpqa
from . import rollouts as ro
from .capture import LayerCapture, capture_batch
from .config import ModelConfig, PipelineConfig
from .model import LoadedModel, ModelError, describe_model, device_for, load_model, reference_kernel_note, worker_slots
from .records import pin_dataset
from .units import Context, Unit, capture_unit, done_seq_ids, fill_rollouts

HOOK = "resid_post"


def run(cfg: PipelineConfig, progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """The whole `harvest run`: create or open the cache, add new layers, capture what is missing."""
    log = log or (lambda s: None)
    if cfg.harvest.hook != HOOK:
        raise UserError(
            f"harvest.hook {cfg.harvest.hook!r}: only {HOOK!r} (the output of decoder layer N) is "
            'captured so far; set harvest.hook = "resid_post"'
        )
    layers = sorted(set(cfg.harvest.layers))
    if not layers:
        raise UserError("no layers given; pass --layers 11,31,55")
    if cfg.harvest.source == "corpus":
        corpus.check_tokens(cfg.corpus)  # before the model loads and the cache is made
    t0 = time.time()
    if cfg.harvest.torch_threads:
        torch.set_num_threads(cfg.harvest.torch_threads)
    info = describe_model(cfg.model)
    bad = [x for x in layers if x >= info["n_layers"]]
    if bad:
        raise ModelError(
            f"layer {bad[0]} is past the model's depth ({info['n_layers']} decoder layers, "
            f"0..{info['n_layers'] - 1}); pass --layers within that range"
        )
    w, created = _open_or_create(cfg, info, layers)
    summary: dict = {"cache": cfg.harvest.cache, "created": created, "source": cfg.harvest.source}
    snap = w.snapshot()
    new_layers = [L for L in layers if L not in snap.declared_layers]
    backfill = [L for L in snap.declared_layers if L not in snap.layers]  # declared by an interrupted run
    if new_layers or backfill:
        summary["added_layers"] = add_layers(cfg, w, sorted(set(new_layers) | set(backfill)), progress)
    pin = (w.snapshot().meta.get("dataset_revision") or {}) if cfg.harvest.source == "supergpqa" else {}
    ctx = Context(config=cfg, cache_url=cfg.harvest.cache)
    fanned_out = bool(cfg.harvest.workers or cfg.harvest.scheduler)
    # Every pending question is generated first, behind one progress bar: vLLM alone on the GPU
    # (capture loads after it exits), or this process's model. Dask workers running the
    # transformers backend generate their own units instead.
    generate_first = cfg.harvest.source == "supergpqa" and (cfg.supergpqa.backend == "vllm" or not fanned_out)
    shared = SharedUnits(w)  # other processes on this cache take units too: each is claimed first
    rows = generated = 0
    first = True
    try:
        while True:  # a pass over what is missing; then wait for units others hold, and plan again
            snap = w.snapshot()
            done = done_seq_ids(snap)
            units, total = plan_units(cfg, info["tokenizer"], done, snap.segments, pin.get("commit"))
            if first:
                summary.update(sequences_total=total, sequences_done_before=len(done), units=len(units))
                if isinstance(units, corpus.PlannedUnits):  # where the streams restarted
                    summary["planned_from_sequence"] = units.resumed_from
                log(
                    f"harvest: {len(done)} of {total} sequences already in {cfg.harvest.cache}; "
                    f"{len(units)} units to run"
                )
                first = False
            if not len(units):
                break
            if generate_first:
                pairs = [(s, q) for u in units for s, q in zip(u.seq_ids, u.questions)]
                lm_factory = functools.partial(WORKER.model, cfg.model, None)  # loaded only if a rollout is missing
                generated += ro.generate_missing(pairs, cfg, cfg.harvest.cache, lm_factory, info["tokenizer"], progress)
            moved = shared.run_here + shared.found_done
            rows += run_units(units, shared, ctx, cfg, progress)
            if getattr(units, "error", None):  # the corpus ran out: what it filled is committed, then one line
                raise units.error
            if not shared.skipped and shared.run_here + shared.found_done == moved:
                break  # nothing was planned that could be run (never loop without progress)
            if shared.skipped:
                log(f"harvest: waiting for {len(shared.skipped)} units that other processes are harvesting")
            if shared.wait_for_others():
                log("harvest: taking over units whose process died")
    finally:
        shared.release_all()
    if generate_first:
        summary["generated"] = generated
    # The summary describes the cache as committed, so every process sharing it prints the same outcome.
    c = cf.open_cache(cfg.harvest.cache)
    summary.update(
        rows_written=rows,
        units_run_here=shared.run_here,
        n_tokens=c.n_tokens,
        layers=c.layers,
        segments=len(c.segments),
        fingerprint=c.fingerprint,
        seconds=round(time.time() - t0, 2),
    )
    if cfg.harvest.source == "supergpqa":
        summary["outcomes"] = ro.outcome_counts(
            [r for r in c.sequences().to_pylist() if r.get("source") == "supergpqa"]
        )
    return summary


def plan_units(
    cfg: PipelineConfig, tokenizer, done: set[int], segments=(), dataset_commit: str | None = None
) -> tuple[list[Unit], int]:
    """Units still to do, and the total number of sequences the run wants.

    Corpus units are planned lazily while they run (`harvest.corpus`), restarting from
    the planner state the committed `segments` recorded.
    """
    if cfg.harvest.source == "corpus":
        units = corpus.PlannedUnits(cfg, tokenizer, done, segments)
        return units, units.n_seq
    per = cfg.supergpqa.questions_per_unit  # rollout units have their own size (corpus: segment_sequences)
    qs = supergpqa.select_questions(
        supergpqa.load_questions(cfg.supergpqa, dataset_commit), cfg.supergpqa.questions, cfg.supergpqa.seed
    )
    blocks: dict[int, list[tuple[int, Any]]] = {}
    for i, q in enumerate(qs):
        if i not in done:
            blocks.setdefault(i // per, []).append((i, q))
    units = []
    for part in blocks.values():
        ids = [i for i, _ in part]
        units.append(
            Unit(
                key=f"{cfg.harvest.source}:{ids[0]}-{ids[-1]}",
                source=cfg.harvest.source,
                seq_ids=ids,
                questions=[q for _, q in part],
            )
        )
    return units, len(qs)


def _open_or_create(cfg: PipelineConfig, info: dict, layers: list[int]):
    url = cfg.harvest.cache
    try:
        w = cf.open_cache(url, mode="a")
    except NotACacheError:  # nothing there, or a creation that was interrupted (create_cache finishes it)
        w = None
    sel = cfg.source_selection()
    if w is not None:
        return _check_same_run(cfg, info, w, sel), False
    try:
        return _create(cfg, info, layers, sel), True
    except CacheExistsError:  # another process created it a moment ago: share it
        return _check_same_run(cfg, info, cf.open_cache(url, mode="a"), sel), False


def _create(cfg: PipelineConfig, info: dict, layers: list[int], sel: dict):
    """A new cache for this run (or the same one finished, if creating it was interrupted)."""
    url = cfg.harvest.cache
    meta = {
        "model": info["provenance"],
        "source": sel,
        "harvest": dataclasses.asdict(cfg.harvest),
        "hook": {
            "site": HOOK,
            "meaning": "output of decoder layer N (0-based), the residual stream after it",
            "module_path": f"{info['provenance']['layers_path']}.N",
        },
        "pipeline": dataclasses.asdict(cfg),
    }
    if cfg.harvest.source == "supergpqa":  # a hub dataset is pinned to its commit at first use
        meta["dataset_revision"] = pin_dataset(cfg.supergpqa.dataset, cfg.supergpqa.revision, None)
    return cf.create_cache(
        url,
        d_model=info["d_model"],
        layers=layers,
        meta=meta,
        hook=HOOK,
        codec=cfg.harvest.codec,
        chunk_tokens=cfg.harvest.chunk_tokens,
        shard_mib=cfg.harvest.shard_mib,
        tokenizer_files=info["tokenizer_files"],
    )


def _check_same_run(cfg: PipelineConfig, info: dict, w, sel: dict):
    """`w` if the cache was harvested with this model and source selection, else one line saying which differs."""
    url = cfg.harvest.cache
    m = w.snapshot().meta
    old, new = m.get("model", {}), info["provenance"]
    for k in ("name_or_path", "revision", "dtype", "weights_sha256"):
        if old.get(k) != new.get(k):
            raise UserError(
                f"{url} was harvested with model.{k}={old.get(k)!r}, not {new.get(k)!r}; "
                "use the same model settings or another --cache"
            )
    if m.get("source") != sel:
        raise UserError(
            f"{url} holds source {m.get('source', {}).get('name')!r} with other selection settings "
            f"({m.get('source')}); use the same source settings or another --cache"
        )
    if w.d_model != info["d_model"]:
        raise UserError(f"{url} has d_model {w.d_model}, the model has {info['d_model']}; use another --cache")
    return w


# ---------------------------------------------------------------------------------------
# adding layers to the rows already committed, from the stored sequences


def add_layers(cfg: PipelineConfig, w, layers: list[int], progress: bool = True) -> list[int]:
    """Backfill `layers` into every committed segment, from stored sequences: never regenerates.

    Rows are rebuilt in each segment's stored order (write-time mixing included) by locating
    every (seq_id, position) in a fresh forward over the stored token ids; the tokens are
    checked against the stored rows before anything is written. Each (segment, layer) is
    claimed first, so processes sharing the cache split the work; one a live process holds is
    waited for at the end (and taken over if that process dies).
    """
    lm = WORKER.model(cfg.model, None)
    lm.check_layers(layers)
    bfs = {L: w.add_layer(L) for L in layers}
    claims = Claims(Location(w.url), "backfill")
    while True:
        skipped = _backfill_pass(cfg, w, lm, bfs, claims, progress)
        if not skipped:
            return layers
        wait_for(skipped, functools.partial(_committed, w), claims)  # then a pass over what is still pending


def _committed(w, items: dict) -> list[str]:
    """Names of (segment, layer) items whose layer is committed now (or whose segment was retracted)."""
    live = {s.id: s for s in w.snapshot().segments}
    return [n for n, (sid, L) in items.items() if sid not in live or L in live[sid].layers]


def _backfill_pass(cfg: PipelineConfig, w, lm, bfs: dict, claims: Claims, progress: bool) -> dict:
    """Backfill every pending (segment, layer) this process can claim; returns those others hold."""
    from tqdm import tqdm

    layers = sorted(bfs)
    pending = {L: {s.id for s in bf.pending()} for L, bf in bfs.items()}
    snap = w.snapshot()
    todo = [s for s in snap.segments if any(s.id in p for p in pending.values())]
    if not todo:
        return {}
    seqs = snap.sequences()
    tok_of = dict(zip(seqs.column("seq_id").to_pylist(), seqs.column("token_ids").to_pylist()))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    bs = max(1, cfg.harvest.batch_size)
    skipped: dict[str, tuple[str, int]] = {}
    bar = tqdm(
        total=sum(s.n_rows for s in todo),
        unit="tok",
        unit_scale=True,
        desc=f"add layers {layers}",
        disable=not progress,
        dynamic_ncols=True,
    )
    for s in todo:
        mine = {}
        for L in layers:
            if s.id in pending[L]:
                name = f"{s.id}-layer{L}"
                c = claims.take(name)
                if c is None:
                    skipped[name] = (s.id, L)
                else:
                    mine[L] = c
        live = {x.id: x for x in w.snapshot().segments}  # committed since the pass began? then not again
        for L in list(mine):
            if s.id not in live or L in live[s.id].layers:
                mine.pop(L).release()
        try:
            if mine:
                _backfill_segment(lm, snap, s, tok_of, pad, bs, {L: bfs[L] for L in mine}, mine)
        finally:
            for c in mine.values():
                c.release()  # normally released by its commit already
        bar.update(s.n_rows)
    bar.close()
    return skipped


def _backfill_segment(lm, snap, s, tok_of: dict, pad: int, bs: int, bfs: dict, claims: dict) -> None:
    """One segment's claimed layers: a forward over its stored sequences, rows in its stored order."""
    a, b = s.row_start, s.row_start + s.n_rows
    sid = np.asarray(snap.seq_ids[a:b])
    pos = np.asarray(snap.positions[a:b])
    tokens = np.asarray(snap.tokens[a:b])
    uniq = list(dict.fromkeys(sid.tolist()))
    missing = [x for x in uniq if x not in tok_of]
    if missing:
        raise CacheError(f"segment {s.id}: sequence {missing[0]} has no stored token ids; cannot add a layer")
    layers = sorted(bfs)
    offsets, parts, off = {}, {L: [] for L in layers}, 0
    with LayerCapture(lm.layers, layers) as cap:
        for i in range(0, len(uniq), bs):
            ids = uniq[i : i + bs]
            hb = capture_batch(cap, lm.model, [tok_of[x] for x in ids], ids, pad, lm.device).ready()
            for L in layers:
                parts[L].append(hb.residuals[L])
            for x in ids:
                offsets[x] = off
                off += len(tok_of[x])
    index = np.fromiter((offsets[x] for x in sid.tolist()), np.int64, len(sid)) + pos
    flat_tokens = np.concatenate([np.asarray(tok_of[x], np.int64) for x in uniq])
    if not np.array_equal(flat_tokens[index], tokens):
        raise CacheError(
            f"segment {s.id}: stored sequences do not match its token rows; "
            "the cache is inconsistent, run `python -m cache_format verify`"
        )
    t = torch.from_numpy(index)
    for L in layers:
        bfs[L].write(
            s.id, residuals={L: torch.cat(parts[L])[t]}, tokens=tokens, seq_ids=sid, positions=pos, claim=claims[L]
        )


# ---------------------------------------------------------------------------------------
# units shared with every other `harvest run` on the cache
#
# Any number of processes, on one machine or many, pointed at one cache with the same plan,
# split the work with no coordinator (cache_format.concurrency): each claims the next free unit, so
# a second teammate running the same `make harvest` helps the first. A claim is re-checked once
# taken (the unit may have been committed since the plan was made), and the segment commits
# only if no live segment holds its sequences yet (`once`), so even a claim lost to a pause
# cannot commit a row twice. At the end a process waits for the units others hold: they get
# committed (done), or their claimant dies and the unit is planned again here.


class SharedUnits:
    """One process's side of the sharing: the claims it holds and the units others held."""

    def __init__(self, writer, scope: str = "harvest"):
        self.w = writer
        self.claims = Claims(Location(writer.url), scope)
        self.skipped: dict[str, list[int]] = {}  # unit key → its seq_ids, held by a live process
        self.held: list[Claim] = []
        self.run_here = 0  # units this process claimed and computed
        self.found_done = 0  # units committed by others between planning and claiming

    def _live_runs(self) -> list:
        return [(s.seq_ranges or [], s.id) for s in self.w.snapshot().segments]

    def committed(self, seq_ids, live=None) -> bool:
        """Whether a live segment holds any of `seq_ids` now (from the log: cheap)."""
        return bool(log.holders(log.ranges_of(seq_ids), live if live is not None else self._live_runs()))

    def claim(self, units: Iterable[Unit], on_skip=lambda unit: None) -> Iterator[tuple[Unit, Claim]]:
        """The units this process gets to compute, each with its claim (released when its segment ends)."""
        for u in units:
            c = self.claims.take(u.key)
            if c is None:
                self.skipped[u.key] = list(u.seq_ids)
                on_skip(u)
                continue
            self.held.append(c)
            if self.committed(u.seq_ids):
                c.release()
                self.found_done += 1
                on_skip(u)
                continue
            self.run_here += 1
            yield u, c

    def wait_for_others(self) -> bool:
        """Wait until the units others held are committed, or their claimants died; True if
        some must be planned again (here)."""
        if not self.skipped:
            return False

        def done(items):
            live = self._live_runs()
            return [k for k, seq_ids in items.items() if self.committed(seq_ids, live)]

        orphans = wait_for(self.skipped, done, self.claims)
        self.skipped.clear()
        return bool(orphans)

    def release_all(self) -> None:
        """Release every claim still held (a failed or interrupted run: others need not wait for it)."""
        for c in self.held:
            c.release()
        self.held.clear()


# ---------------------------------------------------------------------------------------
# running units: in this process (writer threads) or as dask tasks


def run_units(units, shared: SharedUnits, ctx: Context, cfg: PipelineConfig, progress: bool) -> int:
    """Run the units this process can claim (`shared`); returns the rows it wrote."""
    from tqdm import tqdm

    est = getattr(units, "n_tokens", None) or sum(u.n_tokens for u in units) or None
    bar = tqdm(
        total=est, unit="tok", unit_scale=True, desc="harvest", disable=not progress or not units, dynamic_ncols=True
    )
    state = {"rows": 0, "bytes": 0, "t0": time.time()}
    lock = threading.Lock()

    def on_rows(n, nbytes):
        with lock:
            _count(n, nbytes)

    def _count(n, nbytes):
        state["rows"] += n
        state["bytes"] += nbytes
        bar.update(n)
        dt = max(1e-6, time.time() - state["t0"])
        bar.set_postfix_str(f"{state['bytes'] / dt / 1e6:.1f} MB/s")

    def on_skip(u: Unit):  # another process harvests it: this bar's total shrinks
        with lock:
            if bar.total:
                bar.total = max(bar.n, bar.total - u.n_tokens)
                bar.refresh()

    claimed = shared.claim(units, on_skip)
    try:
        if not (cfg.harvest.workers or cfg.harvest.scheduler):
            # one thread per in-flight segment (a segment's rows stay in order within its thread)
            wts = [
                QueueThread.jobs(cfg.harvest.queue_depth, f"harvest-writer-{i}")
                for i in range(max(1, cfg.harvest.writer_threads))
            ]
            order = CommitOrder()  # writers write in parallel; commits land in plan order
            try:
                for i, (u, claim) in enumerate(claimed):
                    process_unit(u, ctx, wts[i % len(wts)], on_rows, turn=order.turn(i), claim=claim)
            except BaseException:
                order.abort()  # units still waiting for their turn abandon: the committed set stays a prefix
                raise
            finally:
                errors = []
                for wt in wts:
                    try:
                        wt.close()
                    except BaseException as e:
                        errors.append(e)
                if errors:
                    raise errors[0]
        else:
            _run_dask(claimed, ctx, cfg, on_rows)
    finally:
        bar.close()
    return state["rows"]


def _run_dask(claimed, ctx: Context, cfg: PipelineConfig, on_rows) -> None:
    """The claimed (unit, claim) pairs as dask tasks; this process commits them in plan order."""
    from dask.distributed import as_completed

    n = cfg.harvest.workers
    if not cfg.harvest.scheduler:  # a local cluster: its processes share this machine's cores
        ctx = dataclasses.replace(ctx, threads=cfg.harvest.torch_threads or max(1, (os.cpu_count() or 1) // n))
    with dask_client(
        cfg.harvest.scheduler,
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        fix="check --scheduler (harvest.scheduler), or leave it out for a local cluster",
    ) as client:
        pin_worker_devices(client)
        sizes: dict[str, int] = {}

        def submit(u: Unit):
            f = client.submit(_remote_unit, u, ctx, key=f"harvest-{u.key}-{os.getpid()}", pure=False)
            sizes[f.key] = u.n_tokens
            return f

        # a bounded number of units in flight: corpus units are planned (and claimed) as the run goes
        limit = 2 * max(1, len(client.scheduler_info()["workers"]))
        # workers write their segments' objects; this process commits the records in plan order
        w = cf.open_cache(ctx.cache_url, mode="a")
        turn_of: dict[str, int] = {}
        claim_of: dict[str, object] = {}
        ready: dict[int, tuple] = {}
        next_turn = 0

        def submit_next(item):
            u, claim = item
            f = submit(u)
            turn_of[f.key] = len(turn_of)
            claim_of[f.key] = claim
            return f

        running = as_completed([submit_next(x) for x in itertools.islice(claimed, limit)])
        for f in running:
            res = f.result()
            w.adopt(res["record"])  # keep its lease alive while it waits for its turn
            ready[turn_of[f.key]] = (res["record"], claim_of.pop(f.key))
            while next_turn in ready:
                record, claim = ready.pop(next_turn)
                w.commit_prepared(record, once=True)  # a duplicate (another process was first) is discarded
                claim.release()
                next_turn += 1
            on_rows(sizes.pop(f.key) or res["rows"], res["bytes"])
            x = next(claimed, None)
            if x is not None:
                running.add(submit_next(x))


def _remote_unit(unit: Unit, ctx: Context) -> dict:
    """The dask task: pin this worker's device, set its threads, run one unit."""
    from dask.distributed import get_worker

    if ctx.device is None:
        worker = get_worker()
        device = getattr(worker, "actcache_device", None)  # set by pin_worker_devices when the run started
        if device is None:  # a worker that joined later: a numeric name is its slot, else slot 0
            device = device_for(int(worker.name) if str(worker.name).isdigit() else 0)
        ctx = dataclasses.replace(ctx, device=device)
    return process_unit(unit, ctx, defer=True)  # the coordinator commits it in plan order


def _pin_device(slots: dict[str, int], dask_worker=None) -> str | None:
    dask_worker.actcache_device = device_for(slots.get(dask_worker.address, 0))
    return dask_worker.actcache_device


def pin_worker_devices(client) -> dict[str, str | None]:
    """Give every worker of the cluster its own GPU (its slot among the workers of its host),
    whatever the workers' names; a worker started with one GPU in CUDA_VISIBLE_DEVICES keeps it."""
    slots = worker_slots(client.scheduler_info()["workers"])
    return client.run(_pin_device, slots)


# ---------------------------------------------------------------------------------------
# one process's side: its model and cache writer, reused by every unit it runs
#
# A process (this one, or a dask worker) loads the model once and opens the cache once; every
# unit it is given captures through them, one capture at a time.


class WorkerState:
    """This process's model and cache writer (one of each, kept across units)."""

    def __init__(self):
        self.model_key: str | None = None
        self.loaded: LoadedModel | None = None
        self.writer = None
        self.writer_url: str | None = None
        self.writer_loc: Location | None = None
        self.writer_root: dict | None = None  # the root it was opened under: another means the cache was recreated
        self.kernel_note_said = False
        # One model per process, hooked by one capture at a time: a dask worker with several threads
        # (or several in-process workers) would otherwise mix two units' residuals in the same hooks.
        self.lock = threading.RLock()

    def model(self, model_cfg: ModelConfig, device: str | None) -> LoadedModel:
        """The model for these settings, loaded on first use (or when the settings change)."""
        key = repr((dataclasses.asdict(model_cfg), device))
        if self.model_key != key:
            lm = self.loaded = load_model(model_cfg, device=device)
            self.model_key = key
            if not self.kernel_note_said:  # said at the first load, before any generation
                note = reference_kernel_note(lm.model, lm.device)
                if note:
                    self.kernel_note_said = True
                    print(note, file=sys.stderr)
        return self.loaded

    def cache_writer(self, url: str):
        """The cache at `url` opened for appending, once per process (again if it was recreated)."""
        if self.writer_url != url:
            self.writer, self.writer_url, self.writer_loc = None, url, Location(url)
        root = read_root(self.writer_loc)
        if self.writer is None or root != self.writer_root:
            self.writer, self.writer_root = cf.open_cache(self.writer_loc, mode="a"), root
        return self.writer


WORKER = WorkerState()  # this process's


def process_unit(
    unit: Unit,
    ctx: Context,
    writer_thread: QueueThread | None = None,
    on_rows: Callable = lambda rows, nbytes: None,
    turn=None,
    defer: bool = False,
    claim=None,
) -> dict:
    """Capture one unit and commit it as one segment (in `turn`'s place in the plan; or, with
    `defer`, return its prepared record for the coordinator to commit), once: a segment whose
    sequences another process committed first is dropped. `claim` (the unit's work claim) is
    released when the segment ends. Returns counts for progress."""
    cfg = ctx.config
    threads = ctx.threads or cfg.harvest.torch_threads
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    own_thread = writer_thread is None
    wt = writer_thread or QueueThread.jobs(cfg.harvest.queue_depth, "harvest-writer")
    with WORKER.lock:
        lm = WORKER.model(cfg.model, ctx.device)
        w = WORKER.cache_writer(ctx.cache_url)
        if unit.source == "supergpqa" and not unit.token_ids:
            fill_rollouts(unit, cfg, ctx.cache_url, lambda: lm, lm.tokenizer)
        holder = capture_unit(lm, w, unit, cfg, wt, on_rows, turn, defer, claim)
    if own_thread:
        wt.close()
    out = {
        "unit": unit.key,
        "rows": unit.n_tokens,
        "sequences": len(unit.seq_ids),
        "bytes": unit.n_tokens * len(w.layers) * w.d_model * 2,
    }
    if defer:
        out["record"] = holder["uw"].seg.prepared
    return out
