"""Training kernels: a fused top-k encoder and a sparse decoder with hand-written backwards.

Why: a TopK SAE's gradient is sparse. Only k (+ k_aux) pre-activations per row receive a
gradient, so the encoder's weight gradient is x^T @ G with G holding N*k non-zeros, and the
decoder's is Z^T @ dy with Z just as sparse. Autograd would form dense (N, d_sae) matrices
(or sparsify's (N, k, d_in) outer products); here both are one sparse-CSR matmul, the
decoder's input gradient is a sampled matmul (one dot product per active latent), and the
only dense product left is the forward encoder matmul.

`encode_topk` also selects the AuxK latents (top k_aux among dead latents) from the same
pre-activations, and their gradient flows back into the encoder, so that dead latents'
encoder rows move too (sparsify's fused encoder drops that gradient).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks")


def _transpose_csr(rows: int, idx: Tensor, vals: Tensor, d_sae: int) -> Tensor:
    """The (d_sae, rows) CSR matrix Z^T of a row-sparse Z given as (idx, vals), each (rows, k)."""
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # stable: tokens stay sorted within a latent
    counts = torch.bincount(flat, minlength=d_sae)
    crow = torch.zeros(d_sae + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=crow[1:])
    token = torch.div(order, idx.shape[1], rounding_mode="floor")
    return torch.sparse_csr_tensor(crow, token, vals.reshape(-1)[order], size=(d_sae, rows))


def _row_csr(idx: Tensor, d_sae: int, vals: Tensor | None = None) -> Tensor:
    n, k = idx.shape
    crow = torch.arange(0, n * k + 1, k, device=idx.device)
    v = torch.zeros(n * k, device=idx.device) if vals is None else vals.reshape(-1)
    return torch.sparse_csr_tensor(crow, idx.reshape(-1), v, size=(n, d_sae))


class _EncodeTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, relu, subtract_b_dec, dead, k_aux, low_precision):
        bias = b_enc - b_dec @ W_enc if subtract_b_dec else b_enc
        if low_precision:
            pre = torch.addmm(bias.to(torch.bfloat16), x.to(torch.bfloat16), W_enc.to(torch.bfloat16)).float()
        else:
            pre = torch.addmm(bias, x, W_enc)
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        if dead is not None and k_aux > 0:
            avals, aidx = pre.index_select(1, dead).topk(k_aux, dim=-1, sorted=False)
            aidx = dead[aidx]
        else:
            avals = pre.new_empty(x.shape[0], 0)
            aidx = torch.empty(x.shape[0], 0, dtype=torch.int64, device=x.device)
        del pre
        if relu:
            vals, avals = F.relu(vals), F.relu(avals)
        ctx.save_for_backward(x, W_enc, b_dec, vals, idx, avals, aidx)
        ctx.relu, ctx.subtract_b_dec = relu, subtract_b_dec
        ctx.mark_non_differentiable(idx, aidx)
        return vals, idx, avals, aidx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_avals, _g_aidx):
        x, W_enc, b_dec, vals, idx, avals, aidx = ctx.saved_tensors
        if g_vals is None:
            g_vals = torch.zeros_like(vals)
        if ctx.relu:
            g_vals = g_vals * (vals > 0)
        all_idx, all_g = idx, g_vals
        if aidx.shape[1] and g_avals is not None:
            if ctx.relu:
                g_avals = g_avals * (avals > 0)
            all_idx, all_g = torch.cat([idx, aidx], 1), torch.cat([g_vals, g_avals], 1)
        d_sae = W_enc.shape[1]
        colsum = torch.zeros(d_sae, device=x.device, dtype=all_g.dtype).index_add_(0, all_idx.reshape(-1), all_g.reshape(-1))
        g_W = (_transpose_csr(x.shape[0], all_idx, all_g, d_sae) @ x.float()).T  # (d_in, d_sae)
        g_bdec = None
        if ctx.subtract_b_dec:
            g_W = g_W - torch.outer(b_dec, colsum)
            g_bdec = -(W_enc @ colsum)
        return None, g_W, colsum, g_bdec, None, None, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, idx, W_dec):
        ctx.save_for_backward(vals, idx, W_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g_out):
        vals, idx, W_dec = ctx.saved_tensors
        g_out = g_out.contiguous()
        g_vals = g_W = None
        if ctx.needs_input_grad[0]:
            # one dot product per active latent: <g_out[n], W_dec[idx[n, j]]>
            g_vals = torch.sparse.sampled_addmm(_row_csr(idx, W_dec.shape[0]), g_out, W_dec.T).values().view_as(vals)
        if ctx.needs_input_grad[2]:
            g_W = _transpose_csr(vals.shape[0], idx, vals, W_dec.shape[0]) @ g_out
        return g_vals, None, g_W


def encode_topk(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, *, relu: bool = True,
                subtract_b_dec: bool = True, dead: Tensor | None = None, k_aux: int = 0,
                low_precision: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(vals, idx, aux_vals, aux_idx): the top k latents, and the top k_aux among `dead` (ids).

    x is already normalized; with `subtract_b_dec` the pre-activation is (x - b_dec) @ W_enc + b_enc.
    `low_precision` runs the matmul in bf16 (GPU autocast); parameters and grads stay fp32.
    """
    if dead is not None:
        k_aux = min(k_aux, int(dead.numel()))
    return _EncodeTopK.apply(x, W_enc, b_enc, b_dec, k, relu, subtract_b_dec, dead, k_aux, low_precision)


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j vals[n, j] * W_dec[idx[n, j]] (no bias), with a sparse backward."""
    return _SparseDecode.apply(vals, idx, W_dec)
