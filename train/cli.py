"""`python -m train ...`: run, config, eval, analyze, report and browse, on the shared config flags."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click

from cache_format.commandline import config_options, parse_layers
from cache_format.errors import UserError

from .config import PipelineConfig, load_config


@click.group()
def cli():
    """Train TopK SAEs from an activation cache, without the base model."""


@cli.command("run")
@config_options
@click.option("--out", default=None, metavar="DIR", help="Output directory (default: [train].out).")
@click.option("--fresh", is_flag=True, help="Replace a different or finished run in OUT instead of refusing.")
@click.option("--json", "as_json", is_flag=True, help="Print run.json on stdout when done.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def run_cmd(config_path, profile, cache, layers, overrides, out, fresh, as_json, no_progress):
    """Train every requested SAE in one pass over the cache (resumes a killed run)."""
    from .run import Run

    cfg = load_config(config_path, profile, overrides)
    tc = cfg.train
    url = cache or tc.cache or cfg.harvest.cache
    chosen = parse_layers(layers)
    run = Run(cfg, url, chosen, out or tc.out, fresh=fresh, progress=not no_progress)
    result = run.execute()
    if as_json and run.rank == 0:
        click.echo(json.dumps(result, indent=2, sort_keys=True))


@cli.command("config")
@config_options
@click.option("--out", default=None, metavar="DIR", help="Output directory (default: [train].out).")
def config_cmd(config_path, profile, cache, layers, overrides, out):
    """Print the effective configuration as TOML, each key under its doc (the flags as for `run`).

    The recipe (`[recipes.*]`) applies under the [train] keys set here when a run opens its
    cache: `train.recipe = "auto"` picks it by the cache's source."""
    from cache_format.config import render_toml

    cfg = load_config(config_path, profile, overrides)
    if cache:
        cfg.train.cache = cache
    if layers:
        cfg.train.layers = parse_layers(layers)
    if out:
        cfg.train.out = out
    click.echo(render_toml(cfg, ["train", "recipes", "analysis", "harvest"]), nl=False)


# -- after training: eval, analyze, report, browse ---------------------------------------------

_shared = config_options(layers=False, cache_help="Cache location (default: the SAE's, else [harvest].cache).")
_report_flags = config_options(
    layers=False, cache_help="Cache whose source shares and fingerprint the provenance shows (default: the run's)."
)


def split_for(sae, cfg: PipelineConfig, url: str, rows: str = "heldout"):
    """The SAE's recorded split; roles from it, else [train].roles, else the loader's default.

    `rows` picks the side: heldout, train or all; `auto` is every labeled row on a rollout
    cache (the 000 card's AUROC ran over all its 200k tokens) and the held-out rows otherwise.
    """
    import cache_format as cf
    from cache_format.layout import role_codes
    from cache_format.split import Split

    from .analysis.scan import ROW_SETS, RowSelection
    from .loader_plan import default_roles

    if rows not in (*ROW_SETS, "auto"):
        raise UserError(f"--rows {rows!r}: use heldout, train, all or auto")
    split = RowSelection.of(sae, Split(cfg.train.split_seed, cfg.train.heldout_fraction))
    cache_roles = None
    if split.roles is None or rows == "auto":
        cache_roles = default_roles(cf.open_cache(url))
    if split.roles is None:
        split.roles = role_codes(cfg.train.roles) if cfg.train.roles else cache_roles
    rollouts = cache_roles is not None
    split.rows = ("all" if rollouts else "heldout") if rows == "auto" else rows
    split.labeled = rows == "auto" and rollouts
    return split


def _sae_options(cmd):
    """--layer, --k, --scheduler and --quiet: how commands that scan a cache with an SAE are pointed."""
    for opt in reversed(
        [
            click.option("--layer", type=int, default=None, help="Cache layer (default: the SAE's own)."),
            click.option(
                "--k", type=int, default=None, help="k for the TopK (default: from the file, its config or its name)."
            ),
            click.option(
                "--scheduler", default=None, metavar="ADDRESS", help="dask scheduler (default: a LocalCluster)."
            ),
            click.option("--quiet", is_flag=True, help="No progress bars."),
        ]
    ):
        cmd = opt(cmd)
    return cmd


def _where(sae, cfg: PipelineConfig, cache: str | None, layer: int | None, path, rows: str = "heldout"):
    """(cache url, layer, split) an SAE is scanned on: the options, else what the SAE recorded."""
    from .published import recorded_cache, recorded_layer

    url = recorded_cache(sae, cache, cfg.train.cache or cfg.harvest.cache)
    return url, recorded_layer(sae, layer, path), split_for(sae, cfg, url, rows)


def _quiet_dask() -> None:
    import logging

    for name in ("distributed", "distributed.scheduler", "distributed.worker", "distributed.core"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _fmt_metrics(m: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


# ---------------------------------------------------------------------------------------


@click.command("eval", help="Reconstruction metrics of any supported SAE on a cache's held-out rows.")
@_shared
@click.option(
    "--sae",
    "sae_path",
    required=True,
    metavar="PATH",
    help="SAE file or directory (000/001/003/004 layouts, or an export).",
)
@_sae_options
@click.option("--max-tokens", type=int, default=None, help="Held-out rows to evaluate (default [analysis].max_tokens).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON on stdout.")
def eval_cmd(config_path, profile, cache, overrides, sae_path, layer, k, max_tokens, scheduler, as_json, quiet):
    from .analysis.scan import scan
    from .metrics import METRIC_NAMES
    from .published import load_sae

    cfg = load_config(config_path, profile, overrides)
    sae = load_sae(sae_path, k=k, layer=layer)
    url, layer, split = _where(sae, cfg, cache, layer, sae_path)
    _quiet_dask()
    res = scan(
        url,
        sae,
        layer,
        split,
        max_tokens=max_tokens or cfg.analysis.max_tokens,
        want_codes=False,
        scheduler=scheduler or cfg.analysis.scheduler or None,
        progress=not quiet,
        device=cfg.train.device,
    )
    if res.metrics.n == 0:
        raise UserError(
            f"no held-out rows of layer {layer} in {url} "
            f"(split seed {split.seed}, fraction {split.fraction}); "
            "use a larger cache or --set train.heldout_fraction=0.1"
        )
    metrics = res.metrics.compute()
    import cache_format as cf

    recorded = (sae.cfg or {}).get("layer_fingerprint")
    fp = cf.open_cache(url).layer_fingerprint(layer)
    out = {
        **metrics,
        "layer": layer,
        "architecture": sae.architecture,
        "k": getattr(sae, "k", None),
        "d_sae": sae.d_sae,
        "d_in": sae.d_in,
        "layout": sae.cfg.get("layout"),
        "cache": url,
        "split": {"seed": split.seed, "fraction": split.fraction, "roles": list(split.roles) if split.roles else None},
        "layer_fingerprint": fp,
        "same_data_as_training": (recorded == fp) if recorded else None,
    }
    if as_json:
        click.echo(json.dumps({k2: (None if isinstance(v, float) and math.isnan(v) else v) for k2, v in out.items()}))
    else:
        click.echo(
            f"{sae_path} @ layer {layer} ({out['layout']}, {sae.architecture}, d_sae {sae.d_sae}"
            + (f", k {sae.k}" if hasattr(sae, "k") else "")
            + "), "
            f"{metrics['tokens']} held-out rows of {url}:"
        )
        click.echo("  " + _fmt_metrics({m: metrics[m] for m in METRIC_NAMES}))


@click.command(
    "analyze",
    help="Feature statistics, correctness AUROC, the reverse index, profiles and decoder neighbours "
    "for a run's SAEs (or one --sae).",
)
@_shared
@click.option(
    "--out",
    "out_dir",
    default=None,
    metavar="DIR",
    help="Training run directory (default [train].out); with --sae, where to write.",
)
@click.option("--sae", "sae_path", default=None, metavar="PATH", help="Analyze this one SAE instead of a run's.")
@_sae_options
@click.option(
    "--rows",
    type=click.Choice(["auto", "heldout", "train", "all"]),
    default=None,
    help="Rows to analyze (default [analysis].rows; auto = every labeled row on rollouts, else held-out).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summaries as JSON on stdout.")
def analyze_cmd(config_path, profile, cache, overrides, out_dir, sae_path, layer, k, scheduler, rows, as_json, quiet):
    from .analysis.features import analyze, write_neighbours
    from .analysis.scan import analysis_client
    from .published import load_sae

    cfg = load_config(config_path, profile, overrides)
    if sae_path:
        sae0 = load_sae(sae_path, k=k, layer=layer)
        target = Path(out_dir) if out_dir else (Path(sae_path) if Path(sae_path).is_dir() else Path(sae_path).parent)
        jobs = [(Path(sae_path).name, Path(sae_path), target, sae0)]
    else:
        from .outdir import run_saes

        jobs = [(s["name"], s["dir"], s["dir"], None) for s in run_saes(Path(out_dir or cfg.train.out))]
    _quiet_dask()
    summaries = {}
    analyzed = {}
    with analysis_client(scheduler or cfg.analysis.scheduler or None) as client:
        for name, src, dst, sae in jobs:
            sae = sae or load_sae(src, k=k)
            analyzed[name] = (sae, dst)
            url, lay, split = _where(sae, cfg, cache, layer, src, rows or cfg.analysis.rows)
            res = analyze(
                sae, url, lay, dst, cfg.analysis, split, client=client, progress=not quiet, device=cfg.train.device
            )
            summaries[name] = res["summary"]
            if not as_json:
                s = res["summary"]
                extra = (
                    f", max AUROC {s['max_auroc']:.3f}, {s['significant_features']} significant "
                    f"(BH q ≤ {cfg.analysis.alpha})"
                    if s.get("max_auroc") is not None
                    else ""
                )
                print(
                    f"analyze {name}: {s['tokens']} {split.describe()}, {s['alive']}/{sae.d_sae} alive{extra} → {dst}",
                    file=sys.stderr,
                )
    write_neighbours(analyzed, device=cfg.train.device)
    if not quiet:
        print(f"analyze: decoder neighbours of {len(analyzed)} SAE(s) → feature_neighbours.parquet", file=sys.stderr)
    if as_json:
        click.echo(json.dumps(summaries))


@click.command("report", help="Write OUT/report.html: one self-contained page for a training run.")
@_report_flags
@click.option("--out", "out_dir", default=None, metavar="DIR", help="Training run directory (default [train].out).")
@click.option("--html", "html_path", default=None, metavar="FILE", help="Where to write (default OUT/report.html).")
def report_cmd(config_path, profile, cache, overrides, out_dir, html_path):
    from .analysis.report import render_report

    cfg = load_config(config_path, profile, overrides)
    path = render_report(
        Path(out_dir or cfg.train.out), html_path, n_features=cfg.analysis.report_features, cache=cache
    )
    print(f"report: {path}", file=sys.stderr)
    click.echo(str(path))


from .analysis.browse import browse_cmd  # noqa: E402  (its module is the browser's; the command joins the group)

for _command in (eval_cmd, analyze_cmd, report_cmd, browse_cmd):
    cli.add_command(_command)
