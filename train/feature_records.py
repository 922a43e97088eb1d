"""One feature's record for the browser: its metrics, its top contexts token by token, its
profile, its decoder neighbours and its logit effects, as JSON-ready dicts (numbers rounded
as shown, NaN as null). The server answers `/api/feature/...` with one; the static export
stores them in blocks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .feature_stats import is_healthy

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
