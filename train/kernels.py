"""Training kernels: one fused TopK autoencoder pass with a hand-written sparse backward.

Why: a TopK SAE's gradient is sparse. Only k pre-activations per row receive a gradient, so
the encoder's weight gradient is x^T @ G and the decoder's is Z^T @ dy, with G and Z holding
N*k non-zeros. Autograd would form dense (N, d_sae) matrices; sparsify materializes (N, k, d_in)
outer products. Here both are computed as `embedding_bag` over the active entries sorted by
latent (one sort, shared by the two), the gradient of the codes is one sampled dot product per
active entry, and the only dense product left is the forward encoder matmul.

AuxK is sparse the same way: the top k_aux (d_in/2) pre-activations among the dead latents
are taken in the same pass (the encoder runs with the dead latents' columns first, so theirs
are a leading slice of every row), decoded with the same embedding_bag, and their entries join
the main ones in the one sort of the backward. Nothing in the step is (N, n_dead) dense beyond
that top-k, so its cost stays flat as the dead fraction grows. The AuxK gradient reaches the
dead latents' encoder columns and decoder rows (sparsify's fused encoder drops the former).
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
    pattern = torch.sparse_csr_tensor(
        crow, idx.reshape(-1), torch.zeros(n * k, device=idx.device, dtype=g.dtype), size=(n, W.shape[0])
    )
    return torch.sparse.sampled_addmm(pattern, g, W.T).values().view(n, k)


class _TopKAutoencode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, W_dec, k, relu, subtract_b_dec, dead, k_aux, low_precision):
        bias = b_enc - b_dec @ W_enc if subtract_b_dec else b_enc
        n_dead = 0 if dead is None else dead.numel()
        ka = min(k_aux, n_dead)
        W, perm = W_enc, None
        if ka:  # encode with the dead latents' columns first: their pre-activations are one slice
            perm = _dead_first(dead, W_enc.shape[1])
            W, bias = W_enc.index_select(1, perm), bias.index_select(0, perm)
        if low_precision:
            pre = torch.addmm(bias.to(torch.bfloat16), x.to(torch.bfloat16), W.to(torch.bfloat16)).float()
        else:
            pre = torch.addmm(bias, x, W)
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        if ka:
            idx = perm[idx]
            aux_vals, local = pre[:, :n_dead].topk(ka, dim=-1, sorted=False)
            aux_idx = dead[local]
        else:
            aux_vals, aux_idx = vals.new_empty(x.shape[0], 0), idx.new_empty(x.shape[0], 0)
        del pre
        if relu:
            vals, aux_vals = F.relu(vals), F.relu(aux_vals)
        recon = F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")
        aux_recon = (
            F.embedding_bag(aux_idx, W_dec, per_sample_weights=aux_vals, mode="sum")
            if ka
            else recon.new_zeros(recon.shape)
        )
        ctx.save_for_backward(x, W_enc, b_dec, W_dec, vals, idx, aux_vals, aux_idx)
        ctx.relu, ctx.subtract_b_dec = relu, subtract_b_dec
        ctx.mark_non_differentiable(idx)
        return recon, vals, idx, aux_recon

    @staticmethod
    def backward(ctx, g_recon, g_vals, _g_idx, g_aux):
        x, W_enc, b_dec, W_dec, vals, idx, aux_vals, aux_idx = ctx.saved_tensors
        n, k = idx.shape
        d_sae = W_enc.shape[1]
        gv = torch.zeros_like(vals) if g_vals is None else g_vals.clone()
        if g_recon is not None:
            g_recon = g_recon.contiguous()
            gv += _entry_dots(idx, g_recon, W_dec)
        if g_aux is None or aux_idx.shape[1] == 0:  # the AuxK entries carry no gradient
            aux_vals, aux_idx = aux_vals[:, :0], aux_idx[:, :0]
            g_aux = None
        ka = aux_idx.shape[1]
        if ka:
            g_aux = g_aux.contiguous()
            gav = _entry_dots(aux_idx, g_aux, W_dec)
        else:
            gav = aux_vals
        if ctx.relu:
            gv *= vals > 0
            gav = gav * (aux_vals > 0)
        # the k main and k_aux dead entries of each row, grouped by latent with one sort
        all_idx = torch.cat([idx, aux_idx], 1) if ka else idx
        order, token, offsets = _by_latent(all_idx, d_sae)
        g_all = torch.cat([gv, gav], 1) if ka else gv
        colsum = torch.zeros(d_sae, device=x.device, dtype=gv.dtype).index_add_(
            0, all_idx.reshape(-1), g_all.reshape(-1)
        )
        g_W_enc = _transposed_product(order, token, offsets, g_all, x).T.contiguous()  # (d_in, d_sae)
        g_W_dec = None
        if g_recon is not None or ka:
            # decoder rows: main entries pair with g_recon's rows, AuxK entries with g_aux's (rows n + N)
            dense = g_recon if g_recon is not None else x.new_zeros(x.shape)
            if ka:
                token = token + n * (torch.remainder(order, k + ka) >= k)
                dense = torch.cat([dense, g_aux])
            w_all = torch.cat([vals, aux_vals], 1) if ka else vals
            g_W_dec = _transposed_product(order, token, offsets, w_all, dense)
        g_b_dec = None
        if ctx.subtract_b_dec:
            g_W_enc.sub_(torch.outer(b_dec, colsum))
            g_b_dec = -(W_enc @ colsum)
        return None, g_W_enc, colsum, g_b_dec, g_W_dec, None, None, None, None, None, None


def _dead_first(dead: Tensor, d_sae: int) -> Tensor:
    """A permutation of the latent ids with the `dead` ones first (then the live ones, in order).

    Encoding with W_enc's columns in this order makes the dead latents' pre-activations a
    leading slice of each row, so their top-k needs no (N, n_dead) gather: the one copy is of
    W_enc's columns (d_in x d_sae, far smaller than N x n_dead at batch 4096).
    """
    live = torch.ones(d_sae, dtype=torch.bool, device=dead.device)
    live[dead] = False
    return torch.cat([dead, live.nonzero().squeeze(1)])


def topk_autoencode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    W_dec: Tensor,
    k: int,
    *,
    relu: bool = True,
    subtract_b_dec: bool = True,
    dead: Tensor | None = None,
    k_aux: int = 0,
    low_precision: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(recon without b_dec, top vals, top idx, AuxK recon from the top k_aux of the `dead` latent ids).

    x is already normalized; with `subtract_b_dec` the pre-activation is (x - b_dec) @ W_enc + b_enc.
    The AuxK recon (zeros without dead latents) has no b_dec either: it predicts the residual error.
    `low_precision` runs the encoder matmul in bf16 (GPU autocast); parameters and grads stay fp32.
    """
    return _TopKAutoencode.apply(x, W_enc, b_enc, b_dec, W_dec, k, relu, subtract_b_dec, dead, k_aux, low_precision)


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
