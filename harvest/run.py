"""Plan work units, capture them into the cache, resume, scale out, add layers later.

A work unit is one segment: `segment_sequences` corpus sequences, or
`supergpqa.questions_per_unit` rollouts. Which sequences are already in
the cache is read from the committed segments' meta (their `seq_ranges`), so a re-run after
a crash or kill plans only what is missing and ends with the same set of rows as an
uninterrupted run. Units run in this process (one background writer thread behind a bounded
queue, so the forward loop never waits on compression or I/O) or as dask tasks, one model
per worker process, each worker writing its own segments' objects. Either way commits land in
plan order (cache_format.ordering), so identical runs commit identical logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

import cache_format as cf
from cache_format.config import ModelConfig, PipelineConfig
from cache_format.errors import CacheError, UserError
from cache_format.ordering import CommitOrder

from . import corpus_plan, data, gpu, revisions, rollouts as ro
from .capture import BackgroundWriter, HostBatch, LayerCapture, capture_batch
from .model import LoadedModel, ModelError, describe_model, load_model

HOOK = "resid_post"


@dataclass
class Unit:
    """One segment's worth of sequences."""

    key: str
    source: str
    seq_ids: list[int]
    token_ids: list[list[int]] = field(default_factory=list)  # corpus: packed ids; supergpqa: filled after generation
    records: list[dict] = field(default_factory=list)  # per-sequence source fields
    questions: list[dict] = field(default_factory=list)  # supergpqa only
    meta: dict = field(default_factory=dict)  # extra segment meta (corpus: planner state, rows by source)

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


@dataclass
class Context:
    """What a worker needs besides the unit (dataclasses: it pickles to dask workers)."""

    config: PipelineConfig
    cache_url: str
    threads: int = 0
    device: str | None = None


def _ranges(ids: list[int]) -> list[list[int]]:
    """[3,4,5,9] -> [[3,6],[9,10]]: compact segment meta for resume."""
    out: list[list[int]] = []
    for i in sorted(ids):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def done_seq_ids(cache) -> set[int]:
    done: set[int] = set()
    for s in cache.segments:
        for a, b in s.meta.get("seq_ranges", []):
            done.update(range(a, b))
    return done


# ---------------------------------------------------------------------------------------
# planning


def source_selection(cfg: PipelineConfig) -> dict:
    """What decides which sequences a run holds; must match to append to a cache."""
    if cfg.harvest.source == "supergpqa":
        s = cfg.supergpqa
        return {"name": "supergpqa", "dataset": s.dataset, "revision": s.revision, "split": s.split,
                "seed": s.seed, "enable_thinking": s.enable_thinking, "max_new_tokens": s.max_new_tokens,
                "prompt_format": s.prompt_format, "force_answer": s.force_answer}
    c = cfg.corpus
    # a source's revision is checked against the commit its segments recorded (harvest.revisions)
    return {"name": "corpus", "seq_len": c.seq_len, "seed": c.seed, "mix": c.mix,
            "sources": [{k: v for k, v in dataclasses.asdict(s).items() if k != "revision"} for s in c.sources]}


def plan_units(cfg: PipelineConfig, tokenizer, done: set[int], segments=(),
               dataset_commit: str | None = None) -> tuple[list[Unit], int]:
    """Units still to do, and the total number of sequences the run wants.

    Corpus units are planned lazily while they run (`harvest.corpus_plan`), restarting from
    the planner state the committed `segments` recorded.
    """
    if cfg.harvest.source == "corpus":
        units = corpus_plan.PlannedUnits(cfg, tokenizer, done, segments, Unit)
        return units, units.n_seq
    per = max(1, cfg.harvest.segment_sequences)
    per = cfg.supergpqa.questions_per_unit  # rollout units have their own size (corpus: segment_sequences)
    qs = data.select_questions(data.load_questions(cfg.supergpqa, dataset_commit), cfg.supergpqa.questions,
                               cfg.supergpqa.seed)
    todo: list[tuple[int, Any]] = [(i, q) for i, q in enumerate(qs) if i not in done]
    units = []
    for a in range(0, len(todo), per):
        part = todo[a: a + per]
        ids = [i for i, _ in part]
        units.append(Unit(key=f"{cfg.harvest.source}:{ids[0]}-{ids[-1]}", source=cfg.harvest.source, seq_ids=ids,
                          questions=[q for _, q in part]))
    return units, len(qs)


# ---------------------------------------------------------------------------------------
# per-process state: one model and one cache writer, reused by every unit a worker runs

_STATE: dict[str, Any] = {}
# One model per process, hooked by one capture at a time: a dask worker with several threads
# (or several in-process workers) would otherwise mix two units' residuals in the same hooks.
_MODEL_LOCK = threading.RLock()


def _model(model_cfg: ModelConfig, device: str | None) -> LoadedModel:
    key = repr((dataclasses.asdict(model_cfg), device))
    if _STATE.get("model_key") != key:
        lm = _STATE["model"] = load_model(model_cfg, device=device)
        _STATE["model_key"] = key
        if not _STATE.get("kernel_note_said"):  # said at the first load, before any generation
            note = gpu.reference_kernel_note(lm.model, lm.device)
            if note:
                _STATE["kernel_note_said"] = True
                print(note, file=sys.stderr)
    return _STATE["model"]


def rows_of(tokenizer, r: ro.Rollout, thinking: bool) -> tuple[np.ndarray, np.ndarray]:
    """Roles and labels of a rollout's tokens (prompt, then thinking until `</think>`, then answer)."""
    n_p, n_r = len(r.prompt_ids), len(r.response_ids)
    roles = np.empty(n_p + n_r, np.int8)
    roles[:n_p] = cf.ROLE_PROMPT
    end = tokenizer.convert_tokens_to_ids("</think>")
    split = n_r
    if not thinking:
        split = 0
    elif isinstance(end, int) and end >= 0 and end in r.response_ids:
        split = r.response_ids.index(end)
    roles[n_p: n_p + split] = cf.ROLE_THINKING
    roles[n_p + split:] = cf.ROLE_ANSWER
    labels = np.full(n_p + n_r, cf.LABEL_NONE, np.int8)
    labels[n_p:] = cf.LABEL_CORRECT if r.record.get("correct") else cf.LABEL_WRONG
    return roles, labels


def rollout_tag(cfg: PipelineConfig) -> str:
    """Sidecar files are keyed by what decides a rollout, so changed settings never reuse them."""
    sel = json.dumps([source_selection(cfg), cfg.model.name_or_path, cfg.model.revision, cfg.model.dtype],
                     sort_keys=True)
    return hashlib.sha256(sel.encode()).hexdigest()[:12]


def generate_missing(units: list[Unit], cfg: PipelineConfig, cache_url: str, lm_factory, tokenizer,
                     progress: bool = True) -> int:
    """Generate the units' rollouts that no sidecar holds yet, saving them as they finish."""
    tag = rollout_tag(cfg)
    stored = ro.load_all_rollouts(cache_url, tag)
    missing = [(sid, q) for u in units for sid, q in zip(u.seq_ids, u.questions) if sid not in stored]
    if missing:
        backend = ro.make_backend(cfg.supergpqa, lm_factory, cfg.model)
        ro.generate_rollouts(missing, backend, tokenizer, cfg.supergpqa,
                             lambda rs: ro.save_generated(cache_url, tag, rs), progress=progress)
    return len(missing)


def ensure_rollouts(units: list[Unit], cfg: PipelineConfig, cache_url: str, lm_factory, tokenizer,
                    progress: bool = False) -> None:
    """Fill supergpqa units with graded rollouts: stored ones are reused, missing ones generated,
    ungraded ones graded (forcing an answer needs the model) and saved per unit."""
    tag = rollout_tag(cfg)
    generate_missing(units, cfg, cache_url, lm_factory, tokenizer, progress)
    stored = ro.load_all_rollouts(cache_url, tag)
    for u in units:
        rs = [stored[s] for s in u.seq_ids]
        if not all(r.graded for r in rs):
            rs = [r if r.graded else ro.grade_rollout(r, tokenizer, cfg.supergpqa, lm_factory) for r in rs]
            ro.save_rollouts(cache_url, f"{tag}/graded/{u.key}", rs)
        u.token_ids = [r.token_ids for r in rs]
        u.records = [{"source": "supergpqa", "prompt_len": len(r.prompt_ids),
                      **{k: ("" if v is None else v) for k, v in r.record.items()}} for r in rs]


class UnitWriter:
    """Owns one segment in the writer thread: mixes rows within windows, appends, commits."""

    def __init__(self, writer, unit: Unit, meta: dict, mix_window: int, mix_seed: int, on_rows: Callable,
                 turn=None, defer: bool = False):
        # turn: commit in plan order (cache_format.ordering); defer: leave the record to the coordinator
        self.seg = writer.segment(meta=meta, turn=turn, defer=defer)
        self.seg.__enter__()
        self.unit, self.mix_window, self.mix_seed = unit, mix_window, mix_seed
        self.pending: list[tuple[HostBatch, np.ndarray, np.ndarray]] = []
        self.pending_seqs = 0
        self.on_rows = on_rows

    def add(self, hb: HostBatch, roles: np.ndarray, labels: np.ndarray, n_seqs: int) -> None:
        try:
            self._add(hb, roles, labels, n_seqs)
        except BaseException as e:  # abandon now: later segments must not wait for this one's turn
            self.abort(e)
            raise

    def _add(self, hb: HostBatch, roles: np.ndarray, labels: np.ndarray, n_seqs: int) -> None:
        hb.ready()
        if self.mix_window <= 1:
            self._append(hb.residuals, hb.tokens, hb.seq_ids, hb.positions, roles, labels)
            return
        self.pending.append((hb, roles, labels))
        self.pending_seqs += n_seqs
        if self.pending_seqs >= self.mix_window:
            self._flush_window()

    def _flush_window(self) -> None:
        if not self.pending:
            return
        hbs = self.pending
        self.pending, self.pending_seqs = [], 0
        res = {L: torch.cat([h.residuals[L] for h, _, _ in hbs]) for L in hbs[0][0].residuals}
        cols = [np.concatenate(x) for x in zip(*[(h.tokens, h.seq_ids, h.positions, r, l) for h, r, l in hbs])]
        perm = window_permutation(self.mix_seed, int(cols[1][0]), len(cols[0]))
        t = torch.from_numpy(perm)
        self._append({L: v[t] for L, v in res.items()}, *[c[perm] for c in cols])

    def _append(self, residuals, tokens, seq_ids, positions, roles, labels) -> None:
        self.seg.append(residuals, tokens=tokens, seq_ids=seq_ids, positions=positions, labels=labels, roles=roles)
        self.on_rows(len(tokens), sum(v.numel() * 2 for v in residuals.values()))

    def close(self) -> None:
        try:
            self._flush_window()
            self.seg.add_sequences([{"seq_id": s, "token_ids": list(map(int, t)), **rec}
                                    for s, t, rec in zip(self.unit.seq_ids, self.unit.token_ids, self.unit.records)])
        except BaseException as e:
            self.abort(e)
            raise
        self.seg.__exit__(None, None, None)  # commits in its turn (or abandons, releasing the turn)

    def abort(self, exc: BaseException) -> None:
        self.seg.__exit__(type(exc), exc, None)


def window_permutation(seed: int, first_seq_id: int, n_rows: int) -> np.ndarray:
    """The recorded write-time mixing: a permutation seeded by (mix_seed, first sequence id)."""
    return np.random.default_rng([seed, first_seq_id]).permutation(n_rows)


def process_unit(unit: Unit, ctx: Context, writer_thread: BackgroundWriter | None = None,
                 on_rows: Callable = lambda rows, nbytes: None, turn=None, defer: bool = False) -> dict:
    """Capture one unit and commit it as one segment (in `turn`'s place in the plan; or, with
    `defer`, return its prepared record for the coordinator to commit). Returns counts for progress."""
    cfg = ctx.config
    threads = ctx.threads or cfg.harvest.torch_threads
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    own_thread = writer_thread is None
    wt = writer_thread or BackgroundWriter(cfg.harvest.queue_depth)
    with _MODEL_LOCK:
        lm = _model(cfg.model, ctx.device)
        if "writer" not in _STATE or _STATE.get("writer_url") != ctx.cache_url:
            _STATE["writer"] = cf.open_cache(ctx.cache_url, mode="a")
            _STATE["writer_url"] = ctx.cache_url
        w = _STATE["writer"]
        if unit.source == "supergpqa" and not unit.token_ids:
            ensure_rollouts([unit], cfg, ctx.cache_url, lambda: lm, lm.tokenizer)
        holder = capture_unit(lm, w, unit, cfg, wt, on_rows, turn, defer)
    if own_thread:
        wt.close()
    out = {"unit": unit.key, "rows": unit.n_tokens, "sequences": len(unit.seq_ids),
           "bytes": unit.n_tokens * len(w.layers) * w.d_model * 2}
    if defer:
        out["record"] = holder["uw"].seg.prepared
    return out


def capture_unit(lm: LoadedModel, w, unit: Unit, cfg: PipelineConfig, wt: BackgroundWriter,
                 on_rows: Callable = lambda rows, nbytes: None, turn=None, defer: bool = False) -> dict:
    """Forward the unit's sequences in batches; the writer thread appends and commits its segment.

    Returns once every batch is queued: the commit happens in `wt` while the caller moves on.
    """
    layers = w.layers
    lm.check_layers(layers)
    meta = {"unit": unit.key, "source": unit.source, "seq_ranges": _ranges(unit.seq_ids),
            "writer": {"host": socket.gethostname(), "pid": os.getpid(), "device": str(lm.device)},
            "mix": {"window": cfg.harvest.mix_window, "seed": cfg.harvest.mix_seed,
                    "scheme": "numpy default_rng([seed, first seq_id of window]).permutation(rows of window)"}
            if cfg.harvest.mix_window > 1 else None, **unit.meta}
    if unit.source == "supergpqa" and unit.records:
        meta["generation"] = {k: unit.records[0].get(k, "") for k in ("backend", "backend_version", "backend_params")}
        meta["outcomes"] = ro.outcome_counts(unit.records)
    holder: dict = {}

    def open_unit():
        holder["uw"] = UnitWriter(w, unit, meta, cfg.harvest.mix_window, cfg.harvest.mix_seed, on_rows, turn, defer)

    wt.submit(open_unit)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    thinking = cfg.supergpqa.enable_thinking
    bs = max(1, cfg.harvest.batch_size)
    with LayerCapture(lm.layers, layers) as cap:
        for a in range(0, len(unit.seq_ids), bs):
            seqs, sids = unit.token_ids[a: a + bs], unit.seq_ids[a: a + bs]
            hb = capture_batch(cap, lm.model, seqs, sids, pad, lm.device)
            if unit.source == "supergpqa":
                rl = [rows_of(lm.tokenizer, _as_rollout(unit, a + i), thinking) for i in range(len(seqs))]
                roles = np.concatenate([r for r, _ in rl])
                labels = np.concatenate([l for _, l in rl])
            else:
                roles = np.full(len(hb.tokens), cf.ROLE_TEXT, np.int8)
                labels = np.full(len(hb.tokens), cf.LABEL_NONE, np.int8)
            wt.submit(lambda hb=hb, roles=roles, labels=labels, n=len(seqs): holder["uw"].add(hb, roles, labels, n))
    wt.submit(lambda: holder["uw"].close())
    return holder  # holder["uw"].seg: the segment, once `wt` has run the jobs


def _as_rollout(unit: Unit, i: int) -> ro.Rollout:
    rec = unit.records[i]
    n_p = rec["prompt_len"]
    ids = unit.token_ids[i]
    return ro.Rollout(unit.seq_ids[i], ids[:n_p], ids[n_p:], bool(rec.get("finished")), rec)


def _remote_unit(unit: Unit, ctx: Context) -> dict:
    """The dask task: pin this worker's device, set its threads, run one unit."""
    from dask.distributed import get_worker

    if ctx.device is None:
        worker = get_worker()
        device = getattr(worker, "actcache_device", None)  # set by pin_worker_devices when the run started
        if device is None:  # a worker that joined later: a numeric name is its slot, else slot 0
            device = gpu.device_for(int(worker.name) if str(worker.name).isdigit() else 0)
        ctx = dataclasses.replace(ctx, device=device)
    return process_unit(unit, ctx, defer=True)  # the coordinator commits it in plan order


def _pin_device(slots: dict[str, int], dask_worker=None) -> str | None:
    dask_worker.actcache_device = gpu.device_for(slots.get(dask_worker.address, 0))
    return dask_worker.actcache_device


def pin_worker_devices(client) -> dict[str, str | None]:
    """Give every worker of the cluster its own GPU (its slot among the workers of its host),
    whatever the workers' names; a worker started with one GPU in CUDA_VISIBLE_DEVICES keeps it."""
    slots = gpu.worker_slots(client.scheduler_info()["workers"])
    return client.run(_pin_device, slots)


# ---------------------------------------------------------------------------------------
# the run


def _open_or_create(cfg: PipelineConfig, info: dict, layers: list[int]):
    url = cfg.harvest.cache
    try:
        w = cf.open_cache(url, mode="a")
    except CacheError as e:
        if "no zarr.json" not in str(e):
            raise
        w = None
    sel = source_selection(cfg)
    if w is None:
        meta = {"model": info["provenance"], "source": sel, "harvest": dataclasses.asdict(cfg.harvest),
                "hook": {"site": HOOK, "meaning": "output of decoder layer N (0-based), the residual stream after it",
                         "module_path": f"{info['provenance']['layers_path']}.N"},
                "pipeline": cfg.to_dict()}
        if cfg.harvest.source == "supergpqa":  # a hub dataset is pinned to its commit at first use
            meta["dataset_revision"] = revisions.pin_dataset(cfg.supergpqa.dataset, cfg.supergpqa.revision, None)
        return cf.create_cache(url, d_model=info["d_model"], layers=layers, meta=meta, hook=HOOK,
                               codec=cfg.harvest.codec, chunk_tokens=cfg.harvest.chunk_tokens,
                               shard_mib=cfg.harvest.shard_mib, tokenizer_files=info["tokenizer_files"]), True
    m = w.snapshot().meta
    old, new = m.get("model", {}), info["provenance"]
    for k in ("name_or_path", "revision", "dtype", "weights_sha256"):
        if old.get(k) != new.get(k):
            raise UserError(f"{url} was harvested with model.{k}={old.get(k)!r}, not {new.get(k)!r}; "
                            "use the same model settings or another --cache")
    if m.get("source") != sel:
        raise UserError(f"{url} holds source {m.get('source', {}).get('name')!r} with other selection settings "
                        f"({m.get('source')}); use the same source settings or another --cache")
    if w.d_model != info["d_model"]:
        raise UserError(f"{url} has d_model {w.d_model}, the model has {info['d_model']}; use another --cache")
    return w, False


def run(cfg: PipelineConfig, progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """The whole `harvest run`: create or open the cache, add new layers, capture what is missing."""
    log = log or (lambda s: None)
    data.check_source(cfg.harvest.source)
    if cfg.harvest.hook != HOOK:
        raise UserError(f"harvest.hook {cfg.harvest.hook!r}: only {HOOK!r} (the output of decoder layer N) is "
                        "captured so far; set harvest.hook = \"resid_post\"")
    layers = sorted(set(cfg.harvest.layers))
    if not layers:
        raise UserError("no layers given; pass --layers 11,31,55")
    t0 = time.time()
    if cfg.harvest.torch_threads:
        torch.set_num_threads(cfg.harvest.torch_threads)
    info = describe_model(cfg.model)
    bad = [x for x in layers if x >= info["n_layers"]]
    if bad:
        raise ModelError(f"layer {bad[0]} is past the model's depth ({info['n_layers']} decoder layers, "
                         f"0..{info['n_layers'] - 1}); pass --layers within that range")
    w, created = _open_or_create(cfg, info, layers)
    summary: dict = {"cache": cfg.harvest.cache, "created": created, "source": cfg.harvest.source}
    snap = w.snapshot()
    new_layers = [L for L in layers if L not in snap.declared_layers]
    backfill = [L for L in snap.declared_layers if L not in snap.layers]  # declared by an interrupted run
    if new_layers or backfill:
        summary["added_layers"] = add_layers(cfg, w, sorted(set(new_layers) | set(backfill)), progress)
    done = done_seq_ids(w.snapshot())
    pin = (w.snapshot().meta.get("dataset_revision") or {}) if cfg.harvest.source == "supergpqa" else {}
    units, total = plan_units(cfg, info["tokenizer"], done, w.snapshot().segments, pin.get("commit"))
    summary.update(sequences_total=total, sequences_done_before=len(done), units=len(units))
    if isinstance(units, corpus_plan.PlannedUnits):  # where the streams restarted: no re-tokenizing before it
        summary["planned_from_sequence"] = units.resumed_from
    log(f"harvest: {len(done)} of {total} sequences already in {cfg.harvest.cache}; {len(units)} units to run")
    ctx = Context(config=cfg, cache_url=cfg.harvest.cache)
    fanned_out = bool(cfg.harvest.workers or cfg.harvest.scheduler)
    if units and cfg.harvest.source == "supergpqa" and (cfg.supergpqa.backend == "vllm" or not fanned_out):
        # Every pending question is generated first, behind one progress bar: vLLM alone on the
        # GPU (capture loads after it exits), or this process's model. Dask workers running the
        # transformers backend generate their own units instead.
        summary["generated"] = generate_missing(units, cfg, cfg.harvest.cache, lambda: _model(cfg.model, None),
                                                info["tokenizer"], progress)
    rows = run_units(units, ctx, cfg, progress)
    if getattr(units, "error", None):  # the corpus ran out: what it filled is committed, then one line
        raise units.error
    c = cf.open_cache(cfg.harvest.cache)
    summary.update(rows_written=rows, n_tokens=c.n_tokens, layers=c.layers, segments=len(c.segments),
                   fingerprint=c.fingerprint, seconds=round(time.time() - t0, 2))
    if cfg.harvest.source == "supergpqa":
        summary["outcomes"] = ro.outcome_counts(
            [r for r in c.sequences().to_pylist() if r.get("source") == "supergpqa"])
    return summary


def run_units(units: list[Unit], ctx: Context, cfg: PipelineConfig, progress: bool) -> int:
    from tqdm import tqdm

    est = getattr(units, "n_tokens", None) or sum(u.n_tokens for u in units) or None
    bar = tqdm(total=est, unit="tok", unit_scale=True, desc="harvest", disable=not progress or not units,
               dynamic_ncols=True)
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

    try:
        if not (cfg.harvest.workers or cfg.harvest.scheduler):
            # one thread per in-flight segment (a segment's rows stay in order within its thread)
            wts = [BackgroundWriter(cfg.harvest.queue_depth, f"harvest-writer-{i}")
                   for i in range(max(1, cfg.harvest.writer_threads))]
            order = CommitOrder()  # writers write in parallel; commits land in plan order
            try:
                for i, u in enumerate(units):
                    process_unit(u, ctx, wts[i % len(wts)], on_rows, turn=order.turn(i))
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
            _run_dask(units, ctx, cfg, on_rows)
    finally:
        bar.close()
    return state["rows"]


def _run_dask(units: list[Unit], ctx: Context, cfg: PipelineConfig, on_rows) -> None:
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if cfg.harvest.scheduler:
        client = Client(cfg.harvest.scheduler)
    else:
        n = cfg.harvest.workers
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        ctx = dataclasses.replace(ctx, threads=cfg.harvest.torch_threads or max(1, (os.cpu_count() or 1) // n))
    try:
        pin_worker_devices(client)
        sizes: dict[str, int] = {}

        def submit(u: Unit):
            f = client.submit(_remote_unit, u, ctx, key=f"harvest-{u.key}-{os.getpid()}", pure=False)
            sizes[f.key] = u.n_tokens
            return f

        # a bounded number of units in flight: corpus units are planned as the run goes
        todo = iter(units)
        limit = 2 * max(1, len(client.scheduler_info()["workers"]))
        # workers write their segments' objects; this process commits the records in plan order
        w = cf.open_cache(ctx.cache_url, mode="a")
        turn_of: dict[str, int] = {}
        ready: dict[int, dict] = {}
        next_turn = 0

        def submit_next(u: Unit):
            f = submit(u)
            turn_of[f.key] = len(turn_of)
            return f

        running = as_completed([submit_next(u) for u in itertools.islice(todo, limit)])
        for f in running:
            res = f.result()
            w.adopt(res["record"])  # keep its lease alive while it waits for its turn
            ready[turn_of[f.key]] = res["record"]
            while next_turn in ready:
                w.commit_prepared(ready.pop(next_turn))
                next_turn += 1
            on_rows(sizes.pop(f.key) or res["rows"], res["bytes"])
            u = next(todo, None)
            if u is not None:
                running.add(submit_next(u))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# ---------------------------------------------------------------------------------------
# adding a layer to rows already in the cache


def add_layers(cfg: PipelineConfig, w, layers: list[int], progress: bool = True) -> list[int]:
    """Backfill `layers` into every committed segment, from stored sequences: never regenerates.

    Rows are rebuilt in each segment's stored order (write-time mixing included) by locating
    every (seq_id, position) in a fresh forward over the stored token ids; the tokens are
    checked against the stored rows before anything is written.
    """
    from tqdm import tqdm

    lm = _model(cfg.model, None)
    lm.check_layers(layers)
    bfs = {L: w.add_layer(L) for L in layers}
    pending = {L: {s.id for s in bf.pending()} for L, bf in bfs.items()}
    snap = w.snapshot()
    todo = [s for s in snap.segments if any(s.id in p for p in pending.values())]
    if not todo:
        return layers
    seqs = snap.sequences()
    tok_of = dict(zip(seqs.column("seq_id").to_pylist(), seqs.column("token_ids").to_pylist()))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    bs = max(1, cfg.harvest.batch_size)
    bar = tqdm(total=sum(s.n_rows for s in todo), unit="tok", unit_scale=True, desc=f"add layers {layers}",
               disable=not progress, dynamic_ncols=True)
    with LayerCapture(lm.layers, layers) as cap:
        for s in todo:
            a, b = s.row_start, s.row_start + s.n_rows
            sid = np.asarray(snap.seq_ids[a:b])
            pos = np.asarray(snap.positions[a:b])
            tokens = np.asarray(snap.tokens[a:b])
            uniq = list(dict.fromkeys(sid.tolist()))
            missing = [x for x in uniq if x not in tok_of]
            if missing:
                raise CacheError(f"segment {s.id}: sequence {missing[0]} has no stored token ids; cannot add a layer")
            offsets, parts, off = {}, {L: [] for L in layers}, 0
            for i in range(0, len(uniq), bs):
                ids = uniq[i: i + bs]
                hb = capture_batch(cap, lm.model, [tok_of[x] for x in ids], ids, pad, lm.device).ready()
                for L in layers:
                    parts[L].append(hb.residuals[L])
                for x in ids:
                    offsets[x] = off
                    off += len(tok_of[x])
            index = np.fromiter((offsets[x] for x in sid.tolist()), np.int64, len(sid)) + pos
            flat_tokens = np.concatenate([np.asarray(tok_of[x], np.int64) for x in uniq])
            if not np.array_equal(flat_tokens[index], tokens):
                raise CacheError(f"segment {s.id}: stored sequences do not match its token rows; "
                                 "the cache is inconsistent, run `python -m cache_format verify`")
            t = torch.from_numpy(index)
            for L in layers:
                if s.id in pending[L]:
                    bfs[L].write(s.id, residuals={L: torch.cat(parts[L])[t]}, tokens=tokens, seq_ids=sid, positions=pos)
            bar.update(s.n_rows)
    bar.close()
    return layers
