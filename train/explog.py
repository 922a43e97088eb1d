"""Experiment logs (`train.log`): each SAE's trajectory in TensorBoard or Weights & Biases.

Why a module of its own: the run loop calls two methods and never imports a logging package;
the package is imported only when `train.log` names it, so the default ("none") costs nothing
and needs nothing installed. The trajectory files in OUT (`trajectory.jsonl`) stay the record;
these logs are for watching runs and comparing them across sweeps.

Layout. TensorBoard: one event-file directory per SAE, `LOG_DIR/<sae name>/`, so that the
SAEs of one run overlay in the same charts. wandb: one run per `train run`, keys
`<sae name>/<metric>`, the run's config attached; it follows WANDB_MODE (offline writes
`LOG_DIR/wandb/offline-run-*` for `wandb sync` later). The x axis is always tokens per SAE.

Keys: `train/loss`, `train/fvu`, `train/aux_loss`, `train/dead` (latents dead by the token
window), `train/lr` every step; `heldout/<metric>` (variance_explained, mse, l0,
dead_fraction, alive) at every evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cache_format.errors import UserError

from .config import LOG_KINDS

_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


class ExperimentLog:
    """No-op base: `train.log = "none"`."""

    def train_step(self, sae: str, tokens: int, scalars: dict[str, float]) -> None:
        pass

    def heldout(self, sae: str, tokens: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLog(ExperimentLog):
    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._new = lambda name: SummaryWriter(log_dir=str(directory / name))
        self._writers: dict[str, Any] = {}

    def _writer(self, sae: str):
        if sae not in self._writers:
            self._writers[sae] = self._new(sae)
        return self._writers[sae]

    def train_step(self, sae, tokens, scalars):
        w = self._writer(sae)
        for k, v in scalars.items():
            w.add_scalar(f"train/{k}", float(v), tokens)

    def heldout(self, sae, tokens, metrics):
        w = self._writer(sae)
        for k, v in metrics.items():
            w.add_scalar(f"heldout/{k}", float(v), tokens)
        w.flush()

    def close(self):
        for w in self._writers.values():
            w.close()


class WandbLog(ExperimentLog):
    def __init__(self, directory: Path, name: str, config: dict):
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project="actcache", name=name, dir=str(directory), config=config, settings=wandb.Settings(console="off")
        )  # leave stdout alone (`--json`)
        self._defined: set[str] = set()

    def _log(self, sae: str, group: str, tokens: int, values: dict[str, float]) -> None:
        if sae not in self._defined:  # tokens of this SAE is the x axis of its metrics
            self._run.define_metric(f"{sae}/tokens")
            self._run.define_metric(f"{sae}/*", step_metric=f"{sae}/tokens")
            self._defined.add(sae)
        row = {f"{sae}/{group}/{k}": float(v) for k, v in values.items()}
        row[f"{sae}/tokens"] = tokens
        self._run.log(row)

    def train_step(self, sae, tokens, scalars):
        self._log(sae, "train", tokens, scalars)

    def heldout(self, sae, tokens, metrics):
        self._log(sae, "heldout", tokens, metrics)

    def close(self):
        self._run.finish()


def check_kind(kind: str) -> None:
    """Refuse an unknown kind or a missing package before a run touches OUT: one line."""
    if kind not in LOG_KINDS:
        raise UserError(f"train.log={kind!r} is not one of {', '.join(LOG_KINDS)}; set --set train.log='none'")
    if kind == "none":
        return
    module = "tensorboard" if kind == "tensorboard" else "wandb"
    try:
        __import__(module)
    except ImportError:
        raise UserError(f"train.log={kind!r} needs the {module} package: {_INSTALL[kind]}") from None


def open_log(kind: str, directory: Path, name: str, config: dict) -> ExperimentLog:
    check_kind(kind)
    if kind == "tensorboard":
        return TensorBoardLog(directory)
    if kind == "wandb":
        return WandbLog(directory, name, config)
    return ExperimentLog()
