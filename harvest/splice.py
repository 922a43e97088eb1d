"""What an SAE does inside the model: splice it in and measure what the model loses (loss
recovered), and read each of its features through the model's output (logit effects). Both
need the model, so they live on the harvest side.

Loss recovered: three forward passes per batch over the same held-out token ids:

- clean: the model as it is;
- sae: the output of decoder layer L (resid_post, what the cache stores) replaced by the
  SAE's reconstruction of it;
- zero: that output replaced by zeros (zero-ablation).

loss_recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean): 1 when the SAE is as good as
the real residual, 0 when it is no better than deleting it. KL(clean ‖ sae) and
KL(clean ‖ zero) are means per predicted token, in nats. CE is the mean next-token
cross-entropy over every position but the last of each sequence, all positions spliced.

Logit effects: each decoder row read through the model's final norm and its unembedding,
giving the output tokens a feature promotes and suppresses (the "logit lens" of a feature, as
SAE dashboards show it). Train's browser reads the result, `<sae>/logit_effects.parquet`, one
row per feature:

| column | meaning |
|---|---|
| `feature` | latent index |
| `top_token_ids`, `top_tokens`, `top_values` | the `LOGIT_TOP` most promoted tokens (decoded) and their logits |
| `bottom_token_ids`, `bottom_tokens`, `bottom_values` | the `LOGIT_TOP` most suppressed |
| `hist_low`, `hist_high`, `hist_counts` | a histogram of the logits over the whole vocabulary |

Features go through in chunks (a 65k × 248k logit matrix does not fit anywhere), on the
model's device: a GPU for the 27B.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cache_format.errors import UserError
from cache_format.split import is_heldout
from train.sae import SAE


@contextlib.contextmanager
def replace_output(layer_module: torch.nn.Module, fn) -> Iterator[None]:
    """Replace a decoder layer's hidden-state output by fn(hidden) while inside the block."""

    def hook(_module, _args, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        return fn(output)

    handle = layer_module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def sae_reconstruct(sae: SAE):
    """A hook function that reconstructs hidden states (B, T, D) through `sae`, in float32."""

    def fn(h: torch.Tensor) -> torch.Tensor:
        if sae.W_enc.device != h.device:  # device_map="auto" may put layer L on another GPU
            sae.to(h.device)
        flat = h.reshape(-1, h.shape[-1])
        return sae(flat.float()).to(h.dtype).reshape(h.shape)

    return fn


def zero_ablate(h: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(h)


def _batches(sequences: list[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    """Equal-length sequences batched together, so no padding ever enters the model."""
    by_len: dict[int, list[np.ndarray]] = defaultdict(list)
    for s in sequences:
        if len(s) >= 2:
            by_len[len(s)].append(np.asarray(s, dtype=np.int64))
    for n in sorted(by_len):
        group = by_len[n]
        for i in range(0, len(group), batch_size):
            yield torch.from_numpy(np.stack(group[i : i + batch_size]))


POSITION_CHUNK = 512  # positions turned into float log-probs at a time: bounds memory at vocab 248k


def _head(model: torch.nn.Module):
    """(decoder stack, LM head) when the model exposes them, so logits are made chunk by chunk:
    full logits of one 33k-token rollout over a 248k vocabulary are 16 GB in bf16."""
    base, head = getattr(model, "base_model", None), model.get_output_embeddings()
    if base is None or base is model or head is None:
        return None
    return base, head


def _final(model: torch.nn.Module, parts, ids: torch.Tensor) -> torch.Tensor:
    """What predicts each next token: final hidden states (B, T-1, d), or logits without a head split."""
    if parts is None:
        return model(input_ids=ids, use_cache=False).logits[:, :-1]
    return parts[0](input_ids=ids, use_cache=False).last_hidden_state[:, :-1]


def _ce_and_kl(parts, clean: torch.Tensor, other: torch.Tensor, target: torch.Tensor) -> tuple[float, float, float]:
    """(CE of clean, CE of other, KL(clean ‖ other)) summed over positions, chunk by chunk."""
    head = (lambda h: h) if parts is None else parts[1]
    ce_c = ce_o = kl = 0.0
    for a in range(0, clean.shape[1], POSITION_CHUNK):
        lc = F.log_softmax(head(clean[:, a : a + POSITION_CHUNK]).float(), dim=-1)
        lo = F.log_softmax(head(other[:, a : a + POSITION_CHUNK]).float(), dim=-1)
        t = target[:, a : a + POSITION_CHUNK].reshape(-1)
        ce_c += float(F.nll_loss(lc.reshape(-1, lc.shape[-1]), t, reduction="sum"))
        ce_o += float(F.nll_loss(lo.reshape(-1, lo.shape[-1]), t, reduction="sum"))
        kl += float((lc.exp() * (lc - lo)).sum())
    return ce_c, ce_o, kl


@torch.no_grad()
def loss_recovered(
    model: torch.nn.Module,
    layer_module: torch.nn.Module,
    sae: SAE,
    sequences: Iterable[np.ndarray],
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, float]:
    """CE clean / with the SAE / zero-ablated, loss recovered and KL to clean, over `sequences`.

    `layer_module` is the decoder layer whose output the SAE reconstructs; `sequences` are
    token-id arrays (the held-out sequences of a cache).
    """
    sequences = list(sequences)
    device = next(model.parameters()).device  # where the embeddings (and so the input ids) live
    sae = sae.eval()
    sums = dict(ce_clean=0.0, ce_sae=0.0, ce_zero=0.0, kl_sae=0.0, kl_zero=0.0)
    n_tok = 0
    total = sum(max(len(s) - 1, 0) for s in sequences)
    if total == 0:
        raise UserError(
            "no held-out sequence has two or more tokens; raise analysis.loss_sequences or use a larger cache"
        )
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="loss recovered", disable=not progress, file=None)
    parts = _head(model)
    for ids in _batches(sequences, batch_size):
        ids = ids.to(device)
        target = ids[:, 1:]
        # At most two hidden-state tensors live at once (the clean one and the current spliced
        # one); logits exist only POSITION_CHUNK positions at a time.
        clean = _final(model, parts, ids)
        for name, fn in (("sae", sae_reconstruct(sae)), ("zero", zero_ablate)):
            with replace_output(layer_module, fn):
                other = _final(model, parts, ids)
            ce_c, ce_o, kl = _ce_and_kl(parts, clean, other.to(clean.device), target.to(clean.device))
            del other
            sums[f"ce_{name}"] += ce_o
            sums[f"kl_{name}"] += kl
        sums["ce_clean"] += ce_c
        del clean
        n_tok += target.numel()
        bar.update(target.numel())
    bar.close()
    out = {name: v / n_tok for name, v in sums.items()}
    gap = out["ce_zero"] - out["ce_clean"]
    out["loss_recovered"] = (out["ce_zero"] - out["ce_sae"]) / gap if gap != 0 else math.nan
    out["tokens"] = n_tok
    out["sequences"] = len(sequences)
    return out


# ---------------------------------------------------------------------------------------
# on a cache's held-out sequences, for `python -m harvest loss-recovered` (cli.py)


def heldout_sequences(cache, seed: int, fraction: float, limit: int) -> list[np.ndarray]:
    """Token ids of the first `limit` held-out sequences (the SAE's split), in cache order."""
    table = cache.sequences()
    if table.num_rows == 0:
        raise UserError(f"{cache.url} has no sequences table with token ids; loss recovered needs whole sequences")
    seq = table.column("seq_id").to_numpy()
    held = np.flatnonzero(is_heldout(seq, seed, fraction))[:limit]
    if len(held) == 0:
        raise UserError(
            f"no held-out sequences in {cache.url} (split seed {seed}, fraction {fraction}); "
            "use a larger cache or --set train.heldout_fraction=0.1"
        )
    col = table.column("token_ids")
    return [np.asarray(col[int(i)].values.to_numpy(zero_copy_only=False), dtype=np.int64) for i in held]


def check_model_matches_cache(model_name: str, cache) -> None:
    recorded = ((cache.meta or {}).get("model") or {}).get("name_or_path")
    if recorded and recorded != model_name:
        raise UserError(
            f"{cache.url} was harvested from {recorded!r} but model.name_or_path is {model_name!r}; "
            f"pass --set model.name_or_path='\"{recorded}\"' (or the matching --profile)"
        )


def sae_targets(cfg, sae_path, out_dir):
    """[(name, sae source path, where loss_recovered.json goes or None)]."""
    from pathlib import Path

    if sae_path:
        return [(Path(sae_path).name, Path(sae_path), Path(out_dir) if out_dir else None)]
    from train.outdir import run_saes

    run_dir = Path(out_dir or cfg.train.out)
    return [(s["name"], s["dir"], s["dir"]) for s in run_saes(run_dir)]


# ---------------------------------------------------------------------------------------
# logit effects, for `python -m harvest logit-effects` (cli.py)

LOGIT_TOP = 10  # promoted and suppressed tokens kept per feature
FEATURE_CHUNK = 512  # decoder rows turned into logits at a time
HIST_BINS = 32
LOGIT_EFFECTS_FILE = "logit_effects.parquet"


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
    top: int = LOGIT_TOP,
    chunk: int = FEATURE_CHUNK,
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
