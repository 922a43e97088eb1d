"""A training run's features as the browser reads them: one columnar index of every feature of
every SAE, answered page by page, and each feature's full record read on
demand.

Everything comes from what `train analyze` (and `harvest logit-effects`) left in the run
directory, local or remote (any URL the cache accepts, read through `cache_format.stores`):

- `feature_metrics.parquet` of each SAE → the index columns, held as numpy arrays, so a sort,
  filter or search over 3 × 65,536 features is a few vectorized passes (every column's sort
  order is computed at start);
- `feature_prompts.parquet` → the top context of each feature (the index's snippet) and the
  tokens its examples fire on, as a token → features table (the text search);
- the per-feature files (`feature_prompts`, `feature_profiles`, `feature_neighbours`,
  `logit_effects`) → one feature's record, read from the row group that holds it.

The same records and pages feed the server and the static export (`browse`), so both show the same numbers.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from cache_format.errors import UserError

from ..outdir import FeatureRows, RunFiles, sae_key
from .features import HEALTHY_FIRE_RATE, is_healthy

# -- one feature's record ----------------------------------------------------------------------

LOGIT_EFFECTS_HOWTO = (
    "Logit effects need the model: run `python -m harvest logit-effects --out RUN` (or `make report`), "
    "which stores them in each SAE's logit_effects.parquet."
)
ANALYZE_HOWTO = "Re-run `python -m train analyze --out RUN` for profiles and neighbours."


def scalar(v) -> Any:
    """A JSON-safe scalar: NaN → None, numpy → Python."""
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(v) else float(v)
    return v


def rounded(values, digits: int = 4) -> list:
    """Floats to `digits` significant digits (NaN → None): what a page shows, and a smaller export."""
    out = _round_array(np.asarray(values, np.float64), digits)
    return [None if x != x else x for x in out.tolist()]


def _round_array(v: np.ndarray, digits: int) -> np.ndarray:
    out = np.full(v.shape, np.nan)
    nz = np.isfinite(v) & (v != 0)
    scale = 10.0 ** (digits - 1 - np.floor(np.log10(np.abs(v[nz]))))
    out[nz] = np.round(v[nz] * scale) / scale
    out[v == 0] = 0.0
    return out


def rounded_table(table, digits: int = 4):
    """A pyarrow table with its float columns (and lists of floats) rounded as `rounded` does and
    NaN made null, in one vectorized pass per column: a block of 1,000 features has ~300k values."""
    import pyarrow as pa

    def fix(arr):
        t = arr.type
        if pa.types.is_floating(t):
            v = arr.to_numpy(zero_copy_only=False).astype(np.float64)
            r = _round_array(v, digits)
            return pa.array(r, pa.float64(), mask=np.isnan(r))
        if pa.types.is_list(t) and pa.types.is_floating(t.value_type):
            arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
            return pa.ListArray.from_arrays(arr.offsets, fix(arr.flatten()), mask=arr.is_null())
        return arr

    return pa.table({name: fix(table.column(name)) for name in table.column_names})


def records(
    sae: str,
    layer: int | None,
    d_sae: int,
    alpha: float,
    labels: str | None,
    first: int,
    metrics: list[dict],
    parts: dict[str, list[list[dict]] | None],
    denominators: dict,
) -> list[dict]:
    """The records of features first, first + 1, …: `metrics` holds their feature_metrics rows,
    `parts` each per-feature file's rows grouped by feature (None: the file is absent)."""
    out = []
    for j, m in enumerate(metrics):
        f = first + j
        mm = {k: scalar(v) for k, v in m.items()}
        part = {k: (v[j] if v is not None else None) for k, v in parts.items()}
        rec = {
            "sae": sae,
            "layer": layer,
            "feature": f,
            "d_sae": d_sae,
            "alpha": alpha,
            "labels": labels,
            "metrics": mm,
            "healthy": bool(is_healthy(np.float64(mm.get("fire_rate") or 0.0))),
            "prev": f - 1 if f > 0 else None,
            "next": f + 1 if f + 1 < d_sae else None,
            "examples": _examples(part["prompts"]) if part["prompts"] is not None else [],
            "profile": _profile(part["profiles"], denominators) if part["profiles"] is not None else None,
            "neighbours": _neighbours(part["neighbours"], sae) if part["neighbours"] is not None else None,
            "logit_effects": _logits(part["logit_effects"]) if part["logit_effects"] is not None else None,
        }
        missing = {}
        if rec["profile"] is None or rec["neighbours"] is None or not rec["examples"]:
            missing["analysis"] = ANALYZE_HOWTO
        if rec["logit_effects"] is None:
            missing["logit_effects"] = LOGIT_EFFECTS_HOWTO
        rec["missing"] = missing
        out.append(rec)
    return out


def group(rows: list[dict], first: int, stop: int) -> list[list[dict]]:
    """Rows of features [first, stop), one list per feature."""
    out: list[list[dict]] = [[] for _ in range(stop - first)]
    for r in rows:
        out[r["feature"] - first].append(r)
    return out


# The rows below come through `rounded_table`: floats already rounded, NaN already None.


def _examples(rows: list[dict]) -> list[dict]:
    """A feature's top contexts: each token with its value (null where the scan did not reach)."""
    out = []
    for r in sorted(rows, key=lambda r: r["rank"]):
        tokens = r.get("context_tokens")
        if tokens is not None:
            values = r.get("context_activations")
            focus = r["context_focus"]
        else:  # an analysis from before per-token values: the firing token alone is known
            tokens = [r["context_before"], r["token"], r["context_after"]]
            values, focus = None, 1
        out.append(
            {
                "rank": r["rank"],
                "activation": r["activation"],
                "label": r["label"],
                "role": r["role"],
                "seq_id": r["seq_id"],
                "position": r["position"],
                "tokens": tokens,
                "values": values,
                "focus": focus,
            }
        )
    return out


def _profile(rows: list[dict], denominators: dict) -> dict | None:
    if not rows:
        return None
    r = rows[0]
    prefix = "fire_rate_"
    roles = {k[len(prefix) :]: v for k, v in r.items() if k.startswith(prefix) and k != "fire_rate_by_position"}
    return {
        "histogram": {"low": r["hist_low"], "high": r["hist_high"], "counts": r["hist_counts"]},
        "fire_rate_by_role": roles,
        "rows_by_role": denominators.get("rows_by_role"),
        "fire_rate_by_position": r["fire_rate_by_position"],
        "position_edges": denominators.get("position_edges"),
    }


def _neighbours(rows: list[dict], own: str) -> dict:
    same = [{"feature": r["neighbour"], "cosine": r["cosine"]} for r in rows if r["sae"] == own]
    other = [{"sae": r["sae"], "feature": r["neighbour"], "cosine": r["cosine"]} for r in rows if r["sae"] != own]
    return {"same": same, "other": other}


def _logits(rows: list[dict]) -> dict | None:
    if not rows:
        return None
    r = rows[0]

    def side(kind):
        return [
            {"token": t, "token_id": i, "value": v}
            for t, i, v in zip(r[f"{kind}_tokens"], r[f"{kind}_token_ids"], r[f"{kind}_values"])
        ]

    out = {"promoted": side("top"), "suppressed": side("bottom")}
    counts = r.get("hist_counts")
    if counts and r.get("hist_low") is not None:
        w = (r["hist_high"] - r["hist_low"]) / len(counts)
        out["histogram"] = {
            "centres": rounded([r["hist_low"] + w * (i + 0.5) for i in range(len(counts))]),
            "counts": counts,
        }
    return out


# -- the run's index ---------------------------------------------------------------------------

METRICS = "feature_metrics.parquet"
PROMPTS = "feature_prompts.parquet"
PROFILES = "feature_profiles.parquet"
NEIGHBOURS = "feature_neighbours.parquet"
LOGIT_EFFECTS = "logit_effects.parquet"  # written by `python -m harvest logit-effects`

# (column, label, kind): the index's columns in display order; kind says how it sorts and filters
COLUMNS = (
    ("sae", "SAE", "category"),
    ("layer", "layer", "int"),
    ("feature", "feature", "int"),
    ("fire_rate", "fire rate", "float"),
    ("mean_activation", "mean act", "float"),
    ("max_activation", "max act", "float"),
    ("auroc", "AUROC", "float"),
    ("auroc_ci_low", "CI low", "float"),
    ("auroc_ci_high", "CI high", "float"),
    ("q_value", "BH q", "float"),
    ("direction", "direction", "category"),
    ("seq_auroc", "seq AUROC", "float"),
    ("healthy", "healthy", "bool"),
)
NUMERIC = tuple(c for c, _, kind in COLUMNS if kind in ("int", "float"))
FLOATS = tuple(c for c, _, kind in COLUMNS if kind == "float")
DIRECTIONS = ("", "correct↑", "wrong↑")
MAX_PAGE_SIZE = 500
# what a feature's record reads of its examples (the last three only for analyses made before
# per-token values: then the firing token alone is shaded)
RECORD_PROMPT_COLUMNS = [
    "feature",
    "rank",
    "activation",
    "label",
    "role",
    "seq_id",
    "position",
    "context_tokens",
    "context_activations",
    "context_focus",
    "token",
    "context_before",
    "context_after",
]


@dataclass
class SAEInfo:
    name: str
    key: str  # its directory, relative to the run
    layer: int | None
    d_sae: int
    offset: int  # its first row in the index
    alpha: float  # "significant" means q ≤ alpha
    labels: str | None  # analysis.json's summary.labels
    analysis: dict


class RunIndex:
    """Every feature of every SAE of a run, for the browser."""

    def __init__(self, url: str):
        self.files = RunFiles(url)
        self.url = url
        run = self.files.json("run.json")
        if run is None:
            raise UserError(f"{url}: no run.json here; pass --out a training run directory (after `make train`)")
        items = run.get("saes", run.get("exports")) if isinstance(run, dict) else run
        if isinstance(items, dict):
            items = [dict(v, name=v.get("name", k)) for k, v in items.items()]
        self.saes: list[SAEInfo] = []
        self._metrics = {}
        self._readers: dict[tuple[str, str], FeatureRows | None] = {}
        self._readers_lock = threading.Lock()
        offset = 0
        for item in items or []:
            if not isinstance(item, dict):
                continue
            name = str(item.get("name") or PurePosixPath(str(item.get("path", ""))).name)
            key = sae_key(item, name)
            if not self.files.exists(f"{key}/{METRICS}"):
                continue
            metrics = self._read_metrics(f"{key}/{METRICS}")
            analysis = self.files.json(f"{key}/analysis.json") or {}
            cfg = analysis.get("analysis_config") or {}
            layer = analysis.get("layer", item.get("layer"))
            info = SAEInfo(
                name=name,
                key=key,
                layer=int(layer) if layer is not None else None,
                d_sae=metrics.num_rows,
                offset=offset,
                alpha=float(cfg.get("alpha", 0.05)),
                labels=(analysis.get("summary") or {}).get("labels"),
                analysis=analysis,
            )
            self.saes.append(info)
            self._metrics[name] = metrics
            offset += metrics.num_rows
        if not self.saes:
            raise UserError(
                f"{url}: no feature analysis here (no {METRICS} beside the SAEs in run.json); "
                "run `make report` (or `python -m train analyze --out RUN`) first"
            )
        self.by_name = {s.name: s for s in self.saes}
        self.n = offset
        self._build_columns()
        self._build_search()
        for info in self.saes:  # opened now, so the first feature page is as quick as the next
            for filename in (PROMPTS, PROFILES, NEIGHBOURS, LOGIT_EFFECTS):
                self.reader(info, filename)
        self._orders: dict[tuple[str, bool], np.ndarray] = {}
        self._orders_lock = threading.Lock()
        for c, _, _ in COLUMNS:  # every sort order now (~20 ms and 0.8 MB each at 200k features)
            self.order(c, False)
            self.order(c, True)

    # -- loading -----------------------------------------------------------------------

    def _read_metrics(self, key: str):
        import pyarrow.parquet as pq

        with self.files.open(key) as f:
            t = pq.read_table(f)
        if "feature" not in t.column_names or not np.array_equal(t.column("feature").to_numpy(), np.arange(t.num_rows)):
            raise UserError(f"{self.url}/{key}: not one row per feature in order; re-run `python -m train analyze`")
        return t

    def _build_columns(self) -> None:
        cols: dict[str, list] = {c: [] for c, _, _ in COLUMNS}
        for i, s in enumerate(self.saes):
            m = self._metrics[s.name]
            n = s.d_sae
            cols["sae"].append(np.full(n, i, np.int16))
            cols["layer"].append(np.full(n, -1 if s.layer is None else s.layer, np.int32))
            cols["feature"].append(np.arange(n, dtype=np.int32))
            for c in FLOATS:
                arr = m.column(c).to_numpy(zero_copy_only=False) if c in m.column_names else np.full(n, np.nan)
                cols[c].append(np.asarray(arr, np.float64))
            d = m.column("direction").to_pylist() if "direction" in m.column_names else [""] * n
            code = {v: k for k, v in enumerate(DIRECTIONS)}
            cols["direction"].append(np.array([code.get(x or "", 0) for x in d], np.int8))
            cols["healthy"].append(is_healthy(cols["fire_rate"][-1]))
        self.cols = {c: np.concatenate(v) for c, v in cols.items()}
        self.alpha = np.concatenate([np.full(s.d_sae, s.alpha) for s in self.saes])
        self.alive = np.concatenate([self._metrics[s.name].column("fire_count").to_numpy() > 0 for s in self.saes])

    def _build_search(self) -> None:
        """The snippet (top context) of each feature, and the token → features table."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        before, token, after = [], [], []
        tok_arrays, tok_rows = [], []
        cols = ["feature", "rank", "token", "context_before", "context_after"]
        for s in self.saes:
            key = f"{s.key}/{PROMPTS}"
            where = np.full(s.d_sae, -1, np.int64)
            parts = {c: [] for c in cols[2:]}
            if self.files.exists(key):
                with self.files.open(key) as f:
                    pf = pq.ParquetFile(f)
                    n = 0
                    for g in range(pf.metadata.num_row_groups):  # a row group at a time: bounded memory
                        t = pf.read_row_group(g, columns=cols)
                        feat = t.column("feature").to_numpy()
                        top = np.flatnonzero(t.column("rank").to_numpy() == 0)
                        where[feat[top]] = n + np.arange(len(top))
                        n += len(top)
                        for c in parts:
                            parts[c].append(t.column(c).combine_chunks().take(pa.array(top)))
                        tok_arrays.append(t.column("token").combine_chunks())
                        tok_rows.append(feat.astype(np.int64) + s.offset)
            take = pa.array(np.where(where >= 0, where, 0))
            valid = pa.array(where >= 0)
            for out, col in ((before, "context_before"), (token, "token"), (after, "context_after")):
                vals = pa.concat_arrays(parts[col]) if parts[col] else pa.array([""], pa.string())
                out.append(pc.if_else(valid, vals.take(take), pa.scalar(None, pa.string())))
        self.snippet = {
            "before": pa.concat_arrays(before),
            "token": pa.concat_arrays(token),
            "after": pa.concat_arrays(after),
        }
        ctx = pc.binary_join_element_wise(
            pc.fill_null(self.snippet["before"], ""),
            pc.fill_null(self.snippet["token"], ""),
            pc.fill_null(self.snippet["after"], ""),
            "",
        )
        self.snippet_text = ctx
        if tok_arrays:
            enc = pa.concat_arrays(tok_arrays).dictionary_encode()
            codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            rows = np.concatenate(tok_rows)
            pair = np.sort(codes * (self.n + 1) + rows)  # (token, feature), sorted by token
            pair = pair[np.r_[True, pair[1:] != pair[:-1]]]  # once each (np.unique hashes: slower here)
            self.token_dict = enc.dictionary
            self.token_rows = (pair % (self.n + 1)).astype(np.int32)
            self.token_starts = np.searchsorted(pair // (self.n + 1), np.arange(len(enc.dictionary) + 1))
        else:
            self.token_dict = pa.array([], pa.string())
            self.token_rows = np.zeros(0, np.int32)
            self.token_starts = np.zeros(1, np.int64)

    def reader(self, sae: SAEInfo, filename: str) -> FeatureRows | None:
        """The per-feature reader of one of an SAE's files (None when the file is not there)."""
        k = (sae.name, filename)
        with self._readers_lock:
            if k not in self._readers:
                key = f"{sae.key}/{filename}"
                self._readers[k] = FeatureRows(self.files, key) if self.files.exists(key) else None
            return self._readers[k]

    # -- the index ---------------------------------------------------------------------

    def meta(self) -> dict:
        return {
            "run": self.url,
            "n": self.n,
            "saes": [
                {
                    "name": s.name,
                    "layer": s.layer,
                    "d_sae": s.d_sae,
                    "offset": s.offset,
                    "alpha": s.alpha,
                    "labels": s.labels,
                }
                for s in self.saes
            ],
            "layers": sorted({s.layer for s in self.saes if s.layer is not None}),
            "columns": [{"field": c, "title": t, "kind": k} for c, t, k in COLUMNS],
            "directions": [d for d in DIRECTIONS if d],
            "healthy_fire_rate": list(HEALTHY_FIRE_RATE),
        }

    def order(self, column: str, descending: bool) -> np.ndarray:
        """Rows sorted by `column` (NaN last either way; ties in run order), cached."""
        k = (column, descending)
        with self._orders_lock:
            if k not in self._orders:
                x = self.cols[column].astype(np.float64)
                self._orders[k] = np.argsort(-x if descending else x, kind="stable").astype(np.int32)
            return self._orders[k]

    def mask(self, f: dict) -> np.ndarray:
        """The rows a filter keeps; `f` holds the query parameters (see `parse_query`)."""
        m = np.ones(self.n, bool)
        if f.get("sae"):
            want = [i for i, s in enumerate(self.saes) if s.name in f["sae"]]
            m &= np.isin(self.cols["sae"], want)
        if f.get("layer") is not None:
            m &= self.cols["layer"] == f["layer"]
        if f.get("direction"):
            m &= self.cols["direction"] == DIRECTIONS.index(f["direction"])
        if f.get("significant"):
            with np.errstate(invalid="ignore"):
                m &= self.cols["q_value"] <= self.alpha
        if f.get("healthy"):
            m &= self.cols["healthy"]
        if f.get("alive"):
            m &= self.alive
        for c, (lo, hi) in (f.get("ranges") or {}).items():
            x = self.cols[c]
            with np.errstate(invalid="ignore"):
                if lo is not None:
                    m &= x >= lo
                if hi is not None:
                    m &= x <= hi
        if f.get("q"):
            m &= self.search(f["q"], f.get("qmode", "token"))
        return m

    def search(self, q: str, mode: str = "token") -> np.ndarray:
        """Features whose top contexts fire on a token containing `q` (case-insensitive; in double
        quotes, exactly that token, spaces kept), or (mode "context") whose top context contains it."""
        import pyarrow.compute as pc

        exact = len(q) >= 2 and q[0] == q[-1] == '"'
        text = q[1:-1] if exact else q
        hit = np.zeros(self.n, bool)
        if mode == "context":
            found = pc.match_substring(self.snippet_text, text, ignore_case=not exact)
            return np.asarray(pc.fill_null(found, False).to_numpy(zero_copy_only=False), bool)
        if exact:
            found = pc.equal(self.token_dict, text)
        else:
            found = pc.match_substring(self.token_dict, text, ignore_case=True)
        codes = np.flatnonzero(np.asarray(pc.fill_null(found, False).to_numpy(zero_copy_only=False), bool))
        if len(codes):
            a, b = self.token_starts[codes], self.token_starts[codes + 1]
            hit[np.concatenate([self.token_rows[x:y] for x, y in zip(a, b)])] = True
        return hit

    def page(self, f: dict) -> dict:
        """One page of the filtered, sorted index, as Tabulator's remote pagination takes it."""
        size = min(max(int(f.get("size") or 50), 1), MAX_PAGE_SIZE)
        order = self.order(f.get("sort") or "sae", f.get("dir") == "desc")
        if f.get("sort") in (None, "", "sae") and f.get("dir") != "desc":
            order = np.arange(self.n, dtype=np.int32)  # run order: SAE, then feature
        kept = order[self.mask(f)[order]]
        pages = max(1, -(-len(kept) // size))
        page = min(max(int(f.get("page") or 1), 1), pages)
        rows = kept[(page - 1) * size : page * size]
        return {"last_page": pages, "last_row": int(len(kept)), "data": self.rows(rows)}

    def rows(self, rows: np.ndarray) -> list[dict]:
        """Index rows as JSON objects (numbers rounded as shown; NaN → null)."""
        import pyarrow as pa

        take = pa.array(np.asarray(rows, np.int64))
        snip = {k: v.take(take).to_pylist() for k, v in self.snippet.items()}
        cols = {}
        for c, _, kind in COLUMNS:
            x = self.cols[c][rows]
            if c == "sae":
                cols[c] = [self.saes[i].name for i in x.tolist()]
            elif c == "direction":
                cols[c] = [DIRECTIONS[i] for i in x.tolist()]
            elif kind == "float":
                cols[c] = rounded(x)
            else:
                cols[c] = [scalar(v) for v in x.tolist()]
        out = []
        for i in range(len(rows)):
            r = {c: cols[c][i] for c in cols}
            r["top"] = {"before": snip["before"][i], "token": snip["token"][i], "after": snip["after"][i]}
            out.append(r)
        return out

    # -- one feature -------------------------------------------------------------------

    def sae(self, name: str) -> SAEInfo:
        if name not in self.by_name:
            raise KeyError(f"no SAE named {name!r} in this run (it has {', '.join(self.by_name)})")
        return self.by_name[name]

    def check(self, name: str, feature: int) -> SAEInfo:
        s = self.sae(name)
        if not 0 <= feature < s.d_sae:
            raise KeyError(f"{name} has features 0 to {s.d_sae - 1}; there is no feature {feature}")
        return s

    def feature(self, name: str, feature: int) -> dict:
        """One feature's full record (KeyError for an unknown SAE or an id out of range)."""
        s = self.check(name, feature)
        return self.features(s, feature, feature + 1)[0]

    def features(self, s: SAEInfo, first: int, stop: int) -> list[dict]:
        """The records of features [first, stop) of one SAE, reading each file's rows once."""
        parts = {}
        for part, filename in (
            ("prompts", PROMPTS),
            ("profiles", PROFILES),
            ("neighbours", NEIGHBOURS),
            ("logit_effects", LOGIT_EFFECTS),
        ):
            r = self.reader(s, filename)
            cols = None
            if filename == PROMPTS and r is not None:
                fallback = "context_tokens" not in r.columns
                cols = RECORD_PROMPT_COLUMNS if fallback else RECORD_PROMPT_COLUMNS[:-3]
            rows = rounded_table(r.range(first, stop, cols)).to_pylist() if r is not None else None
            parts[part] = group(rows, first, stop) if rows is not None else None
        metrics = self._metrics[s.name].slice(first, stop - first).to_pylist()
        return records(
            s.name, s.layer, s.d_sae, s.alpha, s.labels, first, metrics, parts, s.analysis.get("profiles") or {}
        )
