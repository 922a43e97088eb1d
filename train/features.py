"""Feature analysis of a trained SAE on a cache's held-out rows, without the base model.

`analyze` runs the whole analysis and writes `feature_metrics.parquet`, `feature_prompts.parquet`,
`feature_stats.json` (shaped like the `000_*` card's) and `analysis.json` (provenance). Its parts:

- `scan.scan`: one streaming pass on dask over the rows `analysis_rows.Split` selects, giving
  sparse codes plus mergeable reconstruction metrics;
- `feature_stats.feature_metrics`: per feature, fire rate, activations and, on rollout caches,
  token- and sequence-level AUROC against correctness with CI, p-value and q-value;
- `examples`: the reverse index, each feature's top-activating rows with decoded token windows;
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
from .examples import contexts, top_examples
from .feature_stats import feature_metrics
from .sae import TopKSAE
from .scan import scan


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
    """Scan, compute feature metrics and the reverse index, write the four files; return the summary."""
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
    write_parquet(out_dir / "feature_metrics.parquet", fm)
    write_parquet(out_dir / "feature_prompts.parquet", prompts)

    recon = res.metrics.compute() if res.metrics.n else {}
    summary.update({"variance_explained": recon.get("variance_explained"), "l0": recon.get("l0")})
    stats = {
        f"L{layer}": clean(
            {
                "layer": layer,
                "n_features": sae.d_sae,
                "k": sae.k,
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
            "analysis_config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
            "model": meta.get("model"),
            "source": meta.get("source"),
            "hook": meta.get("hook"),
        }
    )
    write_json(out_dir / "analysis.json", analysis)
    return analysis
