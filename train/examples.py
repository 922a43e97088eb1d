"""The reverse index: each feature's top-activating rows, with their token windows decoded
and the feature's value on every token of each window.

The windows come from the cache's sequences table and its stored tokenizer, so no base model
is needed; the values come from the same scan's codes.
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
