"""Logit effects of SAE features: each decoder row read through the model's final norm and its
unembedding, giving the output tokens a feature promotes and suppresses (the "logit lens" of a
feature, as SAE dashboards show it).

It needs the model, so it lives on the harvest side; train's browser reads the result,
`<sae>/logit_effects.parquet`, one row per feature:

| column | meaning |
|---|---|
| `feature` | latent index |
| `top_token_ids`, `top_tokens`, `top_values` | the TOP most promoted tokens (decoded one by one) and their logits |
| `bottom_token_ids`, `bottom_tokens`, `bottom_values` | the TOP most suppressed |
| `hist_low`, `hist_high`, `hist_counts` | a histogram of the logits over the whole vocabulary |

Features go through in chunks (a 65k × 248k logit matrix does not fit anywhere), on the
model's device: a GPU for the 27B.
"""

from __future__ import annotations

import numpy as np
import torch

from cache_format.errors import UserError

TOP = 10
CHUNK = 512
HIST_BINS = 32
FILENAME = "logit_effects.parquet"


def final_norm_and_head(model: torch.nn.Module, layers_path: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The final norm (beside the decoder layers, `norm` in HF decoders) and the unembedding."""
    parent = model.get_submodule(layers_path.rsplit(".", 1)[0]) if "." in layers_path else model
    norm = next((getattr(parent, n) for n in ("norm", "final_layernorm", "ln_f") if hasattr(parent, n)), None)
    head = model.get_output_embeddings()
    if norm is None or head is None:
        raise UserError(
            f"{type(model).__name__}: no final norm beside {layers_path} or no output embedding; "
            "logit effects need both"
        )
    return norm, head


@torch.no_grad()
def logit_effects(
    norm: torch.nn.Module,
    head: torch.nn.Module,
    w_dec: torch.Tensor,
    decode,
    top: int = TOP,
    chunk: int = CHUNK,
    bins: int = HIST_BINS,
    progress=None,
) -> dict[str, list | np.ndarray]:
    """The columns of `logit_effects.parquet` for decoder rows `w_dec` (d_sae, d_model);
    `decode(id) -> str` names a token."""
    p = next(head.parameters())
    out: dict[str, list] = {k: [] for k in ("top_token_ids", "top_values", "bottom_token_ids", "bottom_values")}
    lows, highs, counts = [], [], []
    for a in range(0, w_dec.shape[0], chunk):
        x = w_dec[a : a + chunk].to(device=p.device, dtype=p.dtype)
        logits = head(norm(x)).float()
        tv, ti = logits.topk(top, dim=1)
        bv, bi = logits.topk(top, dim=1, largest=False)
        lo, hi = logits.min(dim=1).values, logits.max(dim=1).values
        width = ((hi - lo) / bins).clamp_min(1e-12)
        b = ((logits - lo[:, None]) / width[:, None]).long().clamp_(0, bins - 1)
        h = torch.zeros(len(x), bins, device=logits.device).scatter_add_(1, b, torch.ones_like(logits))
        for k, v in (("top_token_ids", ti), ("top_values", tv), ("bottom_token_ids", bi), ("bottom_values", bv)):
            out[k].append(v.cpu().numpy())
        lows.append(lo.cpu().numpy())
        highs.append(hi.cpu().numpy())
        counts.append(h.cpu().numpy().astype(np.int64))
        if progress is not None:
            progress.update(len(x))
    cols: dict[str, list | np.ndarray] = {"feature": np.arange(w_dec.shape[0], dtype=np.int32)}
    for side in ("top", "bottom"):
        ids = np.concatenate(out[f"{side}_token_ids"]).astype(np.int32)
        cols[f"{side}_token_ids"] = ids
        cols[f"{side}_tokens"] = [[decode(int(i)) for i in row] for row in ids]
        cols[f"{side}_values"] = np.concatenate(out[f"{side}_values"]).astype(np.float32)
    cols["hist_low"] = np.concatenate(lows)
    cols["hist_high"] = np.concatenate(highs)
    cols["hist_counts"] = np.concatenate(counts).astype(np.int32)
    return cols


def write_logit_effects(path, cols: dict) -> None:
    """One zstd parquet file, written atomically, in small row groups (the browser reads a feature
    at a time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cache_format.stores.local import atomic_path

    def lists(values, typ):
        values = np.asarray(values)
        flat = pa.array(values.reshape(-1), typ)
        return pa.FixedSizeListArray.from_arrays(flat, values.shape[1]).cast(pa.list_(typ))

    arrays = {"feature": pa.array(cols["feature"])}
    for side in ("top", "bottom"):
        arrays[f"{side}_token_ids"] = lists(cols[f"{side}_token_ids"], pa.int32())
        arrays[f"{side}_tokens"] = pa.array(cols[f"{side}_tokens"], pa.list_(pa.string()))
        arrays[f"{side}_values"] = lists(cols[f"{side}_values"], pa.float32())
    arrays["hist_low"] = pa.array(cols["hist_low"], pa.float32())
    arrays["hist_high"] = pa.array(cols["hist_high"], pa.float32())
    arrays["hist_counts"] = lists(cols["hist_counts"], pa.int32())
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(arrays), tmp, compression="zstd", row_group_size=4096)
