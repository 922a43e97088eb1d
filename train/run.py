"""`train run`: one pass over the cache trains every requested SAE, with checkpoints and resume.

OUT holds: `run_state.json` (which run this is), `checkpoints/`, `heldout/` (the fixed
held-out evaluation rows, drawn once), `<name>/trajectory.jsonl` + `trajectory.png` per SAE,
and at the end the exported SAEs and `run.json`. A killed run resumes from its last
checkpoint and ends with the same weights as an uninterrupted one (on CPU: identical).

This module is the loop; claiming OUT (`run_state.json`) is `run_state`'s, and the rows a run
reads besides its batches (split check, held-out set, initial sample) are `run_data`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
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

from . import dist, recipe
from .checkpoint import Checkpoints
from .config import PipelineConfig, SweepSetting, TrainConfig
from .explog import ExperimentLog, check_kind, open_log
from .export import absolute_url, context_size, export_sae, plot_trajectory, sae_lens_cfg, sae_name
from .out_files import write_out
from .out_lease import OutLease
from .run_data import check_split, heldout_metrics, heldout_rows, init_sample, run_loader
from .run_state import RunState, run_identity
from .rundir import read_run, write_run_json
from .sae import make_sae
from .trainer import SAETrainer


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
        self.tc, self.recipe = recipe.resolve(cfg, self.cache.meta or {})
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
        tokens = recipe.budget(self.tc, loader.n_rows)
        tc, notes = recipe.fit_to_run(
            dataclasses.replace(self.tc, training_tokens=tokens), self.cfg.train_keys_set, tokens
        )
        self.tc = tc
        # the fitted warmups reach each SAE's settings; names (OUT's layout) stay as planned
        fitted = tc.saes()
        self.specs = [dataclasses.replace(s, sae=fitted[s.setting]) for s in self.specs]
        self.train_rows = loader.n_rows
        if self.rank == 0:
            fitted = f"; fitted to this cache: {', '.join(notes)}" if notes else ""
            print(f"train: {recipe.describe(tc, self.recipe, loader.n_rows, self.split)}{fitted}", file=sys.stderr)
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
        """OUT's lease (out_lease.py), taken by rank 0 before OUT is claimed and held to the end;
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
        d = self.out / s.name
        d.mkdir(parents=True, exist_ok=True)
        write_out(d / "trajectory.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        if rows and "variance_explained" in rows[-1]:
            plot_trajectory(rows, d / "trajectory.png", s.name)

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
                "card": recipe.CARDS.get(self.recipe, ""),
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
                    "seed": tc.split_seed,
                    "fraction": tc.heldout_fraction,
                    "by": "seq_id hash (train.split)",
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
