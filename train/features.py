"""Feature analysis of a trained SAE on a cache's held-out rows, without the base model.

`analyze` runs the whole analysis and writes `feature_metrics.parquet`, `feature_prompts.parquet`,
`feature_profiles.parquet`, `feature_stats.json` (shaped like the `000_*` card's) and
`analysis.json` (provenance). Its parts:

- `scan.scan`: one streaming pass on dask over the rows `analysis_rows.Split` selects, giving
  sparse codes plus mergeable reconstruction metrics;
- `feature_stats.feature_metrics`: per feature, fire rate, activations and, on rollout caches,
  token- and sequence-level AUROC against correctness with CI, p-value and q-value;
- `examples`: the reverse index, each feature's top-activating rows with decoded token windows
  and the feature's value on every token of each window;
- `feature_profiles`: each feature's activation histogram and fire rate by role and position;
- `analysis_outputs`: the atomic, strict writes of the files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

import cache_format as cf
from cache_format.errors import UserError

from .analysis_outputs import clean, write_json, write_parquet
from .analysis_rows import Split
from .config import AnalysisConfig
from .examples import contexts, top_examples, window_activations
from .feature_profiles import feature_profiles
from .feature_stats import feature_metrics
from .sae import TopKSAE
from .scan import scan

PROMPT_ROW_GROUP = 4096  # 256 features of 16 examples: what the browser reads for one
PROFILE_ROW_GROUP = 2048


def analyze(
    sae: TopKSAE,
    url: str,
    layer: int,
    out_dir: str | Path,
    cfg: AnalysisConfig,
    split: Split,
    *,
    scheduler: str | None = None,
    client=None,
    progress: bool = True,
    device: str | None = "auto",
) -> dict[str, Any]:
    """Scan, compute feature metrics, profiles and the reverse index, write the five files; return
    analysis.json's contents."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = scan(
        url,
        sae,
        layer,
        split,
        max_tokens=cfg.max_tokens,
        scheduler=scheduler,
        client=client,
        progress=progress,
        device=device,
    )
    if len(res.rows) == 0:
        raise UserError(
            f"no {split.describe()} of layer {layer} in {url} (roles {split.roles}); use a larger cache, or --rows all"
        )
    cols = res.columns
    t0 = time.perf_counter()
    fm, summary = feature_metrics(res.idx, res.vals, cols["seq_ids"], cols["labels"], sae.d_sae, cfg, seed=split.seed)
    fm_seconds = time.perf_counter() - t0
    fm["n_examples"] = np.zeros(sae.d_sae, dtype=np.int32)

    ex = top_examples(res.idx, res.vals, cfg.top_examples, groups=cols["seq_ids"])
    np.add.at(fm["n_examples"], ex["feature"], 1)
    r = ex["scan_row"]
    cache = cf.open_cache(res.url)
    ctx = contexts(cache, cols["seq_ids"][r], cols["positions"][r], cols["tokens"][r], cfg.context_tokens)
    lengths = np.fromiter((len(w) for w in ctx["context_token_ids"]), np.int64, len(r))
    starts = cols["positions"][r].astype(np.int64) - np.asarray(ctx["context_focus"], np.int64)
    ctx["context_activations"] = window_activations(
        ex["feature"], cols["seq_ids"][r], starts, lengths, cols, res.idx, res.vals
    )
    prompts = {
        "feature": ex["feature"],
        "rank": ex["rank"],
        "activation": ex["activation"],
        "row": res.rows[r],
        "seq_id": cols["seq_ids"][r],
        "position": cols["positions"][r],
        "token_id": cols["tokens"][r],
        "label": cols["labels"][r],
        "role": cols["roles"][r],
        **ctx,
    }
    profiles, denominators = feature_profiles(res.idx, res.vals, cols["roles"], cols["positions"], sae.d_sae)
    write_parquet(out_dir / "feature_metrics.parquet", fm)
    # sorted by feature, in small row groups: the browser reads one feature's rows
    write_parquet(out_dir / "feature_prompts.parquet", prompts, row_group_size=PROMPT_ROW_GROUP)
    write_parquet(out_dir / "feature_profiles.parquet", profiles, row_group_size=PROFILE_ROW_GROUP)

    recon = res.metrics.compute() if res.metrics.n else {}
    summary.update({"variance_explained": recon.get("variance_explained"), "l0": recon.get("l0")})
    stats = {
        f"L{layer}": clean(
            {
                "layer": layer,
                "n_features": sae.d_sae,
                "architecture": sae.architecture,
                "k": getattr(sae, "k", None),
                "auroc": fm["auroc"].tolist(),
                "fire_rate": fm["fire_rate"].tolist(),
                "direction": fm["direction"].tolist(),
                "q_value": fm["q_value"].tolist(),
                "seq_auroc": fm["seq_auroc"].tolist(),
                "summary": summary,
            }
        )
    }
    write_json(out_dir / "feature_stats.json", stats)
    meta = cache.meta or {}
    analysis = clean(
        {
            "summary": summary,
            "layer": layer,
            "cache": res.url,
            "cache_fingerprint": cache.fingerprint,
            "layer_fingerprint": cache.layer_fingerprint(layer),
            "sae_fingerprint": (sae.cfg or {}).get("layer_fingerprint") or (sae.cfg or {}).get("fingerprint"),
            "sae_layout": (sae.cfg or {}).get("layout"),
            "sae_source": (sae.cfg or {}).get("source_path"),
            "split": split.as_dict(),
            "rows": split.describe(),
            "reconstruction": recon,
            "rows_scanned": res.scanned,
            "chunks": res.chunks,
            "scan_seconds": res.seconds,
            "stats_seconds": fm_seconds,
            "profiles": denominators,
            "analysis_config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
            "model": meta.get("model"),
            "source": meta.get("source"),
            "hook": meta.get("hook"),
        }
    )
    write_json(out_dir / "analysis.json", analysis)
    return analysis


def write_neighbours(saes: dict[str, tuple[TopKSAE, Path]], device: str | None = "auto") -> None:
    """`feature_neighbours.parquet` in each SAE's directory: its decoder-cosine neighbours in
    its own SAE and the best matches in the others (`neighbours.decoder_neighbours`)."""
    from . import dist
    from .neighbours import decoder_neighbours

    found = decoder_neighbours({n: sae.W_dec for n, (sae, _) in saes.items()}, device=dist.resolve_device(device))
    for name, cols in found.items():
        write_parquet(saes[name][1] / "feature_neighbours.parquet", cols, row_group_size=PROMPT_ROW_GROUP)
