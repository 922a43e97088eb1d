"""The reverse index: each feature's top-activating rows, with their token windows decoded.

The windows come from the cache's sequences table and its stored tokenizer, so no base model
is needed.
"""

from __future__ import annotations

import numpy as np

from cache_format.errors import UserError

from .feature_stats import sparse_entries
from .stats import feature_value_order


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
    out = {"context_token_ids": [], "token": [], "context_before": [], "context_after": [], "context": []}
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
        out["context_token_ids"].append(full[a:b].astype(np.int32).tolist())
        out["token"].append(tt)
        out["context_before"].append(tb)
        out["context_after"].append(ta)
        out["context"].append(f"{tb}«{tt}»{ta}")
    return out
