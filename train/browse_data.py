"""A training run's features as the browser reads them: one columnar index of every feature of
every SAE, answered page by page, and each feature's full record read on demand.

Everything comes from what `train analyze` (and `harvest logit-effects`) left in the run
directory, local or remote (any URL the cache accepts, read through `cache_format.stores`):

- `feature_metrics.parquet` of each SAE → the index columns, held as numpy arrays, so a sort,
  filter or search over 3 × 65,536 features is a few vectorized passes (sort orders are cached);
- `feature_prompts.parquet` → the top context of each feature (the index's snippet) and the
  tokens its examples fire on, as a token → features table (the text search);
- the per-feature files (`feature_prompts`, `feature_profiles`, `feature_neighbours`,
  `logit_effects`) → one feature's record, read from the row group that holds it.

The same records and pages feed the server (`train.browse`) and the static export
(`train.browse_export`), so both show the same numbers.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from cache_format.errors import UserError

from .feature_stats import HEALTHY_FIRE_RATE, is_healthy

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
LOGIT_EFFECTS_HOWTO = (
    "Logit effects need the model: run `python -m harvest logit-effects --out RUN` (or `make report`), "
    "which stores them in each SAE's logit_effects.parquet."
)


class RunFiles:
    """The files of a run directory at a local path or URL, through the cache's store backends."""

    def __init__(self, url: str):
        from cache_format.stores import Location

        self.url = url
        self.loc = Location(url)

    def read(self, key: str) -> bytes | None:
        try:
            return self.loc.read(key)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def json(self, key: str) -> dict | None:
        raw = self.read(key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"{self.url}/{key}: not valid JSON ({e}); re-run the step that wrote it") from None

    def exists(self, key: str) -> bool:
        return self.loc.exists(key)

    def open(self, key: str):
        """A seekable binary file: pyarrow reads a parquet file's footer and row groups from it
        with ranged reads, never the whole object."""
        if self.loc.fs is None:  # a local directory
            return open(self.loc.path(key), "rb")
        return self.loc.fs.open(self.loc.path(key), "rb")


def _sae_key(item: dict, name: str) -> str:
    """Where an SAE's directory is, relative to the run: run.json's relative path, else its name."""
    path = str(item.get("path") or item.get("dir") or "")
    p = PurePosixPath(path)
    if path and not p.is_absolute() and ".." not in p.parts:
        return str(p.parent) if p.suffix else str(p)
    return name


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


class FeatureRows:
    """The rows of one feature in a parquet file sorted by feature, read from the row groups
    that hold them (a 65k-feature file is never read whole)."""

    def __init__(self, files: RunFiles, key: str):
        import pyarrow.parquet as pq

        self.key = key
        self.file = pq.ParquetFile(files.open(key))
        feats = self.file.read(columns=["feature"]).column("feature").to_numpy()
        if len(feats) and np.any(np.diff(feats) < 0):
            raise UserError(f"{files.url}/{key}: rows are not sorted by feature; re-run `python -m train analyze`")
        self.features = feats
        md = self.file.metadata
        self.group_starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        self.columns = set(self.file.schema_arrow.names)
        self.lock = threading.Lock()

    def range(self, first: int, stop: int):
        """A pyarrow table of the rows of features [first, stop)."""
        a = int(np.searchsorted(self.features, first, "left"))
        b = int(np.searchsorted(self.features, stop, "left"))
        if a == b:
            return self.file.schema_arrow.empty_table()
        g0 = int(np.searchsorted(self.group_starts, a, "right")) - 1
        g1 = int(np.searchsorted(self.group_starts, b, "left"))
        with self.lock:
            t = self.file.read_row_groups(list(range(g0, g1)))
        return t.slice(a - int(self.group_starts[g0]), b - a)


def _num(v) -> Any:
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
    v = np.asarray(values, np.float64)
    out = np.full(v.shape, np.nan)
    nz = np.isfinite(v) & (v != 0)
    scale = 10.0 ** (digits - 1 - np.floor(np.log10(np.abs(v[nz]))))
    out[nz] = np.round(v[nz] * scale) / scale
    out[v == 0] = 0.0
    return [None if x != x else x for x in out.tolist()]


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
            key = _sae_key(item, name)
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
        self._orders: dict[tuple[str, bool], np.ndarray] = {}
        self._orders_lock = threading.Lock()

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
        for s in self.saes:
            key = f"{s.key}/{PROMPTS}"
            if not self.files.exists(key):
                empty = pa.nulls(s.d_sae, pa.string())
                before.append(empty), token.append(empty), after.append(empty)
                continue
            with self.files.open(key) as f:
                t = pq.read_table(f, columns=["feature", "rank", "token", "context_before", "context_after"])
            feat = t.column("feature").to_numpy()
            top = np.flatnonzero(t.column("rank").to_numpy() == 0)
            where = np.full(s.d_sae, -1, np.int64)
            where[feat[top]] = top
            take = pa.array(np.where(where >= 0, where, 0))
            valid = pa.array(where >= 0)
            for out, col in ((before, "context_before"), (token, "token"), (after, "context_after")):
                vals = t.column(col).combine_chunks().take(take)
                out.append(pc.if_else(valid, vals, pa.scalar(None, pa.string())))
            tok_arrays.append(t.column("token").combine_chunks())
            tok_rows.append(feat.astype(np.int64) + s.offset)
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
            pair = np.unique(codes * (self.n + 1) + rows)  # (token, feature) once each, sorted by token
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
                cols[c] = [_num(v) for v in x.tolist()]
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
        m = self._metrics[s.name].slice(first, stop - first).to_pylist()
        parts = {}
        for filename in (PROMPTS, PROFILES, NEIGHBOURS, LOGIT_EFFECTS):
            r = self.reader(s, filename)
            parts[filename] = _group(r.range(first, stop).to_pylist(), first, stop) if r is not None else None
        prof = s.analysis.get("profiles") or {}
        out = []
        for j, f in enumerate(range(first, stop)):
            metrics = {k: _num(v) for k, v in m[j].items()}
            rec = {
                "sae": s.name,
                "layer": s.layer,
                "feature": f,
                "d_sae": s.d_sae,
                "alpha": s.alpha,
                "labels": s.labels,
                "metrics": metrics,
                "healthy": bool(is_healthy(np.float64(metrics.get("fire_rate") or 0.0))),
                "prev": f - 1 if f > 0 else None,
                "next": f + 1 if f + 1 < s.d_sae else None,
                "examples": _examples(parts[PROMPTS][j]) if parts[PROMPTS] is not None else [],
                "profile": _profile(parts[PROFILES][j], prof) if parts[PROFILES] is not None else None,
                "neighbours": _neighbours(parts[NEIGHBOURS][j], s.name) if parts[NEIGHBOURS] is not None else None,
                "logit_effects": _logits(parts[LOGIT_EFFECTS][j]) if parts[LOGIT_EFFECTS] is not None else None,
            }
            missing = {}
            if rec["profile"] is None or rec["neighbours"] is None or not rec["examples"]:
                missing["analysis"] = "Re-run `python -m train analyze --out RUN` for profiles and neighbours."
            if rec["logit_effects"] is None:
                missing["logit_effects"] = LOGIT_EFFECTS_HOWTO
            rec["missing"] = missing
            out.append(rec)
        return out


def _group(rows: list[dict], first: int, stop: int) -> list[list[dict]]:
    out: list[list[dict]] = [[] for _ in range(stop - first)]
    for r in rows:
        out[r["feature"] - first].append(r)
    return out


def _examples(rows: list[dict]) -> list[dict]:
    """A feature's top contexts: each token with its value (null where the scan did not reach)."""
    out = []
    for r in sorted(rows, key=lambda r: r["rank"]):
        tokens = r.get("context_tokens")
        if tokens is not None:
            values = rounded(r["context_activations"]) if r.get("context_activations") is not None else None
            focus = r["context_focus"]
        else:  # an analysis from before per-token values: the firing token alone is known
            tokens = [r["context_before"], r["token"], r["context_after"]]
            values, focus = None, 1
        out.append(
            {
                "rank": r["rank"],
                "activation": rounded([r["activation"]])[0],
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
        "histogram": {"low": _num(r["hist_low"]), "high": _num(r["hist_high"]), "counts": r["hist_counts"]},
        "fire_rate_by_role": dict(zip(roles, rounded([np.nan if v is None else v for v in roles.values()]))),
        "rows_by_role": denominators.get("rows_by_role"),
        "fire_rate_by_position": rounded(r["fire_rate_by_position"]),
        "position_edges": denominators.get("position_edges"),
    }


def _neighbours(rows: list[dict], own: str) -> dict:
    same = [{"feature": r["neighbour"], "cosine": rounded([r["cosine"]])[0]} for r in rows if r["sae"] == own]
    other = [
        {"sae": r["sae"], "feature": r["neighbour"], "cosine": rounded([r["cosine"]])[0]}
        for r in rows
        if r["sae"] != own
    ]
    return {"same": same, "other": other}


def _logits(rows: list[dict]) -> dict | None:
    if not rows:
        return None
    r = rows[0]

    def side(kind):
        return [
            {"token": t, "token_id": i, "value": v}
            for t, i, v in zip(r[f"{kind}_tokens"], r[f"{kind}_token_ids"], rounded(r[f"{kind}_values"]))
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
