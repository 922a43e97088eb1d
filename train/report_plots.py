"""The report's figures: matplotlib drawn off-screen (Agg) to base64 PNGs, so the HTML page inlines
them and needs nothing beside it. Kept apart from the page's HTML so each changes on its own.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

__all__ = ["png_base64", "img_tag", "fire_rate_histogram", "auroc_histogram", "trajectory_plot"]


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


def trajectory_plot(rows: list[dict], title: str) -> str | None:
    """Held-out metrics against tokens seen, from trajectory.jsonl (when train drew no PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs_key = next((k for k in ("tokens", "tokens_seen", "step") if rows and k in rows[0]), None)
    keys = [k for k in ("variance_explained", "dead_fraction", "l0") if any(k in r for r in rows)]
    if not xs_key or not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, key in zip(np.atleast_1d(axes), keys, strict=True):
        pts = [(r[xs_key], r[key]) for r in rows if key in r and r[key] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".")
        ax.set_xlabel(xs_key)
        ax.set_title(key)
    fig.suptitle(title)
    return png_base64(fig)
