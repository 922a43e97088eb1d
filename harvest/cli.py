"""The harvest command line, on the shared config flags: `python -m harvest run --layers
11,31,55 [--source ...]`, `loss-recovered` and `logit-effects` (splice.py), and
`detect-gpu` (what `make install` asks before adding the fast DeltaNet kernels), and `config`
(the configuration `run` would use, as TOML with each key's doc)."""

from __future__ import annotations

import json
import sys

import click

from cache_format.commandline import config_options, parse_layers, run_cli
from cache_format.config import doc_of, render_toml
from cache_format.errors import UserError

from .config import PipelineConfig, load_config


@click.group(help="Capture residual-stream activations of the base model into an activation cache.")
def cli() -> None:
    pass


def _doc(key: str) -> str:
    """The schema's one-line doc of `key`, as a flag's help (written once, in harvest/config.py)."""
    doc = doc_of(PipelineConfig, key)
    return doc + "."


def run_flags(f):
    """The flags of `run`, which `config` takes too: it prints what `run` with them would use."""
    f = click.option("--scheduler", default=None, metavar="ADDRESS", help=_doc("harvest.scheduler"))(f)
    f = click.option("--workers", type=int, default=None, help=_doc("harvest.workers"))(f)
    f = click.option("--questions", type=int, default=None, help=_doc("supergpqa.questions"))(f)
    f = click.option("--tokens", type=int, default=None, help=_doc("corpus.tokens"))(f)
    f = click.option("--source", default=None, help=_doc("harvest.source"))(f)
    return config_options(f)


def load_run_config(config_path, profile, cache, layers, overrides, source, tokens, questions, workers, scheduler):
    """The configuration `run` uses: pipeline.toml, the profile, --set, then the flags."""
    return load_config(
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


@cli.command(help="Harvest SuperGPQA rollouts or packed corpus text into --cache (resumes what is there).")
@run_flags
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(config_path, profile, cache, layers, overrides, source, tokens, questions, workers, scheduler, as_json, quiet):
    from .run import run as do_run

    cfg = load_run_config(config_path, profile, cache, layers, overrides, source, tokens, questions, workers, scheduler)
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


@cli.command(
    "loss-recovered",
    help="Splice each SAE of a run (or one --sae) into the model at its layer: "
    "CE clean / with the SAE / zero-ablated, loss recovered, KL.",
)
@config_options(layers=False, cache_help="Cache with the held-out sequences (default: the SAE's).")
@click.option(
    "--out",
    "out_dir",
    default=None,
    metavar="DIR",
    help="Training run directory (default [train].out); with --sae, where to write loss_recovered.json.",
)
@click.option(
    "--sae", "sae_path", default=None, metavar="PATH", help="One SAE (any supported layout) instead of a run's."
)
@click.option("--layer", type=int, default=None, help="Decoder layer to splice at (default: the SAE's own).")
@click.option("--k", type=int, default=None, help="k for the TopK (default: from the SAE).")
@click.option(
    "--sequences", type=int, default=None, help="Held-out sequences to use (default [analysis].loss_sequences)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def loss_recovered_cmd(config_path, profile, cache, overrides, out_dir, sae_path, layer, k, sequences, as_json, quiet):
    import cache_format as cf
    from cache_format.split import Split
    from cache_format.stores.local import write_atomic
    from train.published import load_sae, recorded_cache, recorded_layer

    from .model import load_model
    from .splice import check_model_matches_cache, heldout_sequences, loss_recovered, sae_targets

    cfg = load_config(config_path, profile, overrides)
    targets = sae_targets(cfg, sae_path, out_dir)
    lm = None
    results = {}
    for name, src, dst in targets:
        sae = load_sae(src, k=k, layer=layer)
        url = recorded_cache(sae, cache, cfg.train.cache or cfg.harvest.cache)
        c = cf.open_cache(url)
        lay = recorded_layer(sae, layer, src)
        check_model_matches_cache(cfg.model.name_or_path, c)
        if lm is None:
            lm = load_model(cfg.model)
        lm.check_layers([lay])
        if lm.d_model != sae.d_in:
            raise UserError(f"{src}: the SAE takes d_in={sae.d_in} but the model's hidden size is {lm.d_model}")
        split = Split.from_record((sae.cfg or {}).get("split"), Split(cfg.train.split_seed, cfg.train.heldout_fraction))
        seed, fraction = split.seed, split.fraction
        seqs = heldout_sequences(c, seed, fraction, sequences or cfg.analysis.loss_sequences)
        res = loss_recovered(
            lm.model, lm.layers[lay], sae, seqs, batch_size=cfg.analysis.loss_batch_size, progress=not quiet
        )
        res.update(
            layer=lay,
            cache=url,
            model=cfg.model.name_or_path,
            sae=str(src),
            split={"seed": seed, "fraction": fraction},
        )
        results[name] = res
        if dst is not None:
            dst.mkdir(parents=True, exist_ok=True)
            write_atomic(dst / "loss_recovered.json", json.dumps(res, indent=2, default=str))
        if not as_json:
            print(
                f"loss-recovered {name} @ layer {lay}: CE clean {res['ce_clean']:.4f}, SAE {res['ce_sae']:.4f}, "
                f"zero {res['ce_zero']:.4f} → loss recovered {res['loss_recovered']:.4f}, KL {res['kl_sae']:.4g} "
                f"({res['tokens']} tokens)",
                file=sys.stderr,
            )
    if as_json:
        click.echo(json.dumps(results, default=str))


@cli.command(
    "logit-effects",
    help="Each SAE feature's promoted and suppressed output tokens (decoder row → final norm → "
    "unembedding), stored as <sae>/logit_effects.parquet for `train browse`.",
)
@config_options(
    layers=False,
    cache_help="A cache the SAEs were trained on: refused if another model harvested it (default: not checked).",
)
@click.option("--out", "out_dir", default=None, metavar="DIR", help="Training run directory (default [train].out).")
@click.option(
    "--sae", "sae_path", default=None, metavar="PATH", help="One SAE (any supported layout) instead of a run's."
)
@click.option("--top", type=int, default=None, help="Tokens kept on each side (default 10).")
@click.option("--chunk", type=int, default=None, help="Features per forward through the head (default 512).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def logit_effects_cmd(config_path, profile, cache, overrides, out_dir, sae_path, top, chunk, quiet):
    from pathlib import Path

    from tqdm import tqdm

    from train.published import load_sae

    from .model import load_model
    from .splice import (
        FEATURE_CHUNK,
        LOGIT_EFFECTS_FILE,
        LOGIT_TOP,
        check_model_matches_cache,
        final_norm_and_head,
        logit_effects,
        sae_targets,
        write_logit_effects,
    )

    cfg = load_config(config_path, profile, overrides)
    saes = [(name, load_sae(src), src, dst) for name, src, dst in sae_targets(cfg, sae_path, out_dir)]
    if cache:  # the decoder rows mean something only through the model whose residuals they were trained on
        import cache_format as cf

        check_model_matches_cache(cfg.model.name_or_path, cf.open_cache(cache))
    lm = load_model(cfg.model)  # after the SAEs: a bad path fails before the model loads
    norm, head = final_norm_and_head(lm.model, lm.layers_path)
    names: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in names:
            names[i] = lm.tokenizer.decode([i], skip_special_tokens=False)
        return names[i]

    for name, sae, src, dst in saes:
        if sae.d_in != lm.d_model:
            raise UserError(f"{src}: the SAE takes d_in={sae.d_in} but the model's hidden size is {lm.d_model}")
        dst = Path(dst if dst is not None else (src if Path(src).is_dir() else Path(src).parent))
        with tqdm(total=sae.d_sae, unit="feat", desc=f"logits {name}", disable=quiet, dynamic_ncols=True) as bar:
            cols = logit_effects(
                norm, head, sae.W_dec.detach(), decode, top or LOGIT_TOP, chunk or FEATURE_CHUNK, progress=bar
            )
        write_logit_effects(dst / LOGIT_EFFECTS_FILE, cols)
        print(f"logit-effects {name}: {sae.d_sae} features → {dst / LOGIT_EFFECTS_FILE}", file=sys.stderr)


@cli.command("detect-gpu", help="Print cuda or cpu: whether this machine has a CUDA GPU (ACTCACHE_CUDA=1|0 overrides).")
def detect_gpu() -> None:
    from .model import cuda_present

    click.echo("cuda" if cuda_present() else "cpu")


@cli.command(
    "config",
    help="Print the configuration `run` would use (pipeline.toml, --profile, --set and the flags merged) "
    "as TOML, each key under its one-line doc; --config on the output gives the same configuration.",
)
@run_flags
def config_cmd(config_path, profile, cache, layers, overrides, source, tokens, questions, workers, scheduler):
    cfg = load_run_config(config_path, profile, cache, layers, overrides, source, tokens, questions, workers, scheduler)
    click.echo(render_toml(cfg), nl=False)


def main() -> None:
    run_cli(cli, "python -m harvest", "interrupted: committed segments are kept; re-run to resume")
