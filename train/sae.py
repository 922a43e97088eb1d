"""The TopK sparse autoencoder: one screen, sae_lens / `000_*` card names and orientation.

Parameters are float32: W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,).
Inputs are mapped to (x - input_mean) / input_scale before encoding and the reconstruction is
mapped back, so a normalized SAE still takes and returns raw residuals (identity by default;
`folded()` bakes the mapping into the weights for export). `relu=False, subtract_b_dec=False`
is the Qwen-Scope (`003_*`) convention; `000`/`001`/sae_lens subtract b_dec and apply ReLU.

Training speed lives in `train.kernels` (fused top-k encoder, sparse decoder with hand-written
backward); this module stays the readable reference that inference and splicing use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TopKSAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int, *, relu: bool = True, subtract_b_dec: bool = True):
        super().__init__()
        if not 0 < k < d_sae:
            raise ValueError(f"k={k} must be between 1 and d_sae-1={d_sae - 1}")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.relu, self.subtract_b_dec = relu, subtract_b_dec
        W_dec = torch.randn(d_sae, d_in)
        W_dec /= W_dec.norm(dim=1, keepdim=True)  # unit-norm decoder rows
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())  # tied init
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_mean", torch.zeros(d_in))
        self.register_buffer("input_scale", torch.ones(d_in))
        self.cfg: dict = {}  # free-form metadata: layer, hook, fingerprint, model, split, ...

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations (N, d_sae) of raw inputs."""
        xn = (x.float() - self.input_mean) / self.input_scale
        if self.subtract_b_dec:
            xn = xn - self.b_dec
        return xn @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(top_vals (N, k), top_idx (N, k) int64), unsorted within a row."""
        vals, idx = self.pre_acts(x).topk(self.k, dim=-1, sorted=False)
        return (F.relu(vals) if self.relu else vals), idx

    def decode(self, vals: Tensor, idx: Tensor) -> Tensor:
        """(N, d_in) reconstruction in the input space; a sparse sum over the k active rows."""
        xn = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals.to(self.W_dec.dtype), mode="sum")
        return (xn + self.b_dec) * self.input_scale + self.input_mean

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(*self.encode(x))

    def dense(self, x: Tensor) -> Tensor:
        """(N, d_sae) codes, zeros outside the top k."""
        vals, idx = self.encode(x)
        return torch.zeros(vals.shape[0], self.d_sae, dtype=vals.dtype, device=vals.device).scatter_(1, idx, vals)

    @torch.no_grad()
    def folded(self) -> TopKSAE:
        """An equivalent SAE with identity normalization: it takes raw residuals directly."""
        m, s = self.input_mean, self.input_scale
        out = TopKSAE(self.d_in, self.d_sae, self.k, relu=self.relu, subtract_b_dec=self.subtract_b_dec)
        out.W_enc.copy_(self.W_enc / s[:, None])
        out.W_dec.copy_(self.W_dec * s[None, :])
        out.b_dec.copy_(self.b_dec * s + m)
        # with b_dec subtracted the mean rides in b_dec; otherwise it moves into b_enc
        out.b_enc.copy_(self.b_enc if self.subtract_b_dec else self.b_enc - (m / s) @ self.W_enc)
        out.cfg = dict(self.cfg)
        return out

    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Keep only the gradient component orthogonal to each (unit) decoder row."""
        if self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            g -= (g * w).sum(dim=1, keepdim=True) * w

    def weights(self) -> dict[str, Tensor]:
        """The plain state dict of the `000_*` card: W_enc, b_enc, W_dec, b_dec."""
        return {n: getattr(self, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimizing the summed Euclidean distance to rows of x."""
    x = x.float()
    y = x.mean(dim=0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(dim=0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-8):
            return y_new
        y = y_new
    return y
