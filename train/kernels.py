"""Training kernels: one fused sparse-autoencoder pass with a hand-written sparse backward.

Why: a sparse SAE's gradient is sparse. Only the active pre-activations receive a gradient,
so the encoder's weight gradient is x^T @ G and the decoder's is Z^T @ dy, with G and Z holding
as many non-zeros as there are active codes. Autograd would form dense (N, d_sae) matrices
(SAELens does); sparsify materializes (N, k, d_in) outer products. Here both are computed as
`embedding_bag` over the active entries sorted by latent (one sort, shared by the two), the
gradient of the codes is one sampled dot product per active entry, and the only dense product
left is the forward encoder matmul.

Every kind runs through the same pass; only the rule that picks the active codes differs
(`Select.rule`):

- "topk": the k largest pre-activations of each row;
- "batchtopk": the k × N largest of the whole batch (BatchTopK, Matryoshka). Exact, and cheap:
  each row's top few × k candidates first, widened for a row whose candidates were all taken;
- "threshold": every pre-activation above θ (ReLU: θ = 0; JumpReLU: a learned θ per latent).
  With a `bandwidth`, θ gets the straight-through gradient of the step function through a
  rectangle kernel of that width (Rajamanoharan et al. 2024), from the reconstruction and
  from the L0 count `Codes.l0`; the pre-activations get none from the step (as DeepMind's).

AuxK is sparse the same way: the top k_aux pre-activations among the dead latents are taken in
the same pass (the encoder runs with the dead latents' columns first, so theirs are a leading
slice of every row), decoded with the same embedding_bag, and their entries join the main ones
in the one sort of the backward, so its cost stays flat as the dead fraction grows.

Matryoshka's nested prefixes (`Select.groups`) decode each group's entries into its own block
of the output; the loss sums the blocks into prefixes, so the gradient each entry sees is the
sum over the prefixes that contain it, at no extra cost in the backward.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks")


# The threshold rule's codes are as dense as the pre-activations make them (half of them early
# in training); above this share of active entries the pass runs dense matmuls instead.
DENSE_ABOVE = 0.05


class Select(NamedTuple):
    """How a pass picks the active codes, and what else it computes."""

    rule: str  # "topk" | "batchtopk" | "threshold"
    k: int = 0  # topk: per row; batchtopk: per row on average over the batch
    relu: bool = True  # codes are relu(pre) (the Qwen-Scope TopK convention keeps negatives)
    subtract_b_dec: bool = True  # pre = (x - b_dec) @ W_enc + b_enc, else x @ W_enc + b_enc
    k_aux: int = 0  # AuxK: the top k_aux dead latents of each row
    groups: tuple[int, ...] = ()  # matryoshka: the prefix sizes below d_sae; one recon block per group
    bandwidth: float = 0.0  # threshold: the STE's rectangle width; 0 = θ gets no gradient
    dense_above: float = DENSE_ABOVE  # threshold: above this share of active codes, dense matmuls are faster
    low_precision: bool = False  # the encoder matmul in bf16 (GPU autocast's path); grads stay fp32


class Codes(NamedTuple):
    """One pass's output. Entries are grouped by row (by group, then row, for Matryoshka); a
    threshold pass that ran dense (`DENSE_ABOVE`) has none, its per-latent sums say it all."""

    recon: Tensor  # (N, d_in), or (groups, N, d_in) one block per group; without b_dec
    vals: Tensor  # (E,) the active codes
    cols: Tensor  # (E,) their latents
    rows: Tensor  # (E,) their rows
    aux_recon: Tensor  # (N, d_in) AuxK's reconstruction of the residual; zeros without dead latents
    l0: Tensor  # (d_sae,) active rows per latent; its gradient reaches θ (threshold rule with a bandwidth)
    mass: Tensor  # (d_sae,) the sum of each latent's codes over the batch (differentiable: an L1 term)


def sparse_autoencode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    W_dec: Tensor,
    select: Select,
    *,
    theta: Tensor | None = None,
    dead: Tensor | None = None,
) -> Codes:
    """The codes of normalized rows x and their decoding, differentiable in every weight (and θ).

    The threshold rule without θ is plain ReLU (θ = 0, no straight-through band)."""
    if theta is None and (select.rule != "threshold" or select.bandwidth):
        theta = x.new_zeros(())
    return Codes(*_SparseAutoencode.apply(x, W_enc, b_enc, b_dec, W_dec, theta, select, dead))


class _SparseAutoencode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, W_dec, theta, s: Select, dead):
        n, d_sae = x.shape[0], W_enc.shape[1]
        bias = b_enc - b_dec @ W_enc if s.subtract_b_dec else b_enc
        n_dead = 0 if dead is None else dead.numel()
        ka = min(s.k_aux, n_dead)
        W, perm = W_enc, None
        if ka:  # encode with the dead latents' columns first: their pre-activations are one slice
            perm = _dead_first(dead, d_sae)
            W, bias = W_enc.index_select(1, perm), bias.index_select(0, perm)
        if s.low_precision:
            pre = torch.addmm(bias.to(torch.bfloat16), x.to(torch.bfloat16), W.to(torch.bfloat16)).float()
        else:
            pre = torch.addmm(bias, x, W)
        empty = x.new_zeros(0, dtype=torch.int64)
        band_rows = band_cols = band_count = empty
        if s.rule == "topk":
            vals, cols = pre.topk(s.k, dim=-1, sorted=False)
            vals, cols = vals.reshape(-1), cols.reshape(-1)
            rows = torch.arange(n, device=x.device).repeat_interleave(s.k)
        elif s.rule == "batchtopk":
            vals, cols, rows = _batch_topk(pre, s.k * n)
        elif s.rule == "threshold" and theta is None:  # plain ReLU: the codes are pre, clipped in place
            z = pre.relu_()
            if s.dense_above < 1:
                on = torch.sign(z)  # the active mask as 0/1 floats (see _dense_forward)
                l0 = x.new_ones(n) @ on
                if float(l0.sum()) > s.dense_above * on.numel():
                    return _dense_forward(ctx, x, W_enc, b_dec, W_dec, theta, z, on, s, l0=l0)
                del on
            rows, cols = z.nonzero(as_tuple=True)
            vals = z[rows, cols]
        elif s.rule == "threshold":  # one dense pass finds the active codes and those in the STE's band
            near = pre > (theta - s.bandwidth / 2 if s.bandwidth else theta)
            if s.dense_above < 1 and int(near.count_nonzero()) > s.dense_above * near.numel():
                del near
                on = torch.gt(pre, theta, out=torch.empty_like(pre))
                return _dense_forward(ctx, x, W_enc, b_dec, W_dec, theta, pre, on, s)
            rows, cols = near.nonzero(as_tuple=True)
            del near
            vals = pre[rows, cols]
            if s.bandwidth:
                t = theta[cols] if theta.dim() else theta
                band = (vals - t).abs() < s.bandwidth / 2
                band_rows, band_cols = rows[band], cols[band]
                band_count = torch.bincount(band_cols, minlength=d_sae)
                on = vals > t
                rows, cols, vals = rows[on], cols[on], vals[on]
        else:
            raise ValueError(f"unknown selection rule {s.rule!r}")
        if ka:
            cols = perm[cols]
            aux_vals, local = pre[:, :n_dead].topk(ka, dim=-1, sorted=False)
            aux_cols = dead[local]
        else:
            aux_vals, aux_cols = vals.new_empty(n, 0), cols.new_empty(n, 0)
        del pre
        if s.relu:
            vals, aux_vals = F.relu(vals), F.relu(aux_vals)
        n_bags = n
        if s.groups:  # Matryoshka: each entry decodes into the block of its latent's group
            bag = torch.bucketize(cols, torch.tensor(s.groups, device=cols.device), right=True) * n + rows
            order = torch.argsort(bag, stable=True)
            vals, cols, rows, bag = vals[order], cols[order], rows[order], bag[order]
            n_bags = n * (len(s.groups) + 1)
            counts = torch.bincount(bag, minlength=n_bags)
        elif s.rule == "topk":
            counts = torch.full((n,), s.k, dtype=torch.int64, device=x.device)
        else:
            counts = torch.bincount(rows, minlength=n)
        crow = torch.zeros(n_bags + 1, dtype=torch.int64, device=x.device)
        torch.cumsum(counts, 0, out=crow[1:])
        recon = F.embedding_bag(cols, W_dec, crow[:-1], per_sample_weights=vals, mode="sum")
        if s.groups:
            recon = recon.view(len(s.groups) + 1, n, -1)
        aux_recon = (
            F.embedding_bag(aux_cols, W_dec, per_sample_weights=aux_vals, mode="sum") if ka else x.new_zeros(x.shape)
        )
        l0 = torch.bincount(cols[vals > 0], minlength=d_sae).to(x.dtype)
        mass = torch.bincount(cols, weights=vals, minlength=d_sae).to(x.dtype)
        ctx.save_for_backward(
            x, W_enc, b_dec, W_dec, theta, vals, cols, rows, crow, aux_vals, aux_cols, band_rows, band_cols, band_count
        )
        ctx.s, ctx.dense = s, False
        ctx.mark_non_differentiable(cols, rows)
        return recon, vals, cols, rows, aux_recon, l0, mass

    @staticmethod
    def backward(ctx, g_recon, g_vals, _g_cols, _g_rows, g_aux, g_l0, g_mass):
        if ctx.dense:
            return _dense_backward(ctx, g_recon, g_l0, g_mass)
        x, W_enc, b_dec, W_dec, theta, vals, cols, rows, crow, aux_vals, aux_cols, band_rows, band_cols, band_count = (
            ctx.saved_tensors
        )
        s: Select = ctx.s
        n, d_in, d_sae = x.shape[0], x.shape[1], W_enc.shape[1]
        dense = None if g_recon is None else g_recon.reshape(-1, d_in).contiguous()
        gv = torch.zeros_like(vals) if g_vals is None else g_vals.clone()
        if g_mass is not None:
            gv += g_mass[cols]
        if dense is not None:
            gv += _entry_dots(crow, cols, dense, W_dec)
        ka = aux_cols.shape[1]
        if g_aux is None or ka == 0:  # the AuxK entries carry no gradient
            aux_vals, aux_cols, ka = aux_vals[:, :0], aux_cols[:, :0], 0
        if ka:
            aux_crow = torch.arange(0, n * ka + 1, ka, device=x.device)
            gav = _entry_dots(aux_crow, aux_cols.reshape(-1), g_aux.contiguous(), W_dec).view(n, ka)
        else:
            gav = aux_vals
        if s.relu:
            gv *= vals > 0
            gav = gav * (aux_vals > 0)
        g_theta = None
        if s.rule == "threshold" and s.bandwidth:  # the step's straight-through gradient reaches θ only
            g_theta = torch.zeros(d_sae, dtype=x.dtype, device=x.device)
            if dense is not None and band_cols.numel():
                band_crow = torch.zeros(n + 1, dtype=torch.int64, device=x.device)
                torch.cumsum(torch.bincount(band_rows, minlength=n), 0, out=band_crow[1:])
                g_theta.index_add_(0, band_cols, _entry_dots(band_crow, band_cols, dense, W_dec))
                g_theta *= -theta / s.bandwidth
            if g_l0 is not None:
                g_theta -= g_l0 * band_count / s.bandwidth
            g_theta = g_theta.sum_to_size(theta.shape)
        # the main and AuxK entries, grouped by latent with one sort. Each main entry's decoder
        # gradient row is its bag's (row, or group * N + row) of g_recon; AuxK's are g_aux's rows.
        n_main = dense.shape[0] if dense is not None else n
        if ka and s.rule == "topk" and not s.groups:  # per row: k main then k_aux AuxK entries
            k = s.k
            all_cols = torch.cat([cols.view(n, k), aux_cols], 1).reshape(-1)
            g_all = torch.cat([gv.view(n, k), gav], 1).reshape(-1)
            w_all = torch.cat([vals.view(n, k), aux_vals], 1).reshape(-1)
            token = torch.arange(n, device=x.device).repeat_interleave(k + ka)
            row_of = token + n_main * (torch.arange(k + ka, device=x.device) >= k).repeat(n)
        elif ka:
            aux_rows = torch.arange(n, device=x.device).repeat_interleave(ka)
            all_cols = torch.cat([cols, aux_cols.reshape(-1)])
            g_all, w_all = torch.cat([gv, gav.reshape(-1)]), torch.cat([vals, aux_vals.reshape(-1)])
            token = torch.cat([rows, aux_rows])
            row_of = torch.cat([_bag_of(crow), aux_rows + n_main])
        else:
            all_cols, g_all, w_all, token, row_of = cols, gv, vals, rows, _bag_of(crow)
        order, offsets = _by_latent(all_cols, d_sae)
        colsum = torch.zeros(d_sae, device=x.device, dtype=gv.dtype).index_add_(0, all_cols, g_all)
        g_enc_t = F.embedding_bag(token[order], x, offsets, mode="sum", per_sample_weights=g_all[order])
        g_W_dec = None
        if dense is not None or ka:
            rows_dense = dense if dense is not None else x.new_zeros(n, d_in)
            if ka:
                rows_dense = torch.cat([rows_dense, g_aux])
            g_W_dec = F.embedding_bag(row_of[order], rows_dense, offsets, mode="sum", per_sample_weights=w_all[order])
        g_b_dec = None
        if s.subtract_b_dec:  # W_enc multiplies x - b_dec
            g_enc_t.sub_(torch.outer(colsum, b_dec))
            g_b_dec = -(W_enc @ colsum)
        g_W_enc = g_enc_t.T if g_enc_t.T.stride() == W_enc.stride() else g_enc_t.T.contiguous()
        return None, g_W_enc, colsum, g_b_dec, g_W_dec, g_theta, None, None


def _dense_forward(ctx, x, W_enc, b_dec, W_dec, theta, pre, on, s: Select, l0=None):
    """The threshold rule with dense codes z = pre · on (on: 1.0 where pre > θ): five matmuls, as
    autograd's, and a few passes over the (N, d_sae) codes. The masks are floats, not booleans:
    multiplying or summing by a boolean mask converts it to a float copy first (on a CPU each
    such pass costs several of these), and the per-latent sums are products with a ones vector
    (a matrix-vector product reads the codes once, at the speed of the memory)."""
    ones = x.new_ones(x.shape[0])
    band = None
    if s.bandwidth:
        band = (pre - theta).abs_()
        torch.lt(band, s.bandwidth / 2, out=band)
    z = pre.mul_(on) if theta is not None else pre  # θ >= 0, so active codes are positive: no separate ReLU
    recon = z @ W_dec
    l0 = ones @ on if l0 is None else l0
    mass = ones @ z
    ctx.save_for_backward(x, W_enc, b_dec, W_dec, theta, z, on, band)
    ctx.s, ctx.dense = s, True
    empty = x.new_zeros(0, dtype=torch.int64)
    ctx.mark_non_differentiable(empty)
    return recon, x.new_zeros(0), empty, empty, x.new_zeros(x.shape), l0, mass


def _dense_backward(ctx, g_recon, g_l0, g_mass):
    x, W_enc, b_dec, W_dec, theta, z, on, band = ctx.saved_tensors
    s: Select = ctx.s
    ones = x.new_ones(x.shape[0])
    if g_recon is None:
        g_z = z.new_zeros(z.shape) if g_mass is None else g_mass.expand(z.shape).clone()
    else:  # the L1 term's gradient rides in as the product's bias: no extra pass
        g_z = g_recon @ W_dec.T if g_mass is None else torch.addmm(g_mass, g_recon, W_dec.T)
    g_theta = None
    if s.bandwidth:  # the step's straight-through gradient reaches θ only
        band_count = ones @ band
        g_theta = -(theta / s.bandwidth) * (ones @ band.mul_(g_z))  # band is not needed again
        if g_l0 is not None:
            g_theta -= g_l0 * band_count / s.bandwidth
        g_theta = g_theta.sum_to_size(theta.shape)
    g_pre = g_z.mul_(on)
    colsum = ones @ g_pre
    xc = x - b_dec if s.subtract_b_dec else x  # what W_enc multiplies
    g_W_enc = xc.T @ g_pre if W_enc.stride(1) == 1 else (g_pre.T @ xc).T  # in W_enc's layout
    g_W_dec = z.T @ g_recon if g_recon is not None else None
    g_b_dec = -(W_enc @ colsum) if s.subtract_b_dec else None
    return None, g_W_enc, colsum, g_b_dec, g_W_dec, g_theta, None, None


def _bag_of(crow: Tensor) -> Tensor:
    """The bag (row of the recon blocks) of every entry, from the bag offsets."""
    return torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())


def _by_latent(cols: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    """Entries grouped by latent: (their order, each latent's offset into it)."""
    order = torch.argsort(cols.to(torch.int32), stable=True)  # stable: deterministic; int32 sorts ~2x faster
    counts = torch.bincount(cols, minlength=d_sae)
    offsets = torch.zeros(d_sae, dtype=torch.int64, device=cols.device)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    return order, offsets


def _entry_dots(crow: Tensor, cols: Tensor, g: Tensor, W: Tensor) -> Tensor:
    """<g[row], W[col]> for every entry of a CSR pattern over g's rows: a sampled matmul."""
    if cols.numel() == 0:
        return g.new_zeros(0)
    pattern = torch.sparse_csr_tensor(
        crow, cols, torch.zeros(cols.numel(), device=g.device, dtype=g.dtype), size=(g.shape[0], W.shape[0])
    )
    return torch.sparse.sampled_addmm(pattern, g, W.T).values()


def _batch_topk(pre: Tensor, K: int) -> tuple[Tensor, Tensor, Tensor]:
    """The K largest entries of the (N, n) matrix, exactly: (vals, cols, rows) in row order.

    A flat top-K of N·n values is slow (seconds at 4096 × 16384 on a CPU). Each row's top c
    candidates first (c = 4 × K/N), then the top K of those, is exact for every row that kept
    some candidates out; a row whose c candidates were all taken may hold more above the cut t,
    so its entries ≥ t (t can only be below the true cut) join the candidates and the top K is
    taken again. One extra pass over those rows only, so early steps, when a few rows dominate
    the batch, cost little more.
    """
    n, m = pre.shape
    c = min(m, 4 * math.ceil(K / max(n, 1)))  # an empty batch (a rank's empty share) selects nothing
    cv, ci = pre.topk(c, dim=-1, sorted=False)
    vals, pos = cv.reshape(-1).topk(K, sorted=False)
    rows = torch.div(pos, c, rounding_mode="floor")
    cols = ci.reshape(-1)[pos]
    full = torch.bincount(rows, minlength=n) == c
    if c < m and bool(full.any()):
        t = vals.min()
        others = ~full[rows]
        sat = full.nonzero().squeeze(1)
        r, cols_s = (pre[sat] >= t).nonzero(as_tuple=True)
        rows_s = sat[r]
        cand_vals = torch.cat([vals[others], pre[rows_s, cols_s]])
        cand_rows, cand_cols = torch.cat([rows[others], rows_s]), torch.cat([cols[others], cols_s])
        vals, p = cand_vals.topk(K, sorted=False)
        rows, cols = cand_rows[p], cand_cols[p]
    order = torch.argsort(rows.to(torch.int32), stable=True)  # grouped by row (stable: deterministic)
    return vals[order], cols[order], rows[order]


def _dead_first(dead: Tensor, d_sae: int) -> Tensor:
    """A permutation of the latent ids with the `dead` ones first (then the live ones, in order).

    Encoding with W_enc's columns in this order makes the dead latents' pre-activations a
    leading slice of each row, so their top-k needs no (N, n_dead) gather: the one copy is of
    W_enc's columns (d_in x d_sae, far smaller than N x n_dead at batch 4096).
    """
    live = torch.ones(d_sae, dtype=torch.bool, device=dead.device)
    live[dead] = False
    return torch.cat([dead, live.nonzero().squeeze(1)])
