"""`python -m train ...`: the click group. `run` trains; other commands (eval, analyze, report)
are added to the same group by train.analysis_cli."""

from __future__ import annotations

import importlib
import json

import click

from cache_format.commandline import config_options, parse_layers

from .config import load_config


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


def _register_extras() -> None:
    """Commands that live in other modules of train (eval, analyze, report) join this group."""
    name = f"{__package__}.analysis_cli"
    try:
        analysis_cli = importlib.import_module(name)
    except ModuleNotFoundError as e:  # that module absent (by the error's type and name), not a failure inside it
        if e.name != name:
            raise
        return
    analysis_cli.register(cli)


_register_extras()
