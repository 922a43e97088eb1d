"""`python -m cache_format info|verify|gc|stats|sync|retract|publish|card|import|upgrade`."""

from __future__ import annotations

import json

import click
import numpy as np

from . import open_cache, ops
from .commandline import parse_layers, run_cli
from .errors import CacheError, UserError
from .stores import Location
from .write import DEFAULT_CHUNK_TOKENS, DEFAULT_CODEC


def _options(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        out = json.loads(text)
    except ValueError as e:
        raise UserError(f'--storage-options: not valid JSON ({e}); e.g. \'{{"endpoint_url": "http://..."}}\'') from None
    if not isinstance(out, dict):
        raise UserError("--storage-options must be a JSON object")
    return out


so_option = click.option(
    "--storage-options",
    "-o",
    "storage_options",
    default=None,
    metavar="JSON",
    help="fsspec storage options for the URL (e.g. an S3 endpoint_url).",
)


@click.group()
def cli():
    """Inspect, check, share and maintain activation caches. Add --debug for tracebacks."""


@cli.command()
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@so_option
def info(url, as_json, storage_options):
    """What a cache holds: layers, rows, segments, fingerprints, provenance."""
    c = open_cache(url, storage_options=_options(storage_options))
    d = ops.info(c)
    if as_json:
        click.echo(json.dumps(d, indent=2, sort_keys=True))
        return
    model = d["meta"].get("model", {})
    click.echo(f"cache        {d['url']}")
    click.echo(f"fingerprint  {d['fingerprint']}")
    if model:
        click.echo(f"model        {model.get('name_or_path', '?')} ({model.get('dtype', '?')})")
    if d["copy_of"]:
        sel = d["copy_of"]
        segs = "every segment" if sel["segments"] is None else f"{len(sel['segments'])} segments"
        click.echo(f"copy of      {sel['url']} (root {sel['root'][:12]}): layers {sel['layers']}, {segs}")
    click.echo(
        f"hook         {d['hook']}   d_model {d['d_model']}   codec {d['codec']}   "
        f"chunk {d['chunk_tokens']} rows   shard {d['shard_rows']} rows"
    )
    click.echo(
        f"rows         {d['n_tokens']:,} in {d['n_segments']} segments"
        + (f" ({len(d['retracted'])} retracted)" if d["retracted"] else "")
    )
    if d["rows_by_source"]:
        total = sum(d["rows_by_source"].values())
        sources = d["meta"].get("source", {}).get("sources", [])
        weights = {s.get("name") or s.get("path"): s.get("weight") for s in sources}
        wsum = sum(w for w in weights.values() if w) or 1
        click.echo(
            "sources      "
            + "   ".join(
                f"{name} {n / total:.1%}" + (f" (weight {weights[name] / wsum:.0%})" if weights.get(name) else "")
                for name, n in sorted(d["rows_by_source"].items(), key=lambda kv: -kv[1])
            )
            + "  of rows"
        )
    for L, e in d["declared_layers"].items():
        state = "complete" if e["complete"] else f"backfill pending: {e['segments']}/{d['n_segments']} segments"
        ratio = f"   {e['ratio_vs_raw_bf16']:.3f}× raw bf16" if e["ratio_vs_raw_bf16"] is not None else ""
        fp = d["layer_fingerprints"].get(L, "")[:16]
        click.echo(f"layer {L:>4}   {state}   {e['stored_bytes'] / 2**20:,.1f} MiB{ratio}   {fp}")


@cli.command()
@click.argument("url")
@click.option("--threads", default=4, show_default=True)
@so_option
def verify(url, threads, storage_options):
    """Re-hash every object against the committed manifests and look for rows held twice;
    non-zero exit names each problem."""
    c = open_cache(url, storage_options=_options(storage_options))
    n, bad = ops.verify(c, threads)
    for key, why in bad:
        click.echo(f"BAD {key}: {why}")
    if bad:
        objects = [b for b in bad if "/" in b[0]]  # object keys hold a '/'; duplicates name segments
        what = f"{len(objects)} of {n} objects are bad" if objects else f"{len(bad)} duplicates found"
        raise CacheError(
            f"verify: {what} (first: {bad[0][0]}: {bad[0][1]})"
            + ("; retract the affected segment or re-sync it from a good copy" if objects else "")
        )
    click.echo(f"ok: {n} objects in {len(c.segments)} segments match their checksums; no row is held twice")


@cli.command()
@click.argument("url")
@click.option("--older-than", default="24h", show_default=True, help="Grace period (s, m, h, d).")
@click.option("--retracted", is_flag=True, help="Also delete the data of retracted segments.")
@click.option("--dry-run", is_flag=True)
@click.option("--force", is_flag=True, help="Allow --older-than below 1h (leased segments are still kept).")
@so_option
def gc(url, older_than, retracted, dry_run, force, storage_options):
    """Remove uncommitted leftovers of crashed writers older than the grace period (never leased ones)."""
    loc = Location(url, _options(storage_options))
    doomed = ops.gc(loc, ops.parse_age(older_than), retracted=retracted, dry_run=dry_run, force=force)
    click.echo(f"{'would remove' if dry_run else 'removed'} {len(doomed)} objects")


@cli.command()
@click.argument("url")
@click.option("--layers", default=None, help="Comma-separated layers (default: all).")
@click.option("--scheduler", default=None, metavar="ADDRESS", help="A dask scheduler (default: local threads).")
@click.option("--json", "as_json", is_flag=True)
@so_option
def stats(url, layers, scheduler, as_json, storage_options):
    """Per-layer mean/std/norm recomputed from the shards with dask (one task per shard)."""

    so = _options(storage_options)
    c = open_cache(url, storage_options=so)
    res = ops.dask_stats(c, parse_layers(layers), scheduler, so)
    out = {}
    for L, s in res.items():
        stored = c.stats(L)
        out[str(L)] = {
            "count": s["count"],
            "mean_norm": s["mean_norm"],
            "mean_abs_mean": float(np.abs(s["mean"]).mean()),
            "mean_std": float(s["std"].mean()),
            "max_std": float(s["std"].max()),
            "max_abs_diff_vs_committed_mean": float(np.abs(s["mean"] - stored["mean"]).max()),
        }
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for L, s in out.items():
        click.echo(
            f"layer {L:>4}  rows {s['count']:,}  mean‖x‖ {s['mean_norm']:.4g}  mean|μ| {s['mean_abs_mean']:.4g}"
            f"  mean σ {s['mean_std']:.4g}  max σ {s['max_std']:.4g}"
        )


@cli.command()
@click.argument("src")
@click.argument("dst")
@so_option
@click.option(
    "--dst-options", default=None, metavar="JSON", help="Storage options for DST (default: --storage-options)."
)
@click.option("--layers", default=None, metavar="L[,L…]", help="Copy only these layers (a partial copy).")
@click.option("--segments", default=None, metavar="A:B", help="Copy only SRC's segments A..B-1, in commit order.")
@click.option("--tokens", type=int, default=None, metavar="N", help="Copy SRC's first segments, until N rows.")
@click.option("--dry-run", is_flag=True, help="Print the objects and bytes it would copy, per layer; copy nothing.")
@click.option("--threads", default=4, show_default=True, help="Objects copied at once.")
def sync(src, dst, storage_options, dst_options, layers, segments, tokens, dry_run, threads):
    """Copy the committed segments DST lacks from SRC, verifying every checksum.

    With --layers, --segments or --tokens, DST becomes a partial copy of SRC (a new location,
    or a partial copy of SRC that this widens)."""

    so = _options(storage_options)
    dso = _options(dst_options) if dst_options else so
    from .sync import sync as run_sync

    r = run_sync(
        src,
        dst,
        so,
        dso,
        layers=parse_layers(layers),
        segments=segments,
        tokens=tokens,
        dry_run=dry_run,
        threads=threads,
    )
    if dry_run:
        for part, v in r["plan"].items():
            name = f"layer {part}" if part.isdigit() else part
            click.echo(f"{name:<12} {v['objects']:>7,} objects  {v['bytes'] / 2**20:>12,.1f} MiB")
        click.echo(
            f"would copy {r['segments']} segments and {r['layers']} layers of segments DST has "
            f"({r['bytes'] / 2**20:,.1f} MiB); nothing was copied"
        )
        return
    c = open_cache(dst, storage_options=dso)
    click.echo(
        f"copied {r['segments']} segments and {r['layers']} layers of segments DST had "
        f"({r['bytes'] / 2**20:,.1f} MiB); {dst} layers {c.layers}, fingerprint {c.fingerprint}"
    )


@cli.command()
@click.argument("url")
@click.argument("segment")
@click.option("--reason", default="", help="Recorded in the tombstone.")
@so_option
def retract(url, segment, reason, storage_options):
    """Hide a bad segment with a tombstone commit (changes the fingerprint)."""
    w = open_cache(url, mode="a", storage_options=_options(storage_options))
    name = w.retract(segment, reason)
    click.echo(f"retracted {segment} (commit {name}); new fingerprint {w.snapshot().fingerprint}")


@cli.command()
@click.argument("url")
@so_option
def publish(url, storage_options):
    """Write index.json so the cache can be read over plain HTTP (re-run after new commits)."""
    loc = Location(url, _options(storage_options))
    open_cache(loc)  # must be a cache
    n = ops.publish(loc)
    click.echo(f"published {n} commits to {url}/index.json")


@cli.command()
@click.argument("url")
@click.option("--repo", default=None, metavar="ORG/NAME", help="The Hub dataset repo (default: from a Hub URL).")
@click.option("--path", "path_in_repo", default=None, help="The cache's folder in the repo (default: its root).")
@click.option("--license", "license_", default="other", show_default=True, help="The card's license field.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the card here (default: stdout).")
@so_option
def card(url, repo, path_in_repo, license_, out, storage_options):
    """A Hub dataset card (README.md) from the cache's provenance, for `hf upload-large-folder`."""
    from .stores.local import write_atomic

    text = ops.card(open_cache(url, storage_options=_options(storage_options)), repo, path_in_repo, license_)
    if out is None:
        click.echo(text, nl=False)
        return
    write_atomic(out, text)
    click.echo(f"wrote {out}", err=True)


@cli.command("import")
@click.argument("sources", nargs=-1, required=True)
@click.option("--to", "url", required=True, help="The cache to create (or append a segment to).")
@click.option("--map", "maps", multiple=True, metavar="KEY=LAYER", help="Which dump key is which layer.")
@click.option("--layer", type=int, default=None, help="Layer of a single .npy array.")
@click.option("--labels", default=None, help=".npy of per-row labels (1 correct, 0 wrong, -1 none; bools ok).")
@click.option("--tokens", default=None, help=".npy of per-row token ids (default: -1, unknown).")
@click.option("--seq-ids", default=None, help=".npy of per-row sequence ids (default: made up, see --seq-len).")
@click.option("--seq-len", default=1024, show_default=True, help="Rows per made-up sequence when --seq-ids is absent.")
@click.option("--model", default=None, help="Recorded as meta.model.name_or_path.")
@click.option("--codec", default=DEFAULT_CODEC, show_default=True)
@click.option("--chunk-tokens", default=DEFAULT_CHUNK_TOKENS, show_default=True)
@click.option("--again", is_flag=True, help="Append a second copy of a dump this cache already holds.")
@so_option
def import_(
    sources, url, maps, layer, labels, tokens, seq_ids, seq_len, model, codec, chunk_tokens, again, storage_options
):
    """Turn an activation dump (safetensors or .npy) into a cache; the same import twice is a no-op."""
    mapping = {}
    for m in maps:
        k, _, v = m.partition("=")
        if not v.strip().lstrip("-").isdigit():
            raise UserError(f"--map {m!r}: expected KEY=LAYER, e.g. --map acts_L11=11")
        mapping[k] = int(v)
    meta = {"model": {"name_or_path": model}} if model else {}
    from .importer import import_dump

    r = import_dump(
        list(sources),
        url,
        mapping,
        layer,
        labels,
        tokens,
        seq_ids,
        seq_len,
        meta,
        _options(storage_options),
        codec,
        chunk_tokens,
        again,
    )
    if "already" in r:
        click.echo(
            f"already imported: {url} holds this dump as segment {r['already']} ({r['rows']:,} rows, "
            f"commit {r['commit']}); nothing was written (pass --again to append a second copy)"
        )
        return
    click.echo(
        f"imported {r['rows']:,} rows × {r['d_model']} at layers {r['layers']} "
        f"({r['conversion'] or 'bf16, lossless'})" + ("; sequence ids made up" if r["made_up_seq_ids"] else "")
    )


@cli.command()
@click.argument("url")
@so_option
def upgrade(url, storage_options):
    """Add chunk digests and a chained log to a cache written by format 1 (nothing is rewritten)."""
    r = ops.upgrade(Location(url, _options(storage_options)))
    if r["commit"] is None:
        click.echo(f"{url} is up to date: every chunk has a digest and every record is chained")
        return
    click.echo(
        f"upgraded {url}: chunk digests for {r['objects']} shard objects, {r['records']} format-1 records "
        f"pinned (commit {r['commit']})"
    )


def main() -> None:
    run_cli(cli, "python -m cache_format", "interrupted: what was committed is kept")


if __name__ == "__main__":
    main()
