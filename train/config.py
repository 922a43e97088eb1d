"""Train's sections of `pipeline.toml`: the SAE recipe, per-source recipes and analysis.

Checks sit in each section's `__post_init__`, so a value a run could not use is refused in
one line before any work, whether it came from the file, a profile, `--set` or a recipe.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cache_format.config import ConfigError, Loaded, check_ranges, coerce, load_sections, shared_section
from cache_format.shared_keys import AnalysisKeys, HarvestKeys, TrainKeys


@dataclass
class SweepSetting:
    """One extra (d_sae, k) trained per layer from the same batches; both keys are required."""

    d_sae: int
    k: int


AUX_NORMS = ("residual", "total")  # AuxK loss over the residual error's variance (OpenAI) | the total (sparsify)
LR_SCHEDULES = ("cosine", "constant")
LOG_KINDS = ("none", "tensorboard", "wandb")


@dataclass
class TrainConfig(TrainKeys):
    """TopK+AuxK SAE training; defaults from the `001_*` card. Key names are stable.

    A recipe (`[recipes.NAME]`) is applied under the keys set in `[train]`: see `recipe`.
    """

    recipe: str = "auto"  # auto (by the cache's source: rollouts or corpus) | rollouts | corpus | none
    layers: list[int] = field(default_factory=list)  # [] = every layer in the cache
    d_sae: int = 65536
    k: int = 128
    k_aux: int = 0  # 0 = d_model // 2
    aux_alpha: float = 1 / 32
    dead_tokens: int = 10_000_000  # a latent unseen for this many tokens counts as dead
    aux_norm: str = "residual"  # AuxK loss over the residual error's variance (OpenAI) | "total" (sparsify's)
    lr: float = 2e-4  # 0 = scale with width, as sparsify does
    lr_min: float = 6e-5
    lr_schedule: str = "cosine"  # after warmup: "cosine" decays to lr_min, "constant" holds lr
    warmup_steps: int = 5000
    batch_size: int = 4096  # global across ranks
    grad_clip: float = 1.0
    training_tokens: int = 200_000_000
    # > 0: the budget is epochs × the train split's rows (after max_rows); wins over training_tokens
    epochs: float = 0.0
    seed: int = 0
    checkpoint_every_tokens: int = 10_000_000
    keep_last: int = 2
    keep_best: int = 2
    eval_every_tokens: int = 10_000_000
    eval_tokens: int = 1_000_000
    roles: list[str] = field(default_factory=list)  # [] = thinking+answer on rollouts, all on text
    exclude_position0: bool = False
    exclude_special: bool = False
    norm_outlier: float = 0.0  # drop rows with norm > this × median; 0 = keep all
    normalize: bool = False  # scale inputs to unit mean norm; folded into exported weights
    geometric_median_samples: int = 16384
    sweep: list[SweepSetting] = field(default_factory=list)
    device: str = "auto"
    loader_threads: int = 0  # decode threads; 0 = the cores this rank may use less one, 1 to 16
    shuffle_buffer_tokens: int = 262_144
    torch_threads: int = 0  # intra-op threads for training; 0 = torch's default (1 is fastest for tiny shapes)
    log: str = "none"  # experiment log of each SAE's trajectory: "none" | "tensorboard" | "wandb"
    log_dir: str = ""  # where the log writes; "" = OUT/logs (wandb follows WANDB_MODE, e.g. offline)
    max_rows: int = 0  # cap the train split to a random sample of this many rows (the 000 card: 200k); 0 = all

    def __post_init__(self):
        super().__post_init__()
        for key, allowed in (("aux_norm", AUX_NORMS), ("lr_schedule", LR_SCHEDULES), ("log", LOG_KINDS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"train.{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}"
                    + ("; set --set train.log='none'" if key == "log" else "")
                )
        for i, s in enumerate(self.sweep):
            if not 1 <= s.k < s.d_sae:
                raise ConfigError(
                    f"train.sweep[{i}]: k={s.k} must be between 1 and d_sae-1 (d_sae={s.d_sae}); fix that entry"
                )
        if self.recipe not in ("auto", *RECIPES, "none"):
            raise ConfigError(f"train.recipe {self.recipe!r} is unknown; use auto, {', '.join(RECIPES)} or none")
        check_ranges(
            self,
            "train",
            [
                ("d_sae", 1, True),
                ("k", 1, True),
                ("k_aux", 0, True),
                ("aux_alpha", 0, True),
                ("dead_tokens", 1, True),
                ("lr", 0, True),
                ("lr_min", 0, True),
                ("warmup_steps", 0, True),
                ("batch_size", 1, True),
                ("grad_clip", 0, True),
                ("training_tokens", 1, True),
                ("checkpoint_every_tokens", 0, True),
                ("keep_last", 0, True),
                ("keep_best", 0, True),
                ("eval_every_tokens", 0, True),
                ("eval_tokens", 0, True),
                ("norm_outlier", 0, True),
                ("loader_threads", 0, True),
                ("shuffle_buffer_tokens", 0, True),
                ("max_rows", 0, True),
                ("epochs", 0, True),
            ],
        )


RECIPES = ("rollouts", "corpus")


def _rollouts_recipe() -> dict[str, Any]:
    # The `000_*` card: n=4096, k=32, Adam 3e-4, batch 4096, 20 epochs of <= 200k rows per layer.
    # Sized for a ~1000-step run: warmup 5%, and a dead threshold (~120 steps) that AuxK reaches.
    return {
        "d_sae": 4096,
        "k": 32,
        "k_aux": 512,
        "aux_alpha": 1 / 32,
        "lr": 3e-4,
        "lr_schedule": "constant",
        "warmup_steps": 50,
        "batch_size": 4096,
        "epochs": 20.0,
        "max_rows": 200_000,
        "dead_tokens": 500_000,
        "checkpoint_every_tokens": 1_000_000,
        "eval_every_tokens": 500_000,
        "eval_tokens": 1_000_000,
        "heldout_fraction": 0.1,
    }


@dataclass
class RecipesConfig:
    """Per-source training recipes: partial `[train]` tables, applied under `[train]`'s own keys."""

    rollouts: dict[str, Any] = field(default_factory=_rollouts_recipe)  # SuperGPQA rollouts: the 000 card
    corpus: dict[str, Any] = field(default_factory=dict)  # packed corpus: the 001 card (= TrainConfig's defaults)

    def __post_init__(self):
        hints = typing.get_type_hints(TrainConfig)
        for name in RECIPES:
            table = getattr(self, name)
            for key, value in table.items():
                if key not in hints or key in ("recipe", "cache", "out", "layers"):
                    raise ConfigError(
                        f"recipes.{name}: {key!r} is not a recipe key (any [train] key but "
                        "recipe, cache, out and layers)"
                    )
                table[key] = coerce(hints[key], value, f"recipes.{name}.{key}")


@dataclass
class AnalysisConfig(AnalysisKeys):
    """Feature statistics, reverse index and loss recovered after training."""

    top_examples: int = 16  # reverse index: examples kept per feature
    context_tokens: int = 8  # tokens decoded on each side of an example
    bootstrap: int = 200  # sequence-bootstrap resamples for the AUROC CI; 0 = skip
    permutations: int = 200  # label permutations for the p-value; 0 = skip
    min_fires: int = 5  # features firing fewer times are not tested (no CI, p, q)
    alpha: float = 0.05  # BH false-discovery rate for "significant"
    max_tokens: int = 1_000_000  # rows analyzed (the first ones in cache order)
    rows: str = "auto"  # heldout | train | all; auto = all labeled rows on rollouts (as the 000 card), else heldout
    report_features: int = 24  # top features shown per SAE in the report
    scheduler: str = ""  # dask scheduler address; "" = a LocalCluster


@dataclass
class PipelineConfig(Loaded):
    """`pipeline.toml` as train reads it: its own sections, and where harvest wrote the cache."""

    OTHER_SECTIONS: ClassVar[tuple[str, ...]] = ("model", "supergpqa", "corpus")  # harvest's: checked by harvest

    train: TrainConfig = field(default_factory=TrainConfig)
    recipes: RecipesConfig = field(default_factory=RecipesConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    harvest: HarvestKeys = shared_section(HarvestKeys)  # the rest of [harvest] is harvest's

    @property
    def train_keys_set(self) -> list[str]:
        """[train] keys the toml, profile or flags set: recipes apply under them."""
        return self.keys_set.get("train", [])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(
    path: str | Path | None = None, profile: str | None = None, overrides: typing.Iterable[str] = (), **flags: Any
) -> PipelineConfig:
    """pipeline.toml for train (see `cache_format.config.load_sections`)."""
    return load_sections(PipelineConfig, path, profile, overrides, **flags)
