"""The feature analysis of a trained SAE on a cache's rows, without the base model.

`analyze` runs it and writes `feature_metrics.parquet`, `feature_prompts.parquet`,
`feature_profiles.parquet`, `feature_stats.json` (shaped like the `000_*` card's) and
`analysis.json` (provenance); `write_neighbours` adds `feature_neighbours.parquet` for a run.
Its parts, in this order below:

- the files, strict JSON (NaN as null) and zstd parquet, each renamed into place;
- per feature: fire rate, activations and, on rollout caches, token- and sequence-level AUROC
  against correctness with a sequence-bootstrap CI, permutation p-value and BH q-value (the
  tests themselves are `significance`'s; clusters are rollouts, never tokens);
- profiles: each feature's activation histogram and fire rate by role and by position, in one
  pass of bincounts over the non-zero codes (the denominators go to analysis.json, so a rate
  of a role that was not analyzed is NaN, not zero);
- decoder neighbours: for each feature, the features whose decoder rows point the most the
  same way, in its own SAE and in each other SAE of the run (exact, block by block);
- the reverse index: each feature's top-activating rows, their token windows decoded from the
  cache's sequences table and stored tokenizer, and the feature's value on every token;
- the driver: one `scan` over the selected rows, then all of the above from its codes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cache_format as cf
from cache_format.errors import UserError
from cache_format.stores.local import atomic_path, write_atomic

from ..config import AnalysisConfig
from ..sae import TopKSAE
from .scan import RowSelection, scan
from .significance import SparseAUROC, benjamini_hochberg, bootstrap_ci, feature_value_order, permutation_pvalue

# -- the files: strict JSON and zstd parquet, atomically ---------------------------------------


def write_parquet(path: Path, columns: dict[str, Any], row_group_size: int | None = None) -> None:
    """Columns of equal length as one zstd parquet file. Lists of lists become list columns of
    int32, float32 or string, by their first element. `row_group_size` keeps row groups small
    where readers fetch a few rows at a time (the browser reads one feature's examples)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for k, v in columns.items():
        if isinstance(v, np.ndarray) and v.dtype == object:
            arrays[k] = pa.array(v.tolist(), pa.string())
        elif isinstance(v, list) and v and isinstance(v[0], (list, np.ndarray)):
            arrays[k] = _list_array(v)
        else:
            arrays[k] = pa.array(v)
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(arrays), tmp, compression="zstd", row_group_size=row_group_size)


def _list_array(lists: list):
    """A list column built from one flat array and offsets (no per-element Python objects)."""
    import pyarrow as pa

    first = next((x for x in lists if len(x)), [])
    kind = np.asarray(first).dtype.kind if len(first) else "i"
    lengths = np.fromiter((len(x) for x in lists), np.int64, len(lists))
    offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
    if kind in "UO":
        flat = pa.array([t for x in lists for t in x], pa.string())
    else:
        dtype = np.float32 if kind == "f" else np.int32
        flat = np.concatenate([np.asarray(x) for x in lists]).astype(dtype) if lengths.sum() else np.zeros(0, dtype)
        flat = pa.array(flat)
    return pa.ListArray.from_arrays(offsets, flat)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=False))


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if np.isnan(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def clean(x):
    """NaN → None, recursively, so the JSON is strict."""
    if isinstance(x, float):
        return None if np.isnan(x) else x
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


# -- per-feature statistics --------------------------------------------------------------------

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


# -- profiles: histogram, fire rate by role and position ---------------------------------------

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


# -- decoder-cosine neighbours -----------------------------------------------------------------

SAME_SAE = 10  # neighbours kept in the feature's own SAE
OTHER_SAE = 5  # best matches kept in each other SAE
BLOCK = 4096


def _unit(w: torch.Tensor, device) -> torch.Tensor:
    w = w.detach().to(device=device, dtype=torch.float32)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def top_cosines(a: torch.Tensor, b: torch.Tensor, k: int, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosines), each (len(a), k): the k rows of `b` most aligned with each row of `a`."""
    k = min(k, b.shape[0] - (1 if exclude_self else 0))
    idx = np.zeros((a.shape[0], max(k, 0)), np.int32)
    cos = np.zeros((a.shape[0], max(k, 0)), np.float32)
    if k <= 0:
        return idx, cos
    for s in range(0, a.shape[0], BLOCK):
        c = a[s : s + BLOCK] @ b.T
        if exclude_self:
            r = torch.arange(c.shape[0], device=c.device)
            c[r, r + s] = -float("inf")
        v, i = c.topk(k, dim=1)
        idx[s : s + BLOCK] = i.cpu().numpy()
        cos[s : s + BLOCK] = v.cpu().numpy()
    return idx, cos


def decoder_neighbours(decoders: dict[str, torch.Tensor], device: str = "cpu") -> dict[str, dict[str, np.ndarray]]:
    """Per SAE name, the columns of its `feature_neighbours.parquet`: `feature`, `rank` (0 =
    closest, within each SAE compared), `sae` (the neighbour's SAE), `neighbour`, `cosine`.

    `decoders` maps each SAE's name to its decoder, (d_sae, d_in): one row per feature.
    """
    unit = {name: _unit(w, device) for name, w in decoders.items()}
    out = {}
    for name, a in unit.items():
        parts = []
        for other, b in unit.items():
            if b.shape[1] != a.shape[1]:
                continue
            same = other == name
            idx, cos = top_cosines(a, b, SAME_SAE if same else OTHER_SAE, exclude_self=same)
            n, k = idx.shape
            parts.append(
                {
                    "feature": np.repeat(np.arange(n, dtype=np.int32), k),
                    "rank": np.tile(np.arange(k, dtype=np.int32), n),
                    "sae": np.full(n * k, other, dtype=object),
                    "neighbour": idx.reshape(-1),
                    "cosine": cos.reshape(-1),
                }
            )
        cols = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        sae_code = np.unique(cols["sae"], return_inverse=True)[1]
        # by feature, its own SAE first, then the others by name, each by rank
        order = np.lexsort((cols["rank"], sae_code, cols["sae"] != name, cols["feature"]))
        out[name] = {key: v[order] for key, v in cols.items()}
    return out


# -- the reverse index: top examples with their token windows ----------------------------------


def top_examples(
    idx: np.ndarray, vals: np.ndarray, per_feature: int, groups: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The `per_feature` highest activations of each feature: (feature, rank, scan row, value).

    With `groups` (the sequence of each scan row), a feature keeps at most one example per
    sequence, its strongest: neighbouring tokens of one text otherwise fill the whole list.
    """
    rows, feats, v = sparse_entries(idx, vals)
    order = feature_value_order(feats, v, int(feats.max()) + 1 if len(feats) else 0, descending=True)
    if groups is not None and len(order):
        g = np.asarray(groups)[rows[order]]
        pair = np.stack([feats[order], g], axis=1)
        _, first = np.unique(pair, axis=0, return_index=True)
        order = order[np.sort(first)]  # first = strongest of each (feature, sequence), order kept
    feats_o = feats[order]
    starts = np.r_[0, np.flatnonzero(np.diff(feats_o)) + 1] if len(order) else np.zeros(0, np.int64)
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    top = rank < per_feature
    o = order[top]
    return {
        "feature": feats[o].astype(np.int32),
        "rank": rank[top].astype(np.int32),
        "scan_row": rows[o],
        "activation": v[o].astype(np.float32),
    }


def contexts(cache, seq_ids: np.ndarray, positions: np.ndarray, tokens: np.ndarray, window: int, tokenizer=None):
    """Token windows [pos − window, pos + window] of each (seq_id, position), decoded.

    The window comes from the sequence's full token ids in the cache's sequences table, so
    it is right even when rows were mixed at write time; it is checked against the row's
    own token id.
    """
    tok = tokenizer if tokenizer is not None else cache.tokenizer()
    table = cache.sequences()
    ids_by_seq: dict[int, np.ndarray] = {}
    if table.num_rows:
        wanted = set(np.unique(seq_ids).tolist())
        col_seq = table.column("seq_id").to_numpy()
        col_tok = table.column("token_ids")
        for j in np.flatnonzero(np.isin(col_seq, list(wanted))):
            ids = col_tok[int(j)].values.to_numpy(zero_copy_only=False)
            ids_by_seq[int(col_seq[j])] = np.asarray(ids, dtype=np.int64)
    out = {
        "context_token_ids": [],
        "context_tokens": [],
        "context_focus": [],
        "token": [],
        "context_before": [],
        "context_after": [],
        "context": [],
    }
    pieces: dict[int, str] = {}  # each token id decoded once: the browser shades tokens one by one

    def piece(i: int) -> str:
        if i not in pieces:
            pieces[i] = tok.decode([i], skip_special_tokens=False)
        return pieces[i]

    for s, p, t in zip(seq_ids.tolist(), positions.tolist(), tokens.tolist(), strict=True):
        full = ids_by_seq.get(s)
        if full is None or not 0 <= p < len(full) or int(full[p]) != t:
            raise UserError(
                f"sequence {s} position {p}: the cache's sequences table does not hold token {t} there; "
                "the cache is inconsistent, run `python -m cache_format verify`"
            )
        a, b = max(0, p - window), min(len(full), p + window + 1)
        before, after = full[a:p].tolist(), full[p + 1 : b].tolist()
        tb, tt, ta = (
            tok.decode(before, skip_special_tokens=False),
            tok.decode([t], skip_special_tokens=False),
            tok.decode(after, skip_special_tokens=False),
        )
        ids = full[a:b].tolist()
        out["context_token_ids"].append(ids)
        out["context_tokens"].append([piece(i) for i in ids])
        out["context_focus"].append(p - a)
        out["token"].append(tt)
        out["context_before"].append(tb)
        out["context_after"].append(ta)
        out["context"].append(f"{tb}«{tt}»{ta}")
    return out


def window_activations(
    features: np.ndarray,
    seq_ids: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    scanned: dict[str, np.ndarray],
    idx: np.ndarray,
    vals: np.ndarray,
    block: int = 65536,
) -> list[np.ndarray]:
    """Each example's feature value on every token of its window, from the scan's codes.

    Example i is feature `features[i]` over positions `starts[i] : starts[i] + lengths[i]` of
    sequence `seq_ids[i]`; `scanned` holds the `seq_ids` and `positions` of the scan rows that
    `idx`/`vals` code. A window token the scan did not cover (another role, the other side of
    the split) is NaN: its value was never computed, which is not the same as zero.
    """
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) == 0:
        return []
    owner = np.repeat(np.arange(len(lengths)), lengths)
    offset = np.arange(len(owner)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    s_seq = np.asarray(scanned["seq_ids"], np.int64)
    s_pos = np.asarray(scanned["positions"], np.int64)
    seqs = np.unique(s_seq)
    if len(seqs) == 0:
        return np.split(np.full(len(owner), np.nan, np.float32), np.cumsum(lengths)[:-1])
    span = int(max(s_pos.max(initial=0), (np.asarray(starts) + lengths).max())) + 1
    s_key = np.searchsorted(seqs, s_seq) * span + s_pos  # (sequence, position) as one sortable key
    order = np.argsort(s_key, kind="stable")
    s_key = s_key[order]
    w_seq = np.asarray(seq_ids, np.int64)[owner]
    code = np.minimum(np.searchsorted(seqs, w_seq), len(seqs) - 1)
    w_key = code * span + np.asarray(starts, np.int64)[owner] + offset
    at = np.minimum(np.searchsorted(s_key, w_key), len(s_key) - 1)
    found = (seqs[code] == w_seq) & (s_key[at] == w_key)
    row = np.where(found, order[at], -1)
    feat = np.asarray(features, np.int64)[owner]
    value = np.full(len(owner), np.nan, np.float32)
    for a in range(0, len(owner), block):  # (block, k) comparisons at a time bound the memory
        r, f = row[a : a + block], feat[a : a + block]
        ok = np.flatnonzero(r >= 0)
        hit = idx[r[ok]] == f[ok, None]
        value[a + ok] = np.where(hit, vals[r[ok]], 0.0).sum(axis=1)
    return np.split(value, np.cumsum(lengths)[:-1])


# -- the driver --------------------------------------------------------------------------------

PROMPT_ROW_GROUP = 4096  # 256 features of 16 examples: what the browser reads for one
PROFILE_ROW_GROUP = 2048


def analyze(
    sae: TopKSAE,
    url: str,
    layer: int,
    out_dir: str | Path,
    cfg: AnalysisConfig,
    split: RowSelection,
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
    from .. import dist

    found = decoder_neighbours({n: sae.W_dec for n, (sae, _) in saes.items()}, device=dist.resolve_device(device))
    for name, cols in found.items():
        write_parquet(saes[name][1] / "feature_neighbours.parquet", cols, row_group_size=PROMPT_ROW_GROUP)
