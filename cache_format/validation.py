"""What a writer accepts: rows, residuals, meta and sequence records are checked before anything is written.

Every refusal is one UserError line saying what to pass instead.
"""

from __future__ import annotations

import numpy as np

from . import commits
from .bf16 import to_bits
from .errors import UserError
from .layout import ROW_COLUMNS


def check_json(obj, what: str) -> None:
    try:
        commits.dumps(obj)
    except (TypeError, ValueError) as e:
        raise UserError(
            f"{what} must be JSON-serializable ({e}); pass plain dicts, lists, str, int, float, bool"
        ) from None


def int_column(x, dtype: str, what: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise UserError(f"{what}: expected a 1-D array, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise UserError(f"{what}: expected integers, got {a.dtype}")
    out = a.astype(dtype)
    if a.size and not np.array_equal(out, a):
        raise UserError(f"{what}: values do not fit {dtype}")
    return out


def check_rows(n_expected, tokens, seq_ids, positions, labels, roles) -> dict[str, np.ndarray]:
    cols = {"tokens": tokens, "seq_ids": seq_ids, "positions": positions, "labels": labels, "roles": roles}
    out = {}
    for name, x in cols.items():
        if x is None:
            if name in ("labels", "roles"):
                out[name] = np.full(n_expected, -1 if name == "labels" else 0, np.int8)
                continue
            raise UserError(f"append: {name} is required (one value per residual row)")
        out[name] = int_column(x, ROW_COLUMNS[name], name)
        if len(out[name]) != n_expected:
            raise UserError(
                f"append: {name} has {len(out[name])} rows but the residuals have {n_expected}; pass one value per row"
            )
    if out["roles"].size and (out["roles"].min() < 0 or out["roles"].max() > 3):
        raise UserError("append: roles must be 0 text, 1 prompt, 2 thinking or 3 answer")
    if out["labels"].size and (out["labels"].min() < -1 or out["labels"].max() > 1):
        raise UserError("append: labels must be 1 correct, 0 wrong or -1 none")
    return out


def residual_bits(residuals, layers: list[int], d: int, what: str = "append") -> tuple[dict, int]:
    if not isinstance(residuals, dict):
        raise UserError(f"{what}: residuals must be a dict {{layer: N×d_model bf16}}")
    got = {int(k) for k in residuals}
    if got != set(layers):
        missing, extra = sorted(set(layers) - got), sorted(got - set(layers))
        raise UserError(
            f"{what}: residuals must cover exactly layers {layers}"
            + (f"; missing {missing}" if missing else "")
            + (f"; not in the cache {extra}" if extra else "")
            + (" (add a layer with add_layer first)" if extra else "")
        )
    out, n = {}, None
    for k, x in residuals.items():
        bits = to_bits(x, f"residuals[{k}]")
        if bits.ndim != 2 or bits.shape[1] != d:
            raise UserError(
                f"{what}: residuals[{k}] has shape {tuple(bits.shape)} but the cache's d_model is {d}; "
                "d_model mismatch: append to a cache made for this model"
            )
        if n is not None and len(bits) != n:
            raise UserError(f"{what}: layers have different row counts ({n} vs {len(bits)})")
        n = len(bits)
        out[int(k)] = bits
    return out, n or 0


def refuse_duplicates(cols: dict) -> None:
    """A (seq_id, position) pair locates one row: a segment holding one twice is refused."""
    pairs = np.stack([cols["seq_ids"].astype(np.int64), cols["positions"].astype(np.int64)], axis=1)
    if not len(pairs):
        return
    uniq, counts = np.unique(pairs, axis=0, return_counts=True)
    if len(uniq) != len(pairs):
        sid, pos = uniq[np.argmax(counts > 1)]
        raise UserError(
            f"append: row (seq_id {int(sid)}, position {int(pos)}) was appended twice "
            "to one segment; each (seq_id, position) must be one row (nothing was committed)"
        )
