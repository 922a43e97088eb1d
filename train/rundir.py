"""A training run's directory as a record: run.json written and read in one place, the SAEs it
lists, and what each exported SAE records of its training (layer, cache, held-out split).

Train's analysis and report and harvest's splice read runs through here, so the shape of
run.json and the one-line errors about it have a single home.
"""

from __future__ import annotations

import json
from pathlib import Path

from cache_format.errors import UserError

from .out_files import inside, write_out
from .sae import TopKSAE
from .sae_tensors import SAEFormatError
from .split import is_heldout  # re-exported: harvest's splice reproduces an SAE's split with it

__all__ = [
    "RUN_JSON_VERSION",
    "write_run_json",
    "read_run",
    "run_saes",
    "recorded_split",
    "recorded_layer",
    "recorded_cache",
    "is_heldout",
]

RUN_JSON_VERSION = 1


def write_run_json(out: Path, run: dict) -> None:
    write_out(out / "run.json", json.dumps(dict(run, version=RUN_JSON_VERSION), indent=2, sort_keys=True))


def read_run(run_dir: str | Path, *, need_saes: bool = False) -> tuple[dict, list[dict]]:
    """(run.json, one entry per exported SAE with at least `name` and `dir`); with `need_saes`,
    a run that lists none is one line."""
    run_dir = Path(run_dir)
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        raise UserError(
            f"{run_dir}: no run.json here; run `make train` first or pass --out to a training run directory"
        )
    try:
        run = json.loads(run_json.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{run_json}: not valid JSON ({e}); re-run the export") from None
    items = run.get("saes", run.get("exports")) if isinstance(run, dict) else run
    if isinstance(items, dict):
        items = [dict(v, name=v.get("name", k)) for k, v in items.items()]
    saes = []
    for item in items or []:
        if not isinstance(item, dict):
            continue
        name = item.get("name") or Path(str(item.get("path", ""))).name
        d = inside(run_dir, item.get("path") or item.get("dir") or name, run_json)  # never outside the run
        if not d.exists():
            d = inside(run_dir, name, run_json)
        if d.is_file():
            d = d.parent
        saes.append(dict(item, name=name, dir=d))
    if need_saes and not saes:
        raise UserError(f"{run_dir}/run.json lists no SAEs; re-run `make train`")
    return (run if isinstance(run, dict) else {"saes": run}), saes


def run_saes(run_dir: str | Path) -> list[dict]:
    """The SAE entries of a run's run.json (each with at least `name` and `dir`); none is one line."""
    return read_run(run_dir, need_saes=True)[1]


def recorded_split(sae: TopKSAE, default_seed: int, default_fraction: float) -> tuple[int, float, list | None]:
    """(seed, held-out fraction, roles or None) from the SAE's config, else the defaults.

    Reads this project's export (`split: {seed, fraction, roles}`) and flat
    `split_seed` / `heldout_fraction` keys; published SAEs record none and get the defaults.
    """
    cfg = sae.cfg or {}
    split = cfg.get("split") if isinstance(cfg.get("split"), dict) else {}
    seed = split.get("seed", split.get("split_seed", cfg.get("split_seed", default_seed)))
    fraction = split.get("fraction", split.get("heldout_fraction", cfg.get("heldout_fraction", default_fraction)))
    roles = split.get("roles", cfg.get("roles")) or ((cfg.get("train_config") or {}).get("roles") or None)
    return int(seed), float(fraction), roles


def recorded_layer(sae: TopKSAE, layer: int | None, path) -> int:
    """--layer if given, else the layer the SAE records (config or file name)."""
    if layer is not None:
        return layer
    if isinstance((sae.cfg or {}).get("layer"), int):
        return sae.cfg["layer"]
    raise SAEFormatError(f"{path}: the SAE does not record its layer; pass --layer N")


def recorded_cache(sae: TopKSAE, cache: str | None, fallback: str) -> str:
    """--cache, else the cache the SAE was trained on (if it is still reachable), else `fallback`."""
    if cache:
        return cache
    recorded = (sae.cfg or {}).get("cache")
    if recorded and ("://" in recorded or Path(recorded).exists()):
        return recorded
    return fallback
