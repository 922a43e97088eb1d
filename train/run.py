"""`train run`: one pass over the cache trains every requested SAE, with checkpoints and resume.

OUT holds: `run_state.json` (which run this is), `checkpoints/`, `heldout/` (the fixed
held-out evaluation rows, drawn once), `<name>/trajectory.jsonl` + `trajectory.png` per SAE,
and at the end the exported SAEs and `run.json` (all of it written through `outdir`). A killed
run resumes from its last checkpoint and ends with the same weights as an uninterrupted one
(on CPU: identical).

In this module, in order: what a run reads besides its training batches (the split check, the
held-out evaluation rows and the metrics on them, the initialisation sample), all through the
same loader as training (`run_loader`, built from `[train]`), so the filters and the split are
the training run's; the budget the recipe sets, fitted to a small cache; then the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cache_format.errors import CacheError, UserError
from cache_format.layout import ROLE_NAMES, bits_to_torch, role_codes
from cache_format.split import MIN_HELDOUT_SEQUENCES, Split
from cache_format.stores.local import atomic_dir

from . import dist
from .config import CARDS, KIND_KEYS, PipelineConfig, SweepSetting, TrainConfig, resolve
from .explog import ExperimentLog, check_kind, open_log
from .export import absolute_url, context_size, export_sae, sae_lens_cfg, sae_name
from .loader import ShuffledLoader
from .loader_plan import default_roles
from .metrics import ReconstructionMetrics
from .outdir import Checkpoints, OutLease, RunState, read_run, run_identity, write_run_json, write_trajectory
from .sae import SAE, make_sae
from .trainer import SAETrainer

# -- what a run reads besides its batches: split check, held-out rows, init sample -------------


def run_loader(
    cache,
    layers: list[int],
    tc: TrainConfig,
    split: str,
    batch_size: int,
    seed: int,
    *,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world: int = 1,
    local: bool = False,
    **kw,
) -> ShuffledLoader:
    """The training loader; `local` = this process reads whole batches on the CPU (eval, init)."""
    sharded = split == "train" and not local
    return ShuffledLoader(
        cache,
        layers,
        batch_size,
        seed=seed,
        split=split,
        heldout_fraction=tc.heldout_fraction,
        split_seed=tc.split_seed,
        roles=list(tc.roles) if tc.roles else "auto",
        exclude_position0=tc.exclude_position0,
        exclude_special=tc.exclude_special,
        norm_outlier=tc.norm_outlier,
        window_tokens=tc.shuffle_buffer_tokens,
        threads=tc.loader_threads,
        device="cpu" if local else device,
        rank=rank if sharded else 0,
        world_size=world if sharded else 1,
        max_rows=tc.max_rows if split == "train" else 0,
        **kw,
    )


def check_split(cache, tc: TrainConfig) -> dict:
    """Count both sides of the split; too few held-out sequences is a one-line error."""
    codes = role_codes(tc.roles) if tc.roles else default_roles(cache)
    counts = Split(tc.split_seed, tc.heldout_fraction).counts(cache, codes)
    if tc.heldout_fraction > 0 and counts["heldout_sequences"] < MIN_HELDOUT_SEQUENCES:
        raise UserError(
            f"only {counts['heldout_sequences']} of {counts['sequences']} sequences are held out "
            f"(train.heldout_fraction={tc.heldout_fraction:g}, train.split_seed={tc.split_seed}); at least "
            f"{MIN_HELDOUT_SEQUENCES} are needed to validate: raise train.heldout_fraction"
        )
    return counts


def heldout_rows(out: Path, cache, layers: list[int], tc: TrainConfig) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The evaluation rows: the first eval_tokens held-out rows of a fixed order, kept in OUT/heldout."""
    d = out / "heldout"
    if not (d / "rows.npy").exists():
        if tc.heldout_fraction <= 0:
            return np.zeros(0, np.int64), {}
        n = tc.eval_tokens
        loader = run_loader(
            cache,
            layers,
            tc,
            "heldout",
            min(4096, max(n, 1)),
            seed=tc.split_seed,
            local=True,
            max_epochs=1,
            drop_last=False,
            announce=False,
        )
        rows, parts = [], {L: [] for L in layers}
        got = 0
        for b in loader:
            take = min(len(b), n - got)
            rows.append(b.rows[:take])
            for L in layers:
                parts[L].append(b.residuals[L][:take].to(torch.bfloat16).view(torch.int16).numpy())
            got += take
            if got >= n:
                break
        loader.close()
        for stale in d.parent.glob(f".{d.name}.tmp*"):  # leftovers of a killed run
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_dir(d) as tmp:
            for L in layers:
                np.save(tmp / f"L{L}.npy", np.concatenate(parts[L]))
            np.save(tmp / "rows.npy", np.concatenate(rows))
    rows = np.load(d / "rows.npy", allow_pickle=False)  # OUT may come from elsewhere: data only
    return rows, {L: np.load(d / f"L{L}.npy", mmap_mode="r", allow_pickle=False) for L in layers}


@torch.no_grad()
def heldout_metrics(sae: SAE, data: np.ndarray, device: torch.device) -> dict:
    """The reconstruction metrics of `sae` on one layer's held-out rows (stored bf16 bits), as it
    encodes after training (BatchTopK: at its threshold, so L0 is measured)."""
    m = ReconstructionMetrics(sae.d_sae)
    for i in range(0, len(data), 4096):
        x = bits_to_torch(np.array(data[i : i + 4096])).float().to(device)
        vals, idx = sae.encode(x)
        m.update(x, sae.decode(vals, idx), vals, idx)
    return m.compute()


def init_sample(cache, layers: list[int], tc: TrainConfig) -> dict[int, torch.Tensor]:
    """geometric_median_samples train rows (another seed than training's) for b_dec and scale."""
    n = tc.geometric_median_samples
    loader = run_loader(
        cache,
        layers,
        tc,
        "train",
        min(n, 4096),
        seed=tc.seed + 7919,
        local=True,
        max_epochs=1,
        drop_last=False,
        announce=False,
    )
    parts = {L: [] for L in layers}
    got = 0
    for b in loader:
        for L in layers:
            parts[L].append(b.residuals[L])
        got += len(b)
        if got >= n:
            break
    loader.close()
    return {L: torch.cat(v)[:n] for L, v in parts.items()}


# -- the budget a recipe sets, fitted to this cache --------------------------------------------------


def budget(tc: TrainConfig, train_rows: int) -> int:
    """Rows each SAE trains on: `epochs` × the train split when set, else `training_tokens`."""
    if tc.epochs > 0:
        return max(1, math.ceil(tc.epochs * train_rows))
    return tc.training_tokens


def fit_to_run(tc: TrainConfig, explicit: list[str], tokens: int) -> tuple[TrainConfig, list[str]]:
    """Shrink a recipe's warmups and dead threshold that a small cache's run cannot hold.

    A recipe is sized for its card's run (the 000 card: ~1000 steps). On a smaller cache its
    warmup would outlast the run and no latent could ever count as dead, so AuxK would never
    fire: warmup and the dead threshold are each capped at a quarter of the run (the cards'
    own runs are well inside that: the 001 card's warmup is 10% of its steps); so is the
    sparsity coefficient's warmup of the jumprelu and relu kinds. Keys you set
    yourself are never changed.
    """
    steps = max(1, math.ceil(tokens / tc.batch_size))
    notes, changes = [], {}
    if "warmup_steps" not in explicit and tc.warmup_steps > steps // 4:
        changes["warmup_steps"] = steps // 4
        notes.append(f"warmup {tc.warmup_steps} -> {steps // 4} steps (the run has {steps})")
    coefficient = {"jumprelu", "relu"} & {s.architecture for s in tc.saes()}
    if coefficient and "sparsity_warmup_steps" not in explicit and tc.sparsity_warmup_steps > steps // 4:
        changes["sparsity_warmup_steps"] = steps // 4
        notes.append(f"sparsity warmup {tc.sparsity_warmup_steps} -> {steps // 4} steps")
    dead_cap = max(tc.batch_size, tokens // 4)
    if "dead_tokens" not in explicit and tc.dead_tokens > dead_cap:
        changes["dead_tokens"] = dead_cap
        notes.append(f"dead_tokens {tc.dead_tokens:,} -> {dead_cap:,} (a quarter of the run, so AuxK can fire)")
    return dataclasses.replace(tc, **changes), notes


def describe(tc: TrainConfig, name: str, train_rows: int, heldout: dict) -> str:
    """The one line `train run` prints about what it chose."""
    tokens = tc.training_tokens
    how = (
        f"{tc.epochs:g} epochs of {train_rows:,} train rows"
        if tc.epochs > 0
        else f"training_tokens, {tokens / max(1, train_rows):.1f} epochs of {train_rows:,} train rows"
    )
    cap = f" (max_rows {tc.max_rows:,})" if tc.max_rows else ""
    return (
        f"recipe {name} ({CARDS.get(name, name)}): {tc.architecture}, d_sae {tc.d_sae}, "
        + (f"k {tc.k}, " if tc.architecture in KIND_KEYS["k"] else f"sparsity {tc.sparsity_coefficient:g}, ")
        + f"lr {tc.lr:g}, "
        f"batch {tc.batch_size}, "
        f"{tokens:,} tokens per SAE = {how}{cap}; held out {heldout['heldout_sequences']} of "
        f"{heldout['sequences']} sequences ({heldout['heldout_tokens']:,} rows, fraction {tc.heldout_fraction:g})"
    )


# -- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One SAE of the run: a layer and the resolved settings of its kind."""

    layer: int
    sae: SweepSetting
    name: str
    setting: int  # its index in TrainConfig.saes()


def open_cache_or_fail(url: str):
    """The cache, refused in one line if it is unreadable or holds a row twice (from the log: cheap)."""
    import cache_format as cf
    from cache_format.ops import refuse_duplicates

    try:
        cache = cf.open_cache(url)
    except UserError:
        raise
    except Exception as e:
        raise CacheError(
            f"{url} is not a readable cache ({type(e).__name__}: {e}); pass --cache with a harvested cache's URL"
        ) from None
    refuse_duplicates(cache)
    return cache


def plan_specs(tc: TrainConfig, layers: list[int]) -> list[Spec]:
    """Every (layer, SAE setting) once, named as sae_name says; settings that would share a name
    (differing in a key the name leaves out) get a short hash of their settings appended."""
    settings = {}  # first index of each distinct setting
    for i, s in enumerate(tc.saes()):
        settings.setdefault(json.dumps(dataclasses.asdict(s), sort_keys=True), (i, s))
    names = [sae_name(0, s) for _, s in settings.values()]
    specs = []
    for layer in layers:
        for (key, (i, s)), base in zip(settings.items(), names):
            name = sae_name(layer, s)
            if names.count(base) > 1:
                name += "_" + hashlib.sha256(key.encode()).hexdigest()[:6]
            specs.append(Spec(layer, s, name, i))
    return specs


class Run:
    def __init__(
        self,
        cfg: PipelineConfig,
        cache_url: str,
        layers: list[int] | None,
        out: str,
        fresh: bool = False,
        progress: bool = True,
    ):
        self.rank, self.world = dist.init_from_env()
        self.cache_url = cache_url
        self.cache = open_cache_or_fail(cache_url)
        self.cfg = cfg
        self.tc, self.recipe = resolve(cfg, self.cache.meta or {})
        if self.tc.torch_threads > 0:
            torch.set_num_threads(self.tc.torch_threads)
        stored = list(self.cache.layers)
        self.layers = list(layers) if layers else (list(self.tc.layers) or stored)
        missing = [x for x in self.layers if x not in stored]
        if missing:
            raise UserError(
                f"layer(s) {missing} not in the cache at {cache_url} (it holds {stored}); "
                "pass --layers with stored layers, or harvest them first"
            )
        self.specs = plan_specs(self.tc, self.layers)
        self.out = Path(out)
        self.progress = progress and self.rank == 0
        self.device = torch.device(dist.resolve_device(self.tc.device))
        self.fingerprints = {L: self.cache.layer_fingerprint(L) for L in self.layers}
        self.run_id = run_identity(self.tc, self.layers, self.fingerprints)
        self.run_state = RunState(self.out, self.run_id, [s.name for s in self.specs], cache_url)
        self.fresh = fresh
        self.explog: ExperimentLog = ExperimentLog()  # train.log's writer, opened by execute on rank 0

    # ---- the run ---------------------------------------------------------------------

    def total_steps(self) -> int:
        return math.ceil(self.tc.training_tokens / self.tc.batch_size)

    def _build(self) -> dict[str, SAETrainer]:
        tc = self.tc
        trainers = {}
        for s in self.specs:
            torch.manual_seed(tc.seed * 1_000_003 + zlib.crc32(s.name.encode()))
            sae = make_sae(s.sae, self.cache.d_model).to(self.device)
            trainers[s.name] = SAETrainer(
                sae,
                lr=tc.lr,
                lr_min=tc.lr_min if tc.lr_schedule == "cosine" else None,  # None: hold lr
                warmup_steps=tc.warmup_steps,
                total_steps=self.total_steps(),
                lr_decay_steps=tc.lr_decay_steps,
                adam_betas=(tc.adam_beta1, tc.adam_beta2),
                k_aux=tc.k_aux,
                aux_alpha=tc.aux_alpha,
                dead_tokens=tc.dead_tokens,
                grad_clip=tc.grad_clip,
                aux_norm=tc.aux_norm,
                sparsity_coefficient=s.sae.sparsity_coefficient or 0.0,
                sparsity_warmup_steps=s.sae.sparsity_warmup_steps or 0,
            )
        return trainers

    def execute(self) -> dict:
        self.split = check_split(self.cache, self.tc)
        loader = run_loader(  # validates before OUT is touched
            self.cache,
            self.layers,
            self.tc,
            "train",
            self.tc.batch_size,
            self.tc.seed,
            device=self.device,
            rank=self.rank,
            world=self.world,
        )
        tokens = budget(self.tc, loader.n_rows)
        tc, notes = fit_to_run(dataclasses.replace(self.tc, training_tokens=tokens), self.cfg.train_keys_set, tokens)
        self.tc = tc
        # the fitted warmups reach each SAE's settings; names (OUT's layout) stay as planned
        fitted = tc.saes()
        self.specs = [dataclasses.replace(s, sae=fitted[s.setting]) for s in self.specs]
        self.train_rows = loader.n_rows
        self.roles = loader.roles  # the role codes trained on, recorded with the split
        if self.rank == 0:
            fitted = f"; fitted to this cache: {', '.join(notes)}" if notes else ""
            print(f"train: {describe(tc, self.recipe, loader.n_rows, self.split)}{fitted}", file=sys.stderr)
        check_kind(tc.log)  # its package is installed (the kind itself is checked by TrainConfig)
        with self._lease():
            status = self.run_state.claim(self.fresh, self.rank)
            if status == "complete":
                if self.rank == 0:
                    print(
                        f"run in {self.out} is already complete ({self.tc.training_tokens} tokens per SAE); "
                        "nothing to do (pass --fresh to train again)",
                        file=sys.stderr,
                    )
                return read_run(self.out)[0]
            return self._train(status, loader)

    @contextlib.contextmanager
    def _lease(self) -> Iterator[None]:
        """OUT's lease (`outdir.OutLease`), taken by rank 0 before OUT is claimed and held to the end;
        a refusal reaches every rank, so all of them stop with the same line."""
        lease, refused = None, None
        if self.rank == 0:
            try:
                lease = OutLease(self.out)
            except UserError as e:
                refused = str(e)
        refused = dist.all_gather_object(refused)[0]
        if refused:
            raise UserError(refused)
        try:
            yield
        finally:
            if lease is not None:
                lease.release()

    def _train(self, status: str, loader) -> dict:
        """Train from a new or resumed state to the end of the budget, then export."""
        tc = self.tc
        ckpts = Checkpoints(self.out / "checkpoints", tc.keep_last, tc.keep_best)
        trainers = self._build()
        held_rows, held = heldout_rows(self.out, self.cache, self.layers, tc) if self.rank == 0 else (None, None)
        dist.barrier()
        latest = ckpts.latest() if status == "resume" else None
        history: dict[str, list[dict]] = {s.name: [] for s in self.specs}
        if latest is not None:
            tokens, history = self._resume(latest, trainers, loader)
            if self.rank == 0:
                print(f"resuming {self.out} from {latest.stem} ({tokens} tokens)", file=sys.stderr)
        else:
            tokens = 0
            sample = init_sample(self.cache, self.layers, tc)
            for s in self.specs:
                trainers[s.name].init_from_sample(sample[s.layer], normalize=tc.normalize)
            del sample
        if self.rank == 0:
            for s in self.specs:
                self._write_trajectory(s, history[s.name])

        total = self.total_steps() * tc.batch_size
        next_eval = self._next(tokens, tc.eval_every_tokens)
        next_ckpt = self._next(tokens, tc.checkpoint_every_tokens)
        if self.rank == 0:
            self.explog = open_log(
                tc.log,
                Path(tc.log_dir) if tc.log_dir else self.out / "logs",
                self.out.name,
                {"train": dataclasses.asdict(tc), "run_id": self.run_id, "cache": self.cache_url},
            )
        bar = tqdm(
            total=total,
            initial=tokens,
            unit="tok",
            unit_scale=True,
            disable=not self.progress,
            file=sys.stderr,
            desc="train",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        last: dict[str, dict] = {}
        try:
            while tokens < total:
                batch = next(loader)
                for s in self.specs:
                    last[s.name] = trainers[s.name].step(batch.residuals[s.layer])
                    self.explog.train_step(s.name, trainers[s.name].tokens, last[s.name])
                tokens += tc.batch_size
                bar.update(tc.batch_size)
                done = tokens >= total
                evaluate = tokens >= next_eval or done or tokens >= next_ckpt
                if evaluate:
                    self._evaluate(trainers, tokens, last, history, held)
                    next_eval = self._next(tokens, tc.eval_every_tokens)
                if tokens >= next_ckpt or done:
                    self._checkpoint(ckpts, trainers, loader, tokens, history)
                    next_ckpt = self._next(tokens, tc.checkpoint_every_tokens)
                first = next(iter(last.values()))
                post = {"loss": f"{first['loss']:.4f}"}
                if history[self.specs[0].name]:
                    post["ve"] = f"{history[self.specs[0].name][-1]['variance_explained']:.3f}"
                bar.set_postfix(post, refresh=False)
        finally:
            bar.close()
            self.explog.close()
            loader.close()
        return self._export(trainers, tokens, history)

    def _resume(self, path: Path, trainers: dict[str, SAETrainer], loader) -> tuple[int, dict[str, list[dict]]]:
        """Load a checkpoint into the trainers and the loader: (tokens, history); one that does not
        fit them (another run's, or damaged) is one line."""
        state = Checkpoints.load(path)
        try:
            for name, tr in trainers.items():
                tr.load_state_dict(state["saes"][name])
            loader.load_state_dict(state["loader"])
            history = {s.name: list(state["history"][s.name]) for s in self.specs}
            return int(state["tokens"]), history
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            why = " ".join(str(e).split())[:120]
            raise UserError(
                f"{path}: this checkpoint does not fit the run ({type(e).__name__}: {why}); "
                "delete it and its .safetensors to resume from the one before, or pass --fresh"
            ) from None

    @staticmethod
    def _next(tokens: int, every: int) -> int:
        every = max(every, 1)
        return (tokens // every + 1) * every

    @torch.no_grad()
    def _evaluate(self, trainers, tokens, last, history, held) -> None:
        if self.rank == 0:
            for s in self.specs:
                tr = trainers[s.name]
                row = {"tokens": tokens, "step": tr.steps, "time": time.time()}
                if held:
                    metrics = heldout_metrics(tr.sae, held[s.layer], self.device)
                    row["eval_tokens"] = metrics.pop("tokens")
                    row.update(metrics)
                    self.explog.heldout(s.name, tr.tokens, metrics)
                row.update({"train_" + k: v for k, v in last.get(s.name, {}).items()})
                row["train_dead_fraction"] = float(tr.dead_mask().float().mean())
                history[s.name].append(row)
                self._write_trajectory(s, history[s.name])
        dist.barrier()

    def _write_trajectory(self, s: Spec, rows: list[dict]) -> None:
        write_trajectory(self.out / s.name, rows)

    def _checkpoint(self, ckpts, trainers, loader, tokens, history) -> None:
        loader_states = dist.all_gather_object(loader.state_dict())  # every rank reads its own chunks
        if self.rank == 0:
            scores = [h[-1]["variance_explained"] for h in history.values() if h and "variance_explained" in h[-1]]
            state = {
                "run_id": self.run_id,
                "tokens": tokens,
                "loader": {"ranks": loader_states},
                "history": history,
                "saes": {name: tr.state_dict() for name, tr in trainers.items()},
            }
            ckpts.save(state, tokens, float(np.mean(scores)) if scores else None)
        dist.barrier()

    def _export(self, trainers, tokens, history) -> dict:
        tc = self.tc
        run = {
            "run_id": self.run_id,
            "cache": absolute_url(self.cache_url),
            "cache_fingerprint": self.cache.fingerprint,
            "layer_fingerprints": {str(k): v for k, v in self.fingerprints.items()},
            "layers": self.layers,
            "tokens": tokens,
            "complete": True,
            "config": dataclasses.asdict(tc),
            "recipe": {
                "name": self.recipe,
                "card": CARDS.get(self.recipe, ""),
                "epochs": tc.epochs,
                "training_tokens": tc.training_tokens,
                "train_rows": self.train_rows,
            },
            "model": (self.cache.meta.get("model") or {}).get("name_or_path", ""),
            "saes": [],
        }
        if self.rank == 0:
            meta = self.cache.meta
            hook = getattr(self.cache, "hook", "resid_post")
            module = (meta.get("model") or {}).get("layers_path", "")
            context = context_size(self.cache)
            for s in self.specs:
                tr = trainers[s.name]
                split = {
                    **Split(tc.split_seed, tc.heldout_fraction).to_record(),
                    "roles": [ROLE_NAMES[c] for c in self.roles] if self.roles else None,  # None: every role
                    "heldout_sequences": self.split["heldout_sequences"],
                    "heldout_tokens": self.split["heldout_tokens"],
                    "sequences": self.split["sequences"],
                }
                norm = (
                    {"input_mean": "zeros", "input_scale": float(tr.sae.input_scale[0]), "folded": True}
                    if tc.normalize
                    else {"kind": "none"}
                )
                cfg = sae_lens_cfg(
                    tr.sae,
                    layer=s.layer,
                    hook=hook,
                    hook_module=f"{module}.{s.layer}" if module else "",
                    model=run["model"],
                    fingerprint=self.fingerprints[s.layer],
                    tokens=tr.tokens,
                    split=split,
                    normalization=norm,
                    config=run["config"],
                    cache_url=self.cache_url,
                    source=meta.get("source"),
                    context=context,
                )
                files = export_sae(tr.sae, self.out / s.name, cfg)
                metrics = {
                    k: v for k, v in (history[s.name][-1] if history[s.name] else {}).items() if k not in ("time",)
                }
                run["saes"].append(
                    {
                        "name": s.name,
                        "path": s.name,
                        "layer": s.layer,
                        "architecture": s.sae.architecture,
                        "d_sae": s.sae.d_sae,
                        "k": s.sae.k,
                        "hook": hook,
                        "layer_fingerprint": self.fingerprints[s.layer],
                        "tokens": tr.tokens,
                        "lr": tr.peak_lr,
                        "files": files,
                        "metrics": metrics,
                        "split": split,
                        "trajectory": f"{s.name}/trajectory.jsonl",
                    }
                )
            write_run_json(self.out, run)
            self.run_state.write(complete=True)
            print(f"trained {len(self.specs)} SAE(s) on {tokens} tokens each -> {self.out}/run.json", file=sys.stderr)
        dist.barrier()
        return run
