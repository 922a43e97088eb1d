"""One self-contained HTML page per training run: nothing to fetch, images inlined as base64.

Reads what the other steps left in the run directory and renders whatever is there:

- `run.json` (train's export): the SAEs, their final metrics and config;
- `<sae>/trajectory.jsonl` and `<sae>/*.png`: training curves (the figure is `outdir`'s, the
  same as the run's own `trajectory.png`);
- `<sae>/feature_metrics.parquet`, `feature_prompts.parquet`, `analysis.json` (`train analyze`);
- `<sae>/loss_recovered.json` (`harvest loss-recovered`).

Missing pieces are stated on the page rather than failing the report, so a run can be
reported before (or without) the model-side step. The figures are matplotlib drawn off-screen
(Agg) to base64 PNGs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cache_format import open_cache
from cache_format.stores.local import write_atomic

from ..metrics import METRIC_NAMES
from ..outdir import read_run, trajectory_figure

# -- the figures -------------------------------------------------------------------------------

__all__ = ["png_base64", "img_tag", "fire_rate_histogram", "auroc_histogram"]


def png_base64(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def img_tag(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def fire_rate_histogram(fire_rate: np.ndarray, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    alive = fire_rate[fire_rate > 0]
    dead = int((fire_rate <= 0).sum())
    if len(alive):
        lo = max(alive.min(), 1e-7)
        bins = np.logspace(np.log10(lo), np.log10(max(alive.max(), lo * 10)), 40)
        ax.hist(alive, bins=bins, color="#3a6ea5")
        ax.set_xscale("log")
    ax.set_xlabel("fire rate (fraction of analyzed tokens)")
    ax.set_ylabel("features")
    ax.set_title(f"{title}: fire rate ({dead} never fired)")
    return png_base64(fig)


def auroc_histogram(auroc: np.ndarray, title: str, significant: np.ndarray | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    a = auroc[~np.isnan(auroc)]
    bins = np.linspace(min(0.0, a.min()) if len(a) else 0, max(1.0, a.max()) if len(a) else 1, 41)
    ax.hist(a, bins=bins, color="#999999", label="all features")
    if significant is not None and significant.any():
        ax.hist(auroc[significant], bins=bins, color="#c0392b", label="BH q ≤ 0.05")
        ax.legend(fontsize=8)
    ax.axvline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xlabel("token-level AUROC vs correctness")
    ax.set_ylabel("features")
    ax.set_title(f"{title}: AUROC")
    return png_base64(fig)


# -- the page ----------------------------------------------------------------------------------

REPORT_NAME = "report.html"


# ---------------------------------------------------------------------------------------
# html


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "—"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3g}"
        return f"{v:.4f}"
    return html.escape(str(v))


def _table(header: list[str] | None, rows: list[list[Any]], raw_cols: tuple[int, ...] = ()) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header or [])
    body = []
    for r in rows:
        tds = "".join(f"<td>{v if i in raw_cols else _fmt(v)}</td>" for i, v in enumerate(r))
        body.append(f"<tr>{tds}</tr>")
    head = f"<thead><tr>{th}</tr></thead>" if header else ""
    return f"<table>{head}<tbody>{''.join(body)}</tbody></table>"


def _json_block(title: str, obj: Any) -> str:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    return f"<details><summary>{html.escape(title)}</summary><pre>{html.escape(text)}</pre></details>"


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except json.JSONDecodeError:
        return None


def _visible(text: str) -> str:
    """Escaped, with line breaks and tabs shown as symbols so a context stays on one line."""
    return html.escape(text).replace("\r", "").replace("\n", "↵").replace("\t", "→")


def _context_html(row: dict) -> str:
    before = _visible(str(row.get("context_before", "")))
    tok = _visible(str(row.get("token", "")))
    after = _visible(str(row.get("context_after", "")))
    return f'<span class="ctx">{before}<mark>{tok}</mark>{after}</span>'


def top_features(metrics, n: int):
    """The features worth a look: the strongest correctness signal when labels exist (lowest
    q, then largest |AUROC − ½|), else the most active alive features."""
    alive = metrics[metrics["fire_count"] > 0]
    if "auroc" in alive and alive["auroc"].notna().any():
        score = (alive["auroc"] - 0.5).abs()
        q = alive["q_value"].fillna(1.0) if "q_value" in alive else 1.0
        ranked = alive.assign(_q=q, _s=score).sort_values(["_q", "_s"], ascending=[True, False])
    else:
        ranked = alive.sort_values(["max_activation"], ascending=False)
    return ranked.head(n)


def _sae_section(sae: dict, n_features: int) -> str:
    import pyarrow.parquet as pq

    d: Path = sae["dir"]
    name = sae["name"]
    parts = [f'<section><h2 id="{html.escape(name)}">{html.escape(name)}</h2>']
    analysis = _read_json(d / "analysis.json") or {}
    lr = _read_json(d / "loss_recovered.json")
    cfg = _read_json(d / "cfg.json") or sae.get("config") or {}

    # training curves: train's PNGs, else drawn from trajectory.jsonl
    pngs = sorted(d.glob("*.png"))
    curves = [img_tag(base64.b64encode(p.read_bytes()).decode(), p.stem) for p in pngs]
    traj_path = d / "trajectory.jsonl"
    if not curves and traj_path.is_file():
        rows = [json.loads(line) for line in traj_path.read_text().splitlines() if line.strip()]
        fig = trajectory_figure(rows, name)
        if fig is not None:
            curves.append(img_tag(png_base64(fig), "training trajectory"))
    parts.append("<h3>Training curves</h3>")
    parts.append(
        f'<div class="figs">{"".join(curves)}</div>'
        if curves
        else "<p class=note>No training curves in this directory.</p>"
    )

    if lr:
        parts.append("<h3>Loss recovered</h3>")
        parts.append(
            _table(
                [
                    "CE clean",
                    "CE with SAE",
                    "CE zero-ablated",
                    "loss recovered",
                    "KL(clean‖SAE)",
                    "KL(clean‖zero)",
                    "tokens",
                ],
                [
                    [
                        lr.get("ce_clean"),
                        lr.get("ce_sae"),
                        lr.get("ce_zero"),
                        lr.get("loss_recovered"),
                        lr.get("kl_sae"),
                        lr.get("kl_zero"),
                        lr.get("tokens"),
                    ]
                ],
            )
        )

    fm_path = d / "feature_metrics.parquet"
    if fm_path.is_file():
        metrics = pq.read_table(fm_path).to_pandas()
        parts.append("<h3>Features</h3>")
        if analysis.get("rows"):
            parts.append(
                f"<p class=note>Computed over {html.escape(str(analysis['rows']))}; "
                "confidence intervals resample whole sequences.</p>"
            )
        summary = analysis.get("summary", {})
        if summary:
            items = list(summary.items())
            per_row = 4
            grid = []
            for i in range(0, len(items), per_row):
                row = []
                for key, val in items[i : i + per_row]:
                    row += [f"<b>{html.escape(key)}</b>", _fmt(val)]
                grid.append(row + [""] * (2 * per_row - len(row)))
            parts.append(_table(None, grid, raw_cols=tuple(range(2 * per_row))))
        figs = [img_tag(fire_rate_histogram(metrics["fire_rate"].to_numpy(), name), "fire-rate histogram")]
        if "auroc" in metrics and metrics["auroc"].notna().any():
            sig = (metrics["q_value"] <= 0.05).to_numpy() if "q_value" in metrics else None
            figs.append(img_tag(auroc_histogram(metrics["auroc"].to_numpy(dtype=float), name, sig), "AUROC histogram"))
        parts.append(f'<div class="figs">{"".join(figs)}</div>')
        prompts = None
        if (d / "feature_prompts.parquet").is_file():
            prompts = pq.read_table(d / "feature_prompts.parquet").to_pandas()
        top = top_features(metrics, n_features)
        rows = []
        for _, f in top.iterrows():
            ex = ""
            if prompts is not None:
                sel = prompts[prompts["feature"] == f["feature"]].sort_values("rank").head(3)
                ex = "<br>".join(
                    f"{_context_html(r)} <small>({_fmt(r['activation'])})</small>" for r in sel.to_dict("records")
                )
            ci = ""
            if "auroc_ci_low" in f and not (isinstance(f["auroc_ci_low"], float) and math.isnan(f["auroc_ci_low"])):
                ci = f"[{_fmt(f['auroc_ci_low'])}, {_fmt(f['auroc_ci_high'])}]"
            rows.append(
                [
                    int(f["feature"]),
                    f["fire_rate"],
                    f["mean_activation"],
                    f["max_activation"],
                    f.get("auroc"),
                    html.escape(ci),
                    f.get("q_value"),
                    html.escape(str(f.get("direction") or "")),
                    f.get("seq_auroc"),
                    ex,
                ]
            )
        parts.append(f"<h3>Top {len(rows)} features</h3>")
        parts.append(
            _table(
                [
                    "feature",
                    "fire rate",
                    "mean act",
                    "max act",
                    "AUROC",
                    "95% CI",
                    "BH q",
                    "direction",
                    "seq AUROC",
                    "top contexts",
                ],
                rows,
                raw_cols=(5, 7, 9),
            )
        )
    else:
        parts.append("<p class=note>No feature analysis yet: run <code>python -m train analyze</code>.</p>")
    if analysis:
        parts.append(_json_block("analysis provenance", {k: v for k, v in analysis.items() if k != "summary"}))
    if cfg:
        parts.append(_json_block("SAE config", cfg))
    parts.append("</section>")
    return "\n".join(parts)


def _source_shares(url: str | None) -> str | None:
    """A corpus mixture's measured token shares, from the cache's segments (None when unreadable)."""
    if not url:
        return None
    try:
        from cache_format.ops import rows_by_source

        rows = rows_by_source(open_cache(url))
    except Exception:  # the report renders from the run directory even where the cache is gone
        return None
    total = sum(rows.values())
    return " · ".join(f"{k} {v / total:.1%}" for k, v in sorted(rows.items(), key=lambda kv: -kv[1])) or None


def _cache_fingerprint(url: str) -> str | None:
    try:
        return open_cache(url).fingerprint
    except Exception:  # as _source_shares: the page renders without the cache
        return None


def _provenance_table(run: dict, saes: list[dict], cache: str | None = None) -> str:
    """Where the activations came from: model, hook, source and cache, as analysis recorded them;
    `cache` (`train report --cache`) names the cache whose shares and fingerprint are shown instead."""
    a = next((x for x in (_read_json(s["dir"] / "analysis.json") for s in saes) if x), {}) or {}
    url = cache or a.get("cache") or run.get("cache")
    fingerprint = (
        (_cache_fingerprint(cache) if cache else None) or a.get("cache_fingerprint") or run.get("cache_fingerprint")
    )
    model = a.get("model") if isinstance(a.get("model"), dict) else {}
    source = a.get("source") if isinstance(a.get("source"), dict) else {}
    hook = a.get("hook") if isinstance(a.get("hook"), dict) else {}
    rows = [
        ("model", model.get("name_or_path") or run.get("model")),
        ("model class / revision", " / ".join(str(model.get(k)) for k in ("class", "revision") if model.get(k))),
        (
            "weights / config hash",
            (model.get("weights_sha256") or model.get("commit") or model.get("config_sha256") or "")[:16],
        ),
        ("dtype", model.get("dtype")),
        ("hook", hook.get("meaning") or hook.get("site")),
        ("module path", hook.get("module_path")),
        ("source", " ".join(str(source.get(k)) for k in ("name", "dataset") if source.get(k))),
        ("cache", url),
        ("source token shares", _source_shares(url)),
        ("cache fingerprint", (fingerprint or "")[:16]),
    ]
    rows = [[f"<b>{html.escape(k)}</b>", _fmt(v)] for k, v in rows if v not in (None, "")]
    return _table(None, rows, raw_cols=(0,)) if rows else ""


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;
     margin:2em auto;max-width:1200px;color:#222;background:#fff}
h1{border-bottom:3px solid #3a6ea5;padding-bottom:.2em}
h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#eef3f8}
td:last-child{text-align:left}
.figs img{max-width:48%;margin:4px;border:1px solid #eee}
.ctx{font-family:monospace;white-space:pre-wrap}
mark{background:#ffd54f;font-weight:bold}
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}
.note{color:#777;font-style:italic}
"""


def render_report(
    run_dir: str | Path, out_path: str | Path | None = None, n_features: int = 24, cache: str | None = None
) -> Path:
    """Write `report.html` for the run in `run_dir` and return its path; `cache` is the cache the
    provenance shows (default: the one the run and its analysis recorded)."""
    run_dir = Path(run_dir)
    run, saes = read_run(run_dir, need_saes=True)
    rows = []
    for s in saes:
        m = s.get("metrics") or s.get("final_metrics") or {}
        cfg = _read_json(s["dir"] / "cfg.json") or s.get("config") or {}
        lr = _read_json(s["dir"] / "loss_recovered.json") or {}
        link = f'<a href="#{html.escape(s["name"])}">{html.escape(s["name"])}</a>'
        rows.append(
            [
                link,
                s.get("layer", cfg.get("layer")),
                cfg.get("d_sae", s.get("d_sae")),
                cfg.get("k", s.get("k")),
                *[m.get(c) for c in METRIC_NAMES],
                lr.get("loss_recovered"),
                lr.get("kl_sae"),
                s.get("tokens_seen", cfg.get("tokens_seen")),
            ]
        )
    title = f"SAE training report: {run_dir.name}"
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Run directory <code>{html.escape(str(run_dir.resolve()))}</code>, rendered "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}.</p>",
        "<h2>Final metrics</h2>",
        "<p>Held-out rows. variance_explained = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²; dead_fraction counts latents that never "
        "fired on the evaluated rows; loss recovered = (CE<sub>zero</sub> − CE<sub>SAE</sub>) / "
        "(CE<sub>zero</sub> − CE<sub>clean</sub>).</p>",
        _table(
            ["SAE", "layer", "d_sae", "k", *METRIC_NAMES, "loss recovered", "KL", "tokens seen"], rows, raw_cols=(0,)
        ),
        "<h2>Config and provenance</h2>",
        _provenance_table(run, saes, cache),
        _json_block("run.json", run),
    ]
    body += [_sae_section(s, n_features) for s in saes]
    page = (
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>"
    )
    out = Path(out_path) if out_path else run_dir / REPORT_NAME
    write_atomic(out, page)
    return out
