"""Recipes follow the cache: a rollout cache trains the `000` card's recipe, a corpus cache the
`001` card's.

The effective `[train]` is built in three layers, each over the one before:

1. `TrainConfig`'s defaults (the `001` card);
2. the recipe's table, `[recipes.rollouts]` or `[recipes.corpus]` in pipeline.toml;
3. every key that pipeline.toml's `[train]`, a profile or `--set train.KEY=...` set.

`train.recipe = "auto"` picks by the cache's recorded source: `supergpqa` → rollouts, corpus
or an imported dump (no source) → corpus; `none` skips the recipe. Setting `training_tokens`
yourself without `epochs` clears the recipe's epoch count, so the budget you typed is the one
trained.
"""

from __future__ import annotations

import dataclasses
import math

from cache_format.config import build_section

from .config import KIND_KEYS, PipelineConfig, TrainConfig

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
