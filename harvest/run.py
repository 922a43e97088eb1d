"""`harvest run`: open or create the cache, add new layers, then capture what is missing.

Units run in this process (one background writer thread per in-flight segment behind a bounded
queue, so the forward loop never waits on compression or I/O) or as dask tasks, one model per
worker process, each worker writing its own segments' objects. Either way commits land in plan
order (cache_format.ordering), so identical runs commit identical logs.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time
from collections.abc import Callable

import torch

import cache_format as cf
from cache_format.commits import NotACacheError
from cache_format.creation import CacheExistsError
from cache_format.dask_client import dask_client
from cache_format.errors import UserError
from cache_format.ordering import CommitOrder

from . import corpus
from . import rollouts as ro
from .backfill import add_layers
from .capture import BackgroundWriter
from .config import PipelineConfig
from .model import ModelError, describe_model, device_for, worker_slots
from .plan import plan_units
from .records import pin_dataset
from .shared_work import SharedUnits
from .unit_rollouts import generate_missing
from .units import Context, Unit, done_seq_ids
from .worker import WORKER, process_unit

HOOK = "resid_post"


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
            if cfg.harvest.source == "supergpqa" and (cfg.supergpqa.backend == "vllm" or not fanned_out):
                # Every pending question is generated first, behind one progress bar: vLLM alone on the
                # GPU (capture loads after it exits), or this process's model. Dask workers running the
                # transformers backend generate their own units instead.
                generated += generate_missing(
                    units, cfg, cfg.harvest.cache, lambda: WORKER.model(cfg.model, None), info["tokenizer"], progress
                )
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
    if cfg.harvest.source == "supergpqa" and (cfg.supergpqa.backend == "vllm" or not fanned_out):
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
                BackgroundWriter(cfg.harvest.queue_depth, f"harvest-writer-{i}")
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
