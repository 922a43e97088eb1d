"""Feature analysis of a trained SAE on a cache's held-out rows, without the base model.

One streaming pass (`scan`) encodes the held-out rows chunk by chunk, in parallel with dask
(a LocalCluster, or `--scheduler ADDRESS` for a real cluster), and returns the sparse codes
plus mergeable reconstruction metrics. From the codes:

- `feature_metrics`: per feature, fire rate, mean/max activation and, on rollout caches,
  token-level AUROC against correctness with its direction, a sequence-bootstrap CI, a
  sequence-permutation p-value and Benjamini-Hochberg q; and the sequence-level AUROC
  (the feature's mean activation per rollout against the rollout's correctness);
- `top_examples` + `contexts`: the reverse index, the top-activating rows of each feature
  with a token window decoded by the tokenizer stored in the cache.

`analyze` runs all of it and writes `feature_metrics.parquet`, `feature_prompts.parquet`,
`feature_stats.json` (shaped like the `000_*` card's) and `analysis.json` (provenance).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

import cache_format as cf
from .config import AnalysisConfig
from cache_format.errors import UserError

from .metrics import ReconstructionMetrics
from .sae import TopKSAE
from .split import is_heldout
from .stats import SparseAUROC, benjamini_hochberg, bootstrap_ci, feature_value_order, permutation_pvalue

ROLLOUT_ROLES = (cf.ROLE_THINKING, cf.ROLE_ANSWER)
ROLE_NAMES = {"text": cf.ROLE_TEXT, "prompt": cf.ROLE_PROMPT, "thinking": cf.ROLE_THINKING, "answer": cf.ROLE_ANSWER}
ENCODE_BATCH = 4096


# ---------------------------------------------------------------------------------------
# the streaming pass


ROW_SETS = ("heldout", "train", "all")


@dataclass
class Split:
    """Which rows are scanned: a side of the sequence split (by hash), with the given roles."""

    seed: int = 0
    fraction: float = 0.01
    roles: tuple[int, ...] | None = None  # None = every role
    rows: str = "heldout"  # heldout | train | all: which side of the split
    labeled: bool = False  # keep only rows with a correctness label (label >= 0)

    def keep(self, cols: dict) -> np.ndarray:
        """Mask of the rows of a chunk's columns that this split scans."""
        held = is_heldout(cols["seq_ids"], self.seed, self.fraction)
        keep = {"heldout": held, "train": ~held, "all": np.ones_like(held)}[self.rows]
        if self.roles is not None:
            keep &= np.isin(cols["roles"], self.roles)
        if self.labeled:
            keep &= cols["labels"] >= 0
        return keep

    def describe(self) -> str:
        """What the rows are, in words (for errors and the report)."""
        side = {"heldout": "held-out", "train": "train-split", "all": "all"}[self.rows]
        return f"{side}{' labeled' if self.labeled else ''} rows (split seed {self.seed}, fraction {self.fraction:g})"

    def as_dict(self) -> dict:
        return {"seed": self.seed, "fraction": self.fraction, "roles": list(self.roles) if self.roles else None,
                "rows": self.rows, "labeled": self.labeled}

    @classmethod
    def of(cls, sae: TopKSAE, default_seed: int, default_fraction: float) -> "Split":
        """The split recorded in the SAE's config (train's export), else the defaults given."""
        from .published import recorded_split

        seed, fraction, roles = recorded_split(sae, default_seed, default_fraction)
        return cls(seed, fraction, parse_roles(roles) if roles else None)


def parse_roles(roles) -> tuple[int, ...]:
    out = []
    for r in roles:
        if isinstance(r, str) and r in ROLE_NAMES:
            out.append(ROLE_NAMES[r])
        elif isinstance(r, (int, np.integer)) and int(r) in ROLE_NAMES.values():
            out.append(int(r))
        else:
            raise UserError(f"role {r!r} is unknown; use text, prompt, thinking or answer")
    return tuple(sorted(set(out)))


def default_roles(cache) -> tuple[int, ...] | None:
    """The loader's rule, so analysis sees the rows training saw: thinking + answer on
    rollout caches, every row on corpus text."""
    from .row_filters import default_roles as loader_default

    roles = loader_default(cache)
    return parse_roles(roles) if roles else None


@dataclass
class ChunkCodes:
    chunk: int
    scanned: int  # rows in the chunk
    rows: np.ndarray  # global row index of each kept row
    columns: dict[str, np.ndarray]  # tokens, seq_ids, positions, labels, roles of kept rows
    vals: np.ndarray | None  # (n, k) float32
    idx: np.ndarray | None  # (n, k) int32
    metrics: ReconstructionMetrics
    nbytes: int = 0


@functools.lru_cache(maxsize=8)
def _open(url: str, n_tokens: int):
    """One reader per worker process and cache snapshot (keyed by its row count)."""
    c = cf.open_cache(url)
    if c.n_tokens < n_tokens:
        raise UserError(f"{url}: the cache shrank while being analyzed; re-run")
    return c


_ON_DEVICE: dict = {}
_ON_DEVICE_LOCK = __import__("threading").Lock()


def resolve_device(device: str | None) -> str:
    """"auto" → cuda when available: at d_sae 65536 the encoder is the cost, not the I/O."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _on_device(sae: TopKSAE, device: str, token: str) -> TopKSAE:
    """One copy of the SAE per worker process, scan and device (the scattered one stays on
    CPU). `token` is unique per scan, so a copy is never mistaken for another SAE's."""
    if device == "cpu":
        return sae
    with _ON_DEVICE_LOCK:
        if token not in _ON_DEVICE:
            import copy

            _ON_DEVICE.clear()  # one scan at a time per worker: drop the previous SAE's copy
            _ON_DEVICE[token] = copy.deepcopy(sae).to(device).eval()
        return _ON_DEVICE[token]


def _scan_chunk(url: str, n_tokens: int, layer: int, i: int, sae: TopKSAE, split: Split, want_codes: bool,
                device: str = "cpu", token: str = "") -> ChunkCodes:
    sae = _on_device(sae, device, token)
    c = _open(url, n_tokens)
    cols = c.read_chunk_rows(i)
    keep = split.keep(cols)
    start = int(c.chunk_bounds()[i])
    metrics = ReconstructionMetrics(sae.d_sae)
    n_scanned = len(cols["seq_ids"])
    rows = np.flatnonzero(keep)
    kept = {k: v[rows] for k, v in cols.items()}
    if len(rows) == 0:
        return ChunkCodes(i, n_scanned, rows + start, kept, None, None, metrics)
    raw = c.read_chunk(layer, i)
    x_all = torch.from_numpy(np.asarray(raw[rows], dtype=np.float32)).to(device)
    vals_out, idx_out = [], []
    with torch.no_grad():
        for a in range(0, len(rows), ENCODE_BATCH):
            x = x_all[a : a + ENCODE_BATCH]
            vals, idx = sae.encode(x)
            metrics.update(x, sae.decode(vals, idx), vals, idx)
            if want_codes:
                vals_out.append(vals.float().cpu().numpy())
                idx_out.append(idx.to(torch.int32).cpu().numpy())
    vals = np.concatenate(vals_out) if want_codes else None
    idx = np.concatenate(idx_out) if want_codes else None
    return ChunkCodes(i, n_scanned, rows + start, kept, vals, idx, metrics, nbytes=raw.nbytes)


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None) -> Iterator[Any]:
    """A client on `scheduler`, else a LocalCluster of threads (chunk decode and the SAE
    matmuls release the GIL, and threads share the SAE without copying it)."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler)  # connect timeout: dask's distributed.comm.timeouts.connect
        except (OSError, TimeoutError) as e:
            raise UserError(f"cannot reach the dask scheduler at {scheduler} ({e}); check --scheduler") from None
        try:
            yield client
        finally:
            client.close()
        return
    n = workers or max(1, min(4, os.cpu_count() or 1))
    with LocalCluster(n_workers=1, threads_per_worker=n, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


@dataclass
class ScanResult:
    url: str
    layer: int
    split: Split
    rows: np.ndarray
    columns: dict[str, np.ndarray]
    vals: np.ndarray | None
    idx: np.ndarray | None
    metrics: ReconstructionMetrics
    scanned: int
    seconds: float
    chunks: int = 0
    info: dict = field(default_factory=dict)


def scan(
    url: str,
    sae: TopKSAE,
    layer: int,
    split: Split,
    *,
    max_tokens: int = 1_000_000,
    want_codes: bool = True,
    scheduler: str | None = None,
    client=None,
    progress: bool = True,
    device: str | None = "auto",
) -> ScanResult:
    """Encode the held-out rows of `layer`, chunk by chunk in cache order, on dask.

    Chunks are submitted in order with a bounded number in flight; the pass stops once the
    chunks completed in order hold at least `max_tokens` kept rows and keeps exactly those
    chunks (whole chunks, so codes and metrics cover the same rows), so the result does not
    depend on task timing.
    """
    from dask.distributed import wait
    from tqdm import tqdm

    c = cf.open_cache(url)
    if layer not in c.layers:
        raise UserError(f"layer {layer} is not in the cache {url} (it has {c.layers}); pass --layer one of them")
    if c.d_model != sae.d_in:
        raise UserError(f"the SAE takes d_in={sae.d_in} but the cache's d_model is {c.d_model}; pair the SAE with its cache")
    n_chunks = c.n_chunks
    sae = sae.cpu().eval()
    device = resolve_device(device)
    token = __import__("uuid").uuid4().hex
    t0 = time.perf_counter()
    results: dict[int, ChunkCodes] = {}
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(dask_client(scheduler))
        [sae_f] = client.scatter([sae], broadcast=True)
        in_flight = max(4, 2 * sum(client.nthreads().values()))
        bar = stack.enter_context(tqdm(total=c.n_tokens, unit="tok", unit_scale=True, desc=f"scan L{layer}",
                                       disable=not progress, dynamic_ncols=True))
        next_chunk, prefix, kept_prefix, mb = 0, 0, 0, 0.0
        pending = set()
        while True:
            while next_chunk < n_chunks and len(pending) < in_flight and kept_prefix < max_tokens:
                pending.add(client.submit(_scan_chunk, c.url, c.n_tokens, layer, next_chunk, sae_f, split, want_codes, device, token,
                                          key=f"scan-{layer}-{next_chunk}-{token}", pure=False))
                next_chunk += 1
            if not pending:
                break
            done, pending = wait(pending, return_when="FIRST_COMPLETED")
            for fut in done:
                r = fut.result()
                results[r.chunk] = r
                mb += r.nbytes / 2**20
                bar.update(r.scanned)
                bar.set_postfix_str(f"{mb / max(time.perf_counter() - t0, 1e-9):.0f} MB/s", refresh=False)
            while prefix in results and kept_prefix < max_tokens:
                kept_prefix += len(results[prefix].rows)
                prefix += 1
            if kept_prefix >= max_tokens:
                for fut in pending:
                    fut.cancel()
                pending = set()
    ordered = [results[i] for i in range(prefix)]
    return _combine(c.url, layer, split, ordered, sae.d_sae, time.perf_counter() - t0)


def _combine(url, layer, split, parts: list[ChunkCodes], d_sae: int, seconds: float) -> ScanResult:
    metrics = ReconstructionMetrics(d_sae)
    for r in parts:
        metrics.merge(r.metrics)
    coded = [r for r in parts if r.vals is not None]
    return ScanResult(
        url=url, layer=layer, split=split,
        rows=np.concatenate([r.rows for r in parts]) if parts else np.zeros(0, np.int64),
        columns={k: np.concatenate([r.columns[k] for r in parts]) for k in (parts[0].columns if parts else {})},
        vals=np.concatenate([r.vals for r in coded]) if coded else None,
        idx=np.concatenate([r.idx for r in coded]) if coded else None,
        metrics=metrics, scanned=sum(r.scanned for r in parts), seconds=seconds, chunks=len(parts),
    )


# ---------------------------------------------------------------------------------------
# per-feature statistics


def _sparse_entries(idx: np.ndarray, vals: np.ndarray):
    rows = np.repeat(np.arange(idx.shape[0], dtype=np.int64), idx.shape[1])
    feats = idx.reshape(-1).astype(np.int64)
    v = vals.reshape(-1).astype(np.float64)
    on = v != 0
    return rows[on], feats[on], v[on]


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
    rows, feats, v = _sparse_entries(idx, vals)
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
        "tokens": int(n), "sequences": int(len(np.unique(seq_ids))), "alive": int((fire > 0).sum()),
        "dead_fraction": float((fire == 0).mean()) if d_sae else float("nan"),
        "healthy_features": int(((out["fire_rate"] >= 0.005) & (out["fire_rate"] <= 0.30)).sum()),
    }

    lab = np.asarray(labels)
    has = lab >= 0
    labeled_seqs, seq_pos = _sequence_labels(seq_ids[has], lab[has])
    nan = np.full(d_sae, np.nan)
    for col in ("auroc", "auroc_ci_low", "auroc_ci_high", "p_value", "q_value", "seq_auroc",
                "fire_rate_correct", "fire_rate_wrong"):
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
    summary.update({
        "labels": "correctness",
        "labeled_tokens": int(len(sel)), "labeled_sequences": int(len(labeled_seqs)),
        "correct_sequences": int(seq_pos.sum()),
        "max_auroc": float(np.nanmax(auroc)) if finite.any() else None,
        "min_auroc": float(np.nanmin(auroc)) if finite.any() else None,
        "strongest_feature": best,
        "tested_features": int(tested.sum()),
        "significant_features": int(np.nansum(out["q_value"] <= cfg.alpha)),
    })
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
        raise UserError(f"sequence {int(uniq[np.argmax(mixed)])} has both correct and wrong labels; "
                        "labels are per rollout, check the cache with `python -m cache_format verify`")
    return uniq, pos > 0


# ---------------------------------------------------------------------------------------
# reverse index


def top_examples(idx: np.ndarray, vals: np.ndarray, per_feature: int, groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The `per_feature` highest activations of each feature: (feature, rank, scan row, value).

    With `groups` (the sequence of each scan row), a feature keeps at most one example per
    sequence, its strongest: neighbouring tokens of one text otherwise fill the whole list.
    """
    rows, feats, v = _sparse_entries(idx, vals)
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
    return {"feature": feats[o].astype(np.int32), "rank": rank[top].astype(np.int32),
            "scan_row": rows[o], "activation": v[o].astype(np.float32)}


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
            ids_by_seq[int(col_seq[j])] = np.asarray(col_tok[int(j)].values.to_numpy(zero_copy_only=False), dtype=np.int64)
    out = {"context_token_ids": [], "token": [], "context_before": [], "context_after": [], "context": []}
    for s, p, t in zip(seq_ids.tolist(), positions.tolist(), tokens.tolist()):
        full = ids_by_seq.get(s)
        if full is None or not 0 <= p < len(full) or int(full[p]) != t:
            raise UserError(f"sequence {s} position {p}: the cache's sequences table does not hold token {t} there; "
                            "the cache is inconsistent, run `python -m cache_format verify`")
        a, b = max(0, p - window), min(len(full), p + window + 1)
        before, after = full[a:p].tolist(), full[p + 1 : b].tolist()
        tb, tt, ta = tok.decode(before, skip_special_tokens=False), tok.decode([t], skip_special_tokens=False), \
            tok.decode(after, skip_special_tokens=False)
        out["context_token_ids"].append(full[a:b].astype(np.int32).tolist())
        out["token"].append(tt)
        out["context_before"].append(tb)
        out["context_after"].append(ta)
        out["context"].append(f"{tb}«{tt}»{ta}")
    return out


# ---------------------------------------------------------------------------------------
# the whole analysis


def _write_parquet(path: Path, columns: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for k, v in columns.items():
        if isinstance(v, np.ndarray) and v.dtype == object:
            arrays[k] = pa.array(v.tolist(), pa.string())
        elif isinstance(v, list) and v and isinstance(v[0], list):
            arrays[k] = pa.array(v, pa.list_(pa.int32()))
        else:
            arrays[k] = pa.array(v)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.table(arrays), tmp, compression="zstd")
    tmp.replace(path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default, allow_nan=False))
    tmp.replace(path)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if np.isnan(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _clean(x):
    """NaN → None, recursively, so the JSON is strict."""
    if isinstance(x, float):
        return None if np.isnan(x) else x
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


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
    res = scan(url, sae, layer, split, max_tokens=cfg.max_tokens, scheduler=scheduler, client=client, progress=progress,
               device=device)
    if len(res.rows) == 0:
        raise UserError(f"no {split.describe()} of layer {layer} in {url} (roles {split.roles}); "
                        "use a larger cache, or --rows all")
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
        "feature": ex["feature"], "rank": ex["rank"], "activation": ex["activation"],
        "row": res.rows[r], "seq_id": cols["seq_ids"][r], "position": cols["positions"][r],
        "token_id": cols["tokens"][r], "label": cols["labels"][r], "role": cols["roles"][r], **ctx,
    }
    _write_parquet(out_dir / "feature_metrics.parquet", fm)
    _write_parquet(out_dir / "feature_prompts.parquet", prompts)

    recon = res.metrics.compute() if res.metrics.n else {}
    summary.update({"variance_explained": recon.get("variance_explained"), "l0": recon.get("l0")})
    stats = {f"L{layer}": _clean({
        "layer": layer, "n_features": sae.d_sae, "k": sae.k,
        "auroc": fm["auroc"].tolist(), "fire_rate": fm["fire_rate"].tolist(),
        "direction": fm["direction"].tolist(), "q_value": fm["q_value"].tolist(),
        "seq_auroc": fm["seq_auroc"].tolist(), "summary": summary,
    })}
    _write_json(out_dir / "feature_stats.json", stats)
    meta = cache.meta or {}
    analysis = _clean({
        "summary": summary,
        "layer": layer, "cache": res.url, "cache_fingerprint": cache.fingerprint,
        "layer_fingerprint": cache.layer_fingerprint(layer),
        "sae_fingerprint": (sae.cfg or {}).get("layer_fingerprint") or (sae.cfg or {}).get("fingerprint"),
        "sae_layout": (sae.cfg or {}).get("layout"), "sae_source": (sae.cfg or {}).get("source_path"),
        "split": split.as_dict(), "rows": split.describe(), "reconstruction": recon, "rows_scanned": res.scanned, "chunks": res.chunks,
        "scan_seconds": res.seconds, "stats_seconds": fm_seconds,
        "analysis_config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "model": meta.get("model"), "source": meta.get("source"), "hook": meta.get("hook"),
    })
    _write_json(out_dir / "analysis.json", analysis)
    return analysis
