"""Loss recovered: splice an SAE into the model at its layer and measure what the model loses.

Three forward passes per batch over the same held-out token ids:

- clean: the model as it is;
- sae: the output of decoder layer L (resid_post, what the cache stores) replaced by the
  SAE's reconstruction of it;
- zero: that output replaced by zeros (zero-ablation).

loss_recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean): 1 when the SAE is as good as
the real residual, 0 when it is no better than deleting it. KL(clean ‖ sae) and
KL(clean ‖ zero) are means per predicted token, in nats. CE is the mean next-token
cross-entropy over every position but the last of each sequence, all positions spliced.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cache_format.errors import UserError
from train.sae import TopKSAE


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


def sae_reconstruct(sae: TopKSAE):
    """A hook function that reconstructs hidden states (B, T, D) through `sae`, in float32."""

    def fn(h: torch.Tensor) -> torch.Tensor:
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


def _next_token_logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


@torch.no_grad()
def loss_recovered(
    model: torch.nn.Module,
    layer_module: torch.nn.Module,
    sae: TopKSAE,
    sequences: Iterable[np.ndarray],
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, float]:
    """CE clean / with the SAE / zero-ablated, loss recovered and KL to clean, over `sequences`.

    `layer_module` is the decoder layer whose output the SAE reconstructs; `sequences` are
    token-id arrays (the held-out sequences of a cache).
    """
    sequences = list(sequences)
    device = next(model.parameters()).device
    sae = sae.to(device).eval()
    sums = dict(ce_clean=0.0, ce_sae=0.0, ce_zero=0.0, kl_sae=0.0, kl_zero=0.0)
    n_tok = 0
    total = sum(max(len(s) - 1, 0) for s in sequences)
    if total == 0:
        raise UserError("no held-out sequence has two or more tokens; raise analysis.loss_sequences or use a larger cache")
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="loss recovered", disable=not progress, file=None)
    for ids in _batches(sequences, batch_size):
        ids = ids.to(device)
        target = ids[:, 1:].reshape(-1)
        clean = _next_token_logprobs(model, ids)
        with replace_output(layer_module, sae_reconstruct(sae)):
            spliced = _next_token_logprobs(model, ids)
        with replace_output(layer_module, zero_ablate):
            zeroed = _next_token_logprobs(model, ids)
        p_clean = clean.exp()
        for name, lp in (("clean", clean), ("sae", spliced), ("zero", zeroed)):
            sums[f"ce_{name}"] += float(F.nll_loss(lp.reshape(-1, lp.shape[-1]), target, reduction="sum"))
        sums["kl_sae"] += float((p_clean * (clean - spliced)).sum())
        sums["kl_zero"] += float((p_clean * (clean - zeroed)).sum())
        n_tok += target.numel()
        bar.update(target.numel())
    bar.close()
    out = {name: v / n_tok for name, v in sums.items()}
    gap = out["ce_zero"] - out["ce_clean"]
    out["loss_recovered"] = (out["ce_zero"] - out["ce_sae"]) / gap if gap != 0 else math.nan
    out["tokens"] = n_tok
    out["sequences"] = len(sequences)
    return out
