"""Per-feature statistics from sparse codes: fire rates, activations and, on rollout caches,
AUROC against correctness with a sequence-bootstrap CI, permutation p-value and BH q-value.

Clusters are sequences (a rollout's rows share one label), so the intervals and tests resample
and permute rollouts, not tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cache_format.errors import UserError

from .config import AnalysisConfig
from .stats import SparseAUROC, benjamini_hochberg, bootstrap_ci, feature_value_order, permutation_pvalue

# The 000 card's "healthy" feature: fires on 0.5% to 30% of the analyzed tokens.
HEALTHY_FIRE_RATE = (0.005, 0.30)


def sparse_entries(idx: np.ndarray, vals: np.ndarray):
    rows = np.repeat(np.arange(idx.shape[0], dtype=np.int64), idx.shape[1])
    feats = idx.reshape(-1).astype(np.int64)
    v = vals.reshape(-1).astype(np.float64)
    on = v != 0
    return rows[on], feats[on], v[on]


def is_healthy(fire_rate: np.ndarray) -> np.ndarray:
    lo, hi = HEALTHY_FIRE_RATE
    return (fire_rate >= lo) & (fire_rate <= hi)


def feature_metrics(
    idx: np.ndarray,
    vals: np.ndarray,
    seq_ids: np.ndarray,
    labels: np.ndarray,
    d_sae: int,
    cfg: AnalysisConfig,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One row per feature (columns documented in docs/analysis.md) and a summary dict."""
    n = idx.shape[0]
    rows, feats, v = sparse_entries(idx, vals)
    fire = np.bincount(feats, minlength=d_sae)
    act_sum = np.bincount(feats, weights=v, minlength=d_sae)
    max_act = np.full(d_sae, np.nan)
    if len(feats):
        order = feature_value_order(feats, v, d_sae)
        last = np.r_[np.flatnonzero(np.diff(feats[order])), len(order) - 1]
        max_act[feats[order][last]] = v[order][last]
    with np.errstate(invalid="ignore", divide="ignore"):
        out: dict[str, np.ndarray] = {
            "feature": np.arange(d_sae, dtype=np.int32),
            "fire_count": fire.astype(np.int64),
            "fire_rate": fire / max(n, 1),
            "mean_activation": np.where(fire > 0, act_sum / np.maximum(fire, 1), np.nan),
            "mean_activation_all": act_sum / max(n, 1),
            "max_activation": max_act,
        }
    summary: dict[str, Any] = {
        "tokens": int(n),
        "sequences": int(len(np.unique(seq_ids))),
        "alive": int((fire > 0).sum()),
        "dead_fraction": float((fire == 0).mean()) if d_sae else float("nan"),
        "healthy_features": int(is_healthy(out["fire_rate"]).sum()),
    }

    lab = np.asarray(labels)
    has = lab >= 0
    labeled_seqs, seq_pos = _sequence_labels(seq_ids[has], lab[has])
    nan = np.full(d_sae, np.nan)
    for col in (
        "auroc",
        "auroc_ci_low",
        "auroc_ci_high",
        "p_value",
        "q_value",
        "seq_auroc",
        "fire_rate_correct",
        "fire_rate_wrong",
    ):
        out[col] = nan.copy()
    out["direction"] = np.array([""] * d_sae, dtype=object)
    out["tested"] = np.zeros(d_sae, dtype=bool)
    if len(labeled_seqs) == 0 or seq_pos.all() or not seq_pos.any():
        summary["labels"] = "none" if len(labeled_seqs) == 0 else "one class only"
        return out, summary

    # token level, on labeled rows; clusters are sequences
    sel = np.flatnonzero(has)
    remap = np.full(n, -1, dtype=np.int64)
    remap[sel] = np.arange(len(sel))
    m = remap[rows] >= 0
    t_rows, t_feats, t_vals = remap[rows[m]], feats[m], v[m]
    row_seq = np.searchsorted(labeled_seqs, seq_ids[sel])
    tok = SparseAUROC(t_rows, t_feats, t_vals, d_sae)
    pos_w = seq_pos[row_seq].astype(np.float64)
    auroc = tok(pos_w, 1.0 - pos_w)
    fired_pos = np.bincount(t_feats, weights=pos_w[t_rows], minlength=d_sae)
    fired_all = np.bincount(t_feats, minlength=d_sae)
    out["auroc"] = auroc
    out["fire_rate_correct"] = fired_pos / pos_w.sum()
    out["fire_rate_wrong"] = (fired_all - fired_pos) / (len(sel) - pos_w.sum())
    out["direction"] = np.where(auroc > 0.5, "correct↑", np.where(auroc < 0.5, "wrong↑", "")).astype(object)
    tested = fire >= cfg.min_fires
    out["tested"] = tested
    if cfg.bootstrap > 0:
        lo, hi = bootstrap_ci(tok, seq_pos, row_seq, cfg.bootstrap, seed=seed)
        out["auroc_ci_low"] = np.where(tested, lo, np.nan)
        out["auroc_ci_high"] = np.where(tested, hi, np.nan)
    if cfg.permutations > 0:
        p = permutation_pvalue(tok, seq_pos, row_seq, cfg.permutations, seed=seed + 1)
        p = np.where(tested, p, np.nan)
        out["p_value"] = p
        out["q_value"] = benjamini_hochberg(p)

    # sequence level: mean activation over each rollout's rows vs its correctness
    counts = np.bincount(row_seq, minlength=len(labeled_seqs)).astype(np.float64)
    key = row_seq[t_rows] * d_sae + t_feats
    uk, inv = np.unique(key, return_inverse=True)
    sums = np.bincount(inv, weights=t_vals)
    s_seq, s_feat = uk // d_sae, uk % d_sae
    seq_stat = SparseAUROC(s_seq, s_feat, sums / counts[s_seq], d_sae)
    out["seq_auroc"] = seq_stat(seq_pos.astype(np.float64), (~seq_pos).astype(np.float64))

    finite = ~np.isnan(auroc)
    best = int(np.nanargmax(np.abs(auroc - 0.5))) if finite.any() else -1
    summary.update(
        {
            "labels": "correctness",
            "labeled_tokens": int(len(sel)),
            "labeled_sequences": int(len(labeled_seqs)),
            "correct_sequences": int(seq_pos.sum()),
            "max_auroc": float(np.nanmax(auroc)) if finite.any() else None,
            "min_auroc": float(np.nanmin(auroc)) if finite.any() else None,
            "strongest_feature": best,
            "tested_features": int(tested.sum()),
            "significant_features": int(np.nansum(out["q_value"] <= cfg.alpha)),
        }
    )
    return out, summary


def _sequence_labels(seq_ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted labeled seq ids, is-correct per sequence); a rollout's rows share one label."""
    if len(seq_ids) == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    uniq, inv = np.unique(seq_ids, return_inverse=True)
    pos = np.bincount(inv, weights=(labels == 1)).astype(np.float64)
    cnt = np.bincount(inv).astype(np.float64)
    mixed = (pos > 0) & (pos < cnt)
    if mixed.any():
        raise UserError(
            f"sequence {int(uniq[np.argmax(mixed)])} has both correct and wrong labels; "
            "labels are per rollout, check the cache with `python -m cache_format verify`"
        )
    return uniq, pos > 0
