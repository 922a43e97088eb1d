"""Training kernels: one fused TopK autoencoder pass with a hand-written sparse backward.

Why: a TopK SAE's gradient is sparse. Only k pre-activations per row receive a gradient, so
the encoder's weight gradient is x^T @ G and the decoder's is Z^T @ dy, with G and Z holding
N*k non-zeros. Autograd would form dense (N, d_sae) matrices; sparsify materializes (N, k, d_in)
outer products. Here both are computed as `embedding_bag` over the active entries sorted by
latent (one sort, shared by the two), the gradient of the codes is one sampled dot product per
active entry, and the only dense product left is the forward encoder matmul.

AuxK is different: k_aux (d_in/2) entries per row among the dead latents are a dense block,
not a sparse one, so the pass also returns the dead latents' pre-activations (N, n_dead) and
the AuxK reconstruction is an ordinary dense matmul on that compact block. Its gradient flows
back into the encoder too, so dead latents' encoder columns move (sparsify's fused encoder
drops that gradient).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks")


def _by_latent(idx: Tensor, d_sae: int) -> tuple[Tensor, Tensor, Tensor]:
    """Entries of a row-sparse (N, k) pattern grouped by latent: (order, token of each, bag offsets)."""
    flat = idx.reshape(-1)
    order = torch.argsort(flat.to(torch.int32), stable=True)  # stable: deterministic; int32 sorts ~2x faster
    counts = torch.bincount(flat, minlength=d_sae)
    offsets = torch.zeros(d_sae, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    token = torch.div(order, idx.shape[1], rounding_mode="floor")
    return order, token, offsets


def _transposed_product(order, token, offsets, weights: Tensor, dense: Tensor) -> Tensor:
    """Z^T @ dense (d_sae, d) for the sparse Z with entries `weights`, as one embedding_bag."""
    return F.embedding_bag(token, dense, offsets, mode="sum", per_sample_weights=weights.reshape(-1)[order])


def _entry_dots(idx: Tensor, g: Tensor, W: Tensor) -> Tensor:
    """<g[n], W[idx[n, j]]> for every entry: a sampled matmul over the (N, d_sae) pattern."""
    n, k = idx.shape
    crow = torch.arange(0, n * k + 1, k, device=idx.device)
    pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), torch.zeros(n * k, device=idx.device, dtype=g.dtype),
                                      size=(n, W.shape[0]))
    return torch.sparse.sampled_addmm(pattern, g, W.T).values().view(n, k)


class _TopKAutoencode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, W_dec, k, relu, subtract_b_dec, dead, low_precision):
        bias = b_enc - b_dec @ W_enc if subtract_b_dec else b_enc
        if low_precision:
            pre = torch.addmm(bias.to(torch.bfloat16), x.to(torch.bfloat16), W_enc.to(torch.bfloat16)).float()
        else:
            pre = torch.addmm(bias, x, W_enc)
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        pre_dead = pre.index_select(1, dead) if dead is not None else pre.new_empty(x.shape[0], 0)
        del pre
        if relu:
            vals = F.relu(vals)
        recon = F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")
        ctx.save_for_backward(x, W_enc, b_dec, W_dec, vals, idx, dead if dead is not None else idx.new_empty(0))
        ctx.relu, ctx.subtract_b_dec = relu, subtract_b_dec
        ctx.mark_non_differentiable(idx)
        return recon, vals, idx, pre_dead

    @staticmethod
    def backward(ctx, g_recon, g_vals, _g_idx, g_dead):
        x, W_enc, b_dec, W_dec, vals, idx, dead = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        order, token, offsets = _by_latent(idx, d_sae)
        g_W_dec = None
        gv = torch.zeros_like(vals) if g_vals is None else g_vals.clone()
        if g_recon is not None:
            g_recon = g_recon.contiguous()
            gv += _entry_dots(idx, g_recon, W_dec)
            g_W_dec = _transposed_product(order, token, offsets, vals, g_recon)
        if ctx.relu:
            gv *= vals > 0
        colsum = torch.zeros(d_sae, device=x.device, dtype=gv.dtype).index_add_(0, idx.reshape(-1), gv.reshape(-1))
        g_W_enc = _transposed_product(order, token, offsets, gv, x).T.contiguous()  # (d_in, d_sae)
        if g_dead is not None and dead.numel():
            g_W_enc.index_add_(1, dead, x.T @ g_dead)
            colsum.index_add_(0, dead, g_dead.sum(0))
        g_b_dec = None
        if ctx.subtract_b_dec:
            g_W_enc.sub_(torch.outer(b_dec, colsum))
            g_b_dec = -(W_enc @ colsum)
        return None, g_W_enc, colsum, g_b_dec, g_W_dec, None, None, None, None, None


def topk_autoencode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, W_dec: Tensor, k: int, *,
                    relu: bool = True, subtract_b_dec: bool = True, dead: Tensor | None = None,
                    low_precision: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(recon without b_dec, top vals, top idx, pre-activations of the `dead` latent ids).

    x is already normalized; with `subtract_b_dec` the pre-activation is (x - b_dec) @ W_enc + b_enc.
    `low_precision` runs the matmul in bf16 (GPU autocast); parameters and grads stay fp32.
    """
    return _TopKAutoencode.apply(x, W_enc, b_enc, b_dec, W_dec, k, relu, subtract_b_dec, dead, low_precision)


def auxk_reconstruction(pre_dead: Tensor, dead: Tensor, W_dec: Tensor, k_aux: int, relu: bool = True) -> Tensor:
    """sum over the top k_aux dead latents of act * decoder row, as a dense product on the dead block."""
    vals, local = pre_dead.topk(min(k_aux, pre_dead.shape[1]), dim=-1, sorted=False)
    if relu:
        vals = F.relu(vals)
    codes = torch.zeros_like(pre_dead).scatter(1, local, vals)
    return codes @ W_dec.index_select(0, dead)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, idx, W_dec):
        ctx.save_for_backward(vals, idx, W_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g_out):
        vals, idx, W_dec = ctx.saved_tensors
        g_out = g_out.contiguous()
        g_vals = _entry_dots(idx, g_out, W_dec) if ctx.needs_input_grad[0] else None
        g_W = None
        if ctx.needs_input_grad[2]:
            g_W = _transposed_product(*_by_latent(idx, W_dec.shape[0]), vals, g_out)
        return g_vals, None, g_W


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j vals[n, j] * W_dec[idx[n, j]] (no bias), with the sparse backward."""
    return _SparseDecode.apply(vals, idx, W_dec)
