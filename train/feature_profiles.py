"""Per-feature profiles for the feature browser: the activation histogram and the fire rate by
role (prompt, thinking, answer, corpus text) and by position in the sequence.

Computed from the same sparse codes as `feature_stats`, in one pass of bincounts over the
non-zero entries, so a 65k-wide SAE costs seconds. The denominators (rows of each role, rows
in each position bucket) go to analysis.json, so a rate of a role that was not analyzed is
NaN, not zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import cache_format as cf

from .feature_stats import sparse_entries

HIST_BINS = 32
# position buckets [edge_i, edge_{i+1}): the first token, the start of a text, then doublings by 4
POSITION_EDGES = (0, 1, 4, 16, 64, 256, 1024, 4096, 16384)


def position_bucket(positions: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.asarray(POSITION_EDGES[1:]), np.asarray(positions), side="right")


def feature_profiles(
    idx: np.ndarray, vals: np.ndarray, roles: np.ndarray, positions: np.ndarray, d_sae: int, bins: int = HIST_BINS
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(columns, one row per feature; what the rates are over, for analysis.json).

    Columns: `hist_low`/`hist_high` (the histogram's range: [min(0, min), max] of the
    feature's non-zero values), `hist_counts` (`bins` counts over that range, equal widths),
    `fire_rate_<role>` for each role in the cache's codes, and `fire_rate_by_position` (one
    rate per bucket of POSITION_EDGES).
    """
    rows, feats, v = sparse_entries(idx, vals)
    n_roles = max(cf.ROLE_NAMES) + 1
    role_rows = np.bincount(np.asarray(roles, np.int64), minlength=n_roles)
    n_buckets = len(POSITION_EDGES)
    bucket = position_bucket(positions)
    bucket_rows = np.bincount(bucket, minlength=n_buckets)

    hi = np.full(d_sae, -np.inf)
    lo = np.zeros(d_sae)
    np.maximum.at(hi, feats, v)
    np.minimum.at(lo, feats, v)
    fired = np.isfinite(hi)
    hi = np.where(fired, hi, np.nan)
    lo = np.where(fired, lo, np.nan)
    width = np.where(fired & (hi > lo), (hi - lo) / bins, 1.0)
    b = np.clip(((v - lo[feats]) / width[feats]).astype(np.int64), 0, bins - 1)
    counts = np.bincount(feats * bins + b, minlength=d_sae * bins).reshape(d_sae, bins)

    by_role = np.bincount(feats * n_roles + np.asarray(roles, np.int64)[rows], minlength=d_sae * n_roles)
    by_role = by_role.reshape(d_sae, n_roles)
    by_pos = np.bincount(feats * n_buckets + bucket[rows], minlength=d_sae * n_buckets).reshape(d_sae, n_buckets)
    with np.errstate(invalid="ignore", divide="ignore"):
        role_rate = np.where(role_rows > 0, by_role / role_rows, np.nan)
        pos_rate = np.where(bucket_rows > 0, by_pos / bucket_rows, np.nan)
    cols: dict[str, Any] = {
        "feature": np.arange(d_sae, dtype=np.int32),
        "hist_low": lo,
        "hist_high": hi,
        "hist_counts": counts.astype(np.int32).tolist(),
    }
    for code, name in sorted(cf.ROLE_NAMES.items()):
        cols[f"fire_rate_{name}"] = role_rate[:, code]
    cols["fire_rate_by_position"] = pos_rate.astype(np.float32).tolist()
    denominators = {
        "hist_bins": bins,
        "rows_by_role": {cf.ROLE_NAMES[c]: int(role_rows[c]) for c in sorted(cf.ROLE_NAMES)},
        "position_edges": list(POSITION_EDGES),
        "rows_by_position": bucket_rows.tolist(),
    }
    return cols, denominators
