"""`card`: a Hugging Face dataset card (README.md) for a cache, written from its own provenance.

What a reader of the Hub page needs to trust and use the activations without opening them:
the model and revision, the hook and layers, rows and sequences, the source, the codec and
stored size, the fingerprints an SAE records, how to load it, and the license. The YAML front
matter is what the Hub reads (license, pretty_name, tags, size_categories, source_datasets);
`viewer: false` because the Hub's dataset viewer cannot read zarr shards.
"""

from __future__ import annotations

import re

from .errors import UserError
from .info import info
from .reader import Cache

_HUB = (
    re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@[^/]+)?(?:/(?P<path>.*))?$"),
    re.compile(r"^https?://[^/]+/datasets/(?P<repo>[^/]+/[^/]+)/resolve/[^/]+(?:/(?P<path>.*))?$"),
)
_SIZES = [(1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (1e6, "100K<n<1M"), (1e7, "1M<n<10M")]
_SIZES += [(1e8, "10M<n<100M"), (1e9, "100M<n<1B"), (1e10, "1B<n<10B"), (1e11, "10B<n<100B"), (1e12, "100B<n<1T")]


def hub_address(url: str) -> tuple[str, str] | None:
    """(repo id, path in the repo) of a Hub cache URL; None for any other URL."""
    for pat in _HUB:
        m = pat.match(url.rstrip("/"))
        if m:
            return m["repo"], m["path"] or ""
    return None


def size_category(n: int) -> str:
    """The Hub's `size_categories` bucket for n rows."""
    return next((name for top, name in _SIZES if n < top), "n>1T")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _source_lines(source: dict) -> tuple[list[str], list[str]]:
    """Table rows describing the source, and the hub datasets it drew from."""
    if not source:
        return ["| source | not recorded |"], []
    name = source.get("name", "?")
    if name == "supergpqa":
        ds = source.get("dataset", "")
        rev = source.get("revision") or "main"
        rows = [f"| source | SuperGPQA rollouts: `{ds}` @ `{rev}`, split `{source.get('split')}`, "]
        rows[0] += f"seed {source.get('seed')} |"
        return rows, [ds] if "/" in ds else []
    if name == "corpus":
        parts, hub = [], []
        for s in source.get("sources", []):
            label = s.get("name") or s.get("path")
            parts.append(f"`{label}` (weight {s.get('weight')})")
            if "/" in str(s.get("path", "")) and not str(s.get("path")).startswith(("/", ".")):
                hub.append(s["path"])
        rows = [f"| source | packed corpus text, {source.get('seq_len')}-token sequences, seed {source.get('seed')}: "]
        rows[0] += ", ".join(parts) + " |"
        return rows, hub
    return [f"| source | `{name}` |"], []


def card(cache: Cache, repo: str | None = None, path: str | None = None, license: str = "other") -> str:
    """The README.md text for `cache` as uploaded to dataset `repo` at `path` (read from a Hub
    URL when the cache was opened from one)."""
    where = hub_address(cache.url)
    if repo is None and where is None:
        raise UserError(
            "card: name the Hub dataset repo the cache will be uploaded to with --repo ORG/NAME "
            "(and --path if it goes in a folder of the repo)"
        )
    repo = repo or where[0]
    path = (path if path is not None else (where[1] if where else "")).strip("/")
    from huggingface_hub import DatasetCard, DatasetCardData

    d = info(cache)
    meta = d["meta"]
    model = meta.get("model", {})
    name = model.get("name_or_path") or "an unrecorded model"
    hook = meta.get("hook", {})
    layers = ", ".join(map(str, d["layers"])) or "none"
    sequences = sum((s.record.get("sequences") or {}).get("count", 0) for s in cache.committed_segments)
    stored = sum(v["stored_bytes"] for v in d["declared_layers"].values())
    source_rows, hub_sources = _source_lines(meta.get("source", {}))
    address = f"hf://datasets/{repo}" + (f"/{path}" if path else "")
    data = DatasetCardData(
        license=license,
        pretty_name=f"{name} activations ({d['hook']}, layers {layers})",
        tags=["activations", "interpretability", "sparse-autoencoders", "residual-stream", "zarr", "actcache"],
        size_categories=[size_category(d["n_tokens"])],
        source_datasets=hub_sources or None,
        viewer=False,
    )
    first = d["layers"][0] if d["layers"] else "LAYER"
    ratios = [v["ratio_vs_raw_bf16"] for v in d["declared_layers"].values() if v["ratio_vs_raw_bf16"]]
    ratio = f" ({sum(ratios) / len(ratios):.2f}× raw bf16)" if ratios else ""
    revision = model.get("revision") or "main"
    commit = f", commit `{model['commit']}`" if model.get("commit") else ""
    prov = meta.get("cache_format", {})
    code = prov.get("code", {})
    lines = [
        f"# {data.pretty_name}",
        "",
        f"Residual-stream activations of `{name}`, one bf16 row per token, in an actcache cache: a zarr v3 "
        "group of sharded, checksummed, append-only segments. Train sparse autoencoders on it without "
        "running the model.",
        "",
        "| | |",
        "|---|---|",
        f"| model | `{name}` @ `{revision}`{commit}, run in {model.get('dtype', '?')} |",
        f"| hook | `{d['hook']}`: {hook.get('meaning', 'see the cache provenance')}"
        + (f" (`{hook['module_path']}`)" if hook.get("module_path") else "")
        + " |",
        f"| layers | {layers} (d_model {d['d_model']}) |",
        f"| tokens | {d['n_tokens']:,} rows in {d['n_segments']} segments |",
        f"| sequences | {sequences:,} |",
        *source_rows,
        f"| storage | {_gib(stored)}{ratio}; codec `{d['codec']}`, chunks of {d['chunk_tokens']:,} rows, "
        f"shards of {d['shard_rows']:,} rows |",
        f"| format | actcache cache format {prov.get('format', {}).get('version', '?')}, written by actcache "
        f"{code.get('version', '?')}" + (f" ({code['git_commit'][:12]})" if code.get("git_commit") else "") + " |",
    ]
    if cache.copy_of:
        sel = cache.copy_of
        segs = "all segments" if sel["segments"] is None else f"{len(sel['segments'])} segments"
        lines.append(
            f"| partial copy | of `{sel['url']}` (root `{sel['root'][:16]}`): layers {sel['layers']}, {segs} |"
        )
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "import cache_format as cf  # actcache",
        "",
        f'c = cf.open_cache("{address}")  # pinned to the commit main names now; add @<commit> to fix one',
        f"x = c.residuals({first})[0:4096]  # torch.bfloat16 (4096, {d['d_model']})",
        "tokens, roles, labels = c.tokens[0:4096], c.roles[0:4096], c.labels[0:4096]",
        "```",
        "",
        f"Train SAEs from it: `python -m train run --cache {address} --out runs/x`. Copy one layer: "
        f"`python -m cache_format sync {address} ./cache --layers {first}`. The same cache is at "
        f"`https://huggingface.co/datasets/{repo}/resolve/main{'/' + path if path else ''}` over plain HTTP.",
        "",
        "## Fingerprints",
        "",
        "Content fingerprints (sha256 over the committed manifests): an SAE trained on a layer records that "
        "layer's, and `python -m cache_format verify` re-hashes every object against the manifests.",
        "",
        "| | fingerprint |",
        "|---|---|",
        f"| cache | `{d['fingerprint']}` |",
        *(f"| layer {L} | `{fp}` |" for L, fp in d["layer_fingerprints"].items()),
        "",
        "## License",
        "",
        f"`{license}`. These activations are derived from `{name}`; its license applies to them too.",
        "",
    ]
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines)))
