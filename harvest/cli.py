"""The harvest command line: `python -m harvest run --layers 11,31,55 [--source ...]`."""

from __future__ import annotations

import json
import sys

import click

from cache_format.config import config_options, parse_layers
from cache_format.errors import run_cli

from .config import load_config


@click.group(help="Capture residual-stream activations of the base model into an activation cache.")
def cli() -> None:
    pass


@cli.command(help="Harvest SuperGPQA rollouts or packed corpus text into --cache (resumes what is there).")
@config_options
@click.option("--source", default=None, help="supergpqa | corpus")
@click.option("--tokens", type=int, default=None, help="Corpus rows to reach (stops at the first whole sequence).")
@click.option("--questions", type=int, default=None, help="SuperGPQA questions to roll out.")
@click.option("--workers", type=int, default=None, help="Fan out to N dask workers (one per GPU).")
@click.option("--scheduler", default=None, metavar="ADDRESS", help="Use an existing dask scheduler.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(config_path, profile, cache, layers, overrides, source, tokens, questions, workers, scheduler, as_json, quiet):
    from .run import run as do_run

    cfg = load_config(
        config_path,
        profile,
        overrides,
        **{
            "harvest.cache": cache,
            "harvest.layers": parse_layers(layers),
            "harvest.source": source,
            "corpus.tokens": tokens,
            "supergpqa.questions": questions,
            "harvest.workers": workers,
            "harvest.scheduler": scheduler,
        },
    )
    log = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr))
    summary = do_run(cfg, progress=not quiet, log=log)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        print(
            f"harvest: {summary['n_tokens']} rows, layers {summary['layers']}, {summary['segments']} segments "
            f"in {summary['cache']} ({summary['seconds']}s)",
            file=sys.stderr,
        )
        if "outcomes" in summary:
            o = summary["outcomes"]
            print(
                f"harvest: {o['rollouts']} rollouts, {o['correct']} correct; no answer in {o['thinking_unclosed']} "
                f"(thinking never closed) + {o['no_answer']} (closed, no answer found); {o['forced']} forced",
                file=sys.stderr,
            )


def _register_splice() -> None:
    from .splice import loss_recovered_cmd

    cli.add_command(loss_recovered_cmd)


_register_splice()


def main() -> None:
    run_cli(cli, "python -m harvest", "interrupted: committed segments are kept; re-run to resume")
