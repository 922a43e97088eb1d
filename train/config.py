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

from cache_format.config import (
    AnalysisKeys,
    ConfigError,
    HarvestKeys,
    Loaded,
    OutOfRange,
    TrainKeys,
    build_section,
    check_ranges,
    coerce,
    load_sections,
    setting,
    shared_section,
)

ARCHITECTURES = ("topk", "batchtopk", "matryoshka", "jumprelu", "relu")  # train.sae.KINDS implements them
# the keys only some architectures read: given to another one, they are refused
KIND_KEYS = {
    "k": ("topk", "batchtopk", "matryoshka"),
    "matryoshka_sizes": ("matryoshka",),
    "sparsity_coefficient": ("jumprelu", "relu"),
    "sparsity_warmup_steps": ("jumprelu", "relu"),
    "jumprelu_bandwidth": ("jumprelu",),
    "jumprelu_init_threshold": ("jumprelu",),
}


@dataclass
class SweepSetting:
    """One more SAE per layer, trained from the same batches. A key left out takes [train]'s
    value; sparsity_coefficient only from a [train] of the same architecture (jumprelu's is an
    L0 coefficient, relu's an L1 one: their scales differ)."""

    architecture: str | None = None
    d_sae: int | None = None
    k: int | None = None
    sparsity_coefficient: float | None = None
    sparsity_warmup_steps: int | None = None
    jumprelu_bandwidth: float | None = None
    jumprelu_init_threshold: float | None = None
    matryoshka_sizes: list[int] | None = None

    def __post_init__(self):
        _check_kind_values(self, "train.sweep entry's ")


AUX_NORMS = ("residual", "total")  # AuxK loss over the residual error's variance (OpenAI) | the total (sparsify)
LR_SCHEDULES = ("cosine", "constant")
LOG_KINDS = ("none", "tensorboard", "wandb")


@dataclass
class TrainConfig(TrainKeys):
    """SAE training; defaults from the `001_*` card (TopK + AuxK). Key names are stable.

    A recipe (`[recipes.NAME]`) is applied under the keys set in `[train]`: see `resolve`.
    """

    recipe: str = setting("auto", "auto (by the cache's source: rollouts or corpus) | rollouts | corpus | none")
    layers: list[int] = setting([], "cache layers to train on; [] = every layer in the cache")
    architecture: str = setting("topk", "topk | batchtopk | matryoshka | jumprelu | relu (docs/train.md: the kinds)")
    d_sae: int = setting(65536, "latents per SAE")
    k: int = setting(128, "topk: active latents per row; batchtopk, matryoshka: per row on average over the batch")
    sparsity_coefficient: float = setting(
        1.0, "jumprelu, relu: SAELens 6's l0_coefficient (jumprelu) or l1_coefficient (relu), same scale and meaning"
    )
    sparsity_warmup_steps: int = setting(5000, "jumprelu, relu: the coefficient rises linearly from 0 over these steps")
    jumprelu_bandwidth: float = setting(0.05, "the straight-through estimator's rectangle width (pre-activation units)")
    jumprelu_init_threshold: float = setting(0.01, "every latent's threshold at step 0 (SAELens 6's default)")
    matryoshka_sizes: list[int] = setting([], "nested prefixes, increasing, last = d_sae; [] = d_sae/8, /4, /2, d_sae")
    k_aux: int = setting(0, "dead latents in the AuxK reconstruction; 0 = d_model // 2")
    aux_alpha: float = setting(1 / 32, "weight of the AuxK loss (the dead latents' reconstruction of the residual)")
    dead_tokens: int = setting(10_000_000, "a latent unseen for this many tokens counts as dead")
    aux_norm: str = setting(
        "residual", "AuxK loss over the residual error's variance (OpenAI) | \"total\" (sparsify's)"
    )
    lr: float = setting(2e-4, "peak learning rate; 0 = scale with width, as sparsify does")
    lr_min: float = setting(6e-5, "the cosine schedule's floor")
    lr_schedule: str = setting("cosine", 'after warmup: "cosine" decays to lr_min, "constant" holds lr')
    lr_decay_steps: int = setting(0, "the last this many steps the lr falls linearly to 0 (SAELens' lr_decay_steps)")
    adam_beta1: float = setting(0.9, "Adam's first-moment decay (SAELens' adam_beta1)")
    adam_beta2: float = setting(0.999, "Adam's second-moment decay (SAELens' adam_beta2)")
    warmup_steps: int = setting(5000, "linear learning-rate warmup, in steps")
    batch_size: int = setting(4096, "rows per step, global across ranks")
    grad_clip: float = setting(1.0, "the gradient's norm is clipped to this")
    training_tokens: int = setting(200_000_000, "rows each SAE trains on, unless epochs is set")
    epochs: float = setting(
        0.0, "> 0: the budget is epochs × the train split's rows (after max_rows); wins over training_tokens"
    )
    seed: int = setting(0, "seed of the SAEs' initialisation and the loader's shuffle")
    checkpoint_every_tokens: int = setting(10_000_000, "a checkpoint every this many tokens, and at the end")
    keep_last: int = setting(2, "checkpoints kept: the last ones ...")
    keep_best: int = setting(2, "... and the best ones by held-out variance explained")
    eval_every_tokens: int = setting(10_000_000, "held-out evaluation every this many tokens, and at the end")
    eval_tokens: int = setting(1_000_000, "held-out rows evaluated (drawn once into OUT/heldout)")
    roles: list[str] = setting([], "roles trained on; [] = thinking+answer on rollouts, all on text")
    exclude_position0: bool = setting(False, "drop the rows at position 0 of each sequence")
    exclude_special: bool = setting(False, "drop the rows of the tokenizer's special tokens")
    norm_outlier: float = setting(0.0, "drop rows with norm > this × median; 0 = keep all")
    normalize: bool = setting(False, "scale inputs to unit mean norm; folded into exported weights")
    geometric_median_samples: int = setting(
        16384, "train rows whose geometric median initialises b_dec (and the input scale)"
    )
    sweep: list[SweepSetting] = setting(
        [], 'more SAEs per layer from the same batches: [{architecture = "batchtopk", k = 32}, ...]'
    )
    device: str = setting("auto", "auto (cuda when there is one) | cpu | cuda")
    loader_threads: int = setting(0, "decode threads; 0 = the cores this rank may use less one, 1 to 16")
    shuffle_buffer_tokens: int = setting(262_144, "the loader's shuffle window, in rows")
    torch_threads: int = setting(0, "intra-op threads for training; 0 = torch's default (1 is fastest for tiny shapes)")
    log: str = setting("none", 'experiment log of each SAE\'s trajectory: "none" | "tensorboard" | "wandb"')
    log_dir: str = setting("", 'where the log writes; "" = OUT/logs (wandb follows WANDB_MODE, e.g. offline)')
    max_rows: int = setting(0, "cap the train split to a random sample of this many rows (the 000 card: 200k); 0 = all")

    def __post_init__(self):
        super().__post_init__()
        for key, allowed in (("aux_norm", AUX_NORMS), ("lr_schedule", LR_SCHEDULES), ("log", LOG_KINDS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"train.{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}"
                    + ("; set --set train.log='none'" if key == "log" else "")
                )
        _check_kind_values(self, "train.")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise OutOfRange(f"train.{key}", getattr(self, key), "in [0, 1)")
        if self.recipe not in ("auto", *RECIPES, "none"):
            raise ConfigError(f"train.recipe {self.recipe!r} is unknown; use auto, {', '.join(RECIPES)} or none")
        check_ranges(
            self,
            "train",
            [
                ("d_sae", 1, True),
                ("k", 1, True),
                ("sparsity_coefficient", 0, True),
                ("sparsity_warmup_steps", 0, True),
                ("jumprelu_bandwidth", 0, False),
                ("jumprelu_init_threshold", 0, False),
                ("k_aux", 0, True),
                ("aux_alpha", 0, True),
                ("dead_tokens", 1, True),
                ("lr", 0, True),
                ("lr_min", 0, True),
                ("lr_decay_steps", 0, True),
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

    def saes(self, explicit: typing.Iterable[str] = ()) -> list[SweepSetting]:
        """Every SAE a layer trains: [train]'s own, then each sweep entry, resolved and checked.

        `explicit` are the [train] keys the user set (file, profile or --set): a kind's key set
        there for an architecture that does not read it is refused, as in a sweep entry (k
        excepted in [train]: recipes and profiles set it whatever the architecture).
        """
        base = SweepSetting(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SweepSetting)})
        # k is the one kind key recipes and profiles set for every run, so only sweep entries are held to it
        unused = [k for k in explicit if k in KIND_KEYS and k != "k" and self.architecture not in KIND_KEYS[k]]
        if unused:
            raise ConfigError(
                f"train.{unused[0]} is not read by train.architecture={self.architecture!r} "
                f"(only by {', '.join(KIND_KEYS[unused[0]])}); drop it, or set it in a train.sweep entry of that kind"
            )
        out = [_resolve(base, base, "train.")]
        for i, entry in enumerate(self.sweep):
            kind = entry.architecture or self.architecture
            given = [f.name for f in dataclasses.fields(entry) if getattr(entry, f.name) is not None]
            unused = [key for key in given if key in KIND_KEYS and kind not in KIND_KEYS[key]]
            if unused:
                raise ConfigError(
                    f"train.sweep[{i}]: {unused[0]} is not read by architecture {kind!r} "
                    f"(only by {', '.join(KIND_KEYS[unused[0]])}); drop it from that entry"
                )
            inherit = {
                key: getattr(base, key)
                for key in given_or_inherited(kind, self.architecture)
                if getattr(entry, key) is None
            }
            out.append(_resolve(dataclasses.replace(entry, architecture=kind, **inherit), base, f"train.sweep[{i}]."))
        return out


def given_or_inherited(kind: str, base_kind: str) -> list[str]:
    """The keys a sweep entry of `kind` takes from [train] when it leaves them out."""
    keys = ["d_sae", *KIND_KEYS]
    return keys if kind == base_kind else [k for k in keys if k != "sparsity_coefficient"]


def _resolve(s: SweepSetting, base: SweepSetting, where: str) -> SweepSetting:
    """One SAE's settings with the kind's defaults filled in and the keys it does not read cleared."""
    defaults = {
        f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
        for f in dataclasses.fields(TrainConfig)
        if f.name in KIND_KEYS
    }
    vals = {
        key: (getattr(s, key) if getattr(s, key) is not None else defaults.get(key))
        if s.architecture in kinds
        else None
        for key, kinds in KIND_KEYS.items()
    }
    d_sae = s.d_sae if s.d_sae is not None else base.d_sae
    if s.architecture in KIND_KEYS["k"] and not 0 < vals["k"] < d_sae:
        raise ConfigError(
            f"{where}k={vals['k']} must be between 1 and d_sae-1 (d_sae={d_sae}); lower {where}k or raise {where}d_sae"
        )
    if s.architecture == "matryoshka":
        sizes = vals["matryoshka_sizes"] or [d_sae // 8, d_sae // 4, d_sae // 2, d_sae]
        if sizes[0] <= 0 or sizes[-1] != d_sae or any(a >= b for a, b in zip(sizes, sizes[1:])):
            raise ConfigError(
                f"{where}matryoshka_sizes={sizes} must increase and end at d_sae={d_sae} "
                f"(e.g. [{d_sae // 8}, {d_sae // 4}, {d_sae // 2}, {d_sae}]); fix it or leave it out"
            )
        vals["matryoshka_sizes"] = list(sizes)
    return SweepSetting(architecture=s.architecture, d_sae=d_sae, **{k: v for k, v in vals.items()})


def _check_kind_values(section: Any, where: str) -> None:
    """The architecture's name, and for a sweep entry its keys' ranges ([train]'s are checked with
    the other keys); cross-key checks wait for the effective config (`TrainConfig.saes`)."""
    kind = section.architecture
    if kind is not None and kind not in ARCHITECTURES:
        raise ConfigError(f"{where}architecture {kind!r} is unknown; use one of {', '.join(ARCHITECTURES)}")
    if not isinstance(section, SweepSetting):
        return
    for key, low, strict in SWEEP_RANGES:
        v = getattr(section, key)
        if v is not None and (v < low or (strict and v == low)):
            raise ConfigError(
                f"{where}{key} = {v} must be {'above' if strict else 'at least'} {low}; fix that train.sweep entry"
            )


SWEEP_RANGES = [
    ("d_sae", 1, False),
    ("k", 1, False),
    ("sparsity_coefficient", 0, False),
    ("sparsity_warmup_steps", 0, False),
    ("jumprelu_bandwidth", 0, True),
    ("jumprelu_init_threshold", 0, True),
]


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

    rollouts: dict[str, Any] = setting(factory=_rollouts_recipe, doc="SuperGPQA rollouts: the 000 card")
    corpus: dict[str, Any] = setting({}, "packed corpus: the 001 card (= [train]'s defaults)")

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

    top_examples: int = setting(16, "reverse index: examples kept per feature")
    context_tokens: int = setting(8, "tokens decoded on each side of an example")
    bootstrap: int = setting(200, "sequence-bootstrap resamples for the AUROC CI; 0 = skip")
    permutations: int = setting(200, "label permutations for the p-value; 0 = skip")
    min_fires: int = setting(5, "features firing fewer times are not tested (no CI, p, q)")
    alpha: float = setting(0.05, 'BH false-discovery rate for "significant"')
    max_tokens: int = setting(1_000_000, "rows analyzed (the first ones in cache order)")
    rows: str = setting(
        "auto", "heldout | train | all; auto = all labeled rows on rollouts (as the 000 card), else heldout"
    )
    report_features: int = setting(24, "top features shown per SAE in the report")
    scheduler: str = setting("", 'dask scheduler address; "" = a LocalCluster')


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


def load_config(
    path: str | Path | None = None, profile: str | None = None, overrides: typing.Iterable[str] = (), **flags: Any
) -> PipelineConfig:
    """pipeline.toml for train (see `cache_format.config.load_sections`)."""
    return load_sections(PipelineConfig, path, profile, overrides, **flags)


# -- recipes: the effective [train] of a cache --------------------------------------------------------
#
# Recipes follow the cache: a rollout cache trains the `000` card's recipe, a corpus cache the
# `001` card's.
#
# The effective `[train]` is built in three layers, each over the one before:
#
# 1. `TrainConfig`'s defaults (the `001` card);
# 2. the recipe's table, `[recipes.rollouts]` or `[recipes.corpus]` in pipeline.toml;
# 3. every key that pipeline.toml's `[train]`, a profile or `--set train.KEY=...` set.
#
# `train.recipe = "auto"` picks by the cache's recorded source: `supergpqa` → rollouts, corpus
# or an imported dump (no source) → corpus; `none` skips the recipe. Setting `training_tokens`
# yourself without `epochs` clears the recipe's epoch count, so the budget you typed is the one
# trained.


CARDS = {"rollouts": "the 000 card", "corpus": "the 001 card", "none": "no recipe"}
SOURCE_RECIPE = {"supergpqa": "rollouts", "corpus": "corpus"}


def recipe_for(cfg: PipelineConfig, cache_meta: dict) -> str:
    """The recipe name `train.recipe` asks for, resolving `auto` by the cache's source."""
    name = cfg.train.recipe
    if name == "auto":
        source = (cache_meta.get("source") or {}).get("name", "")
        return SOURCE_RECIPE.get(source, "corpus")
    return name  # one of RECIPES or "none" (TrainConfig checks it)


def resolve(cfg: PipelineConfig, cache_meta: dict) -> tuple[TrainConfig, str]:
    """The `[train]` this cache trains with, and the recipe's name."""
    name = recipe_for(cfg, cache_meta)
    merged = {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)}
    if name != "none":
        merged.update(getattr(cfg.recipes, name))
    explicit = {k: getattr(cfg.train, k) for k in cfg.train_keys_set}
    if "training_tokens" in explicit and "epochs" not in explicit:
        merged["epochs"] = 0.0
    merged.update(explicit)
    merged["recipe"] = name
    merged["sweep"] = [
        {k: v for k, v in dataclasses.asdict(s).items() if v is not None} if dataclasses.is_dataclass(s) else s
        for s in merged["sweep"]
    ]
    tc = build_section(TrainConfig, merged, "train", fix=lambda key: f"fix [recipes.{name}] or use --set {key}=VALUE")
    tc.saes(explicit)  # the kinds' keys, checked on the effective config before any work
    return tc, name
