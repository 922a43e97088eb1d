"""The reconstruction metrics, defined once (training validation, `train eval`, reports).

- variance_explained = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, the mean taken over
  the evaluated rows;
- mse = mean over elements of (x - x_hat)^2;
- l0 = mean number of active (non-zero) latents per token;
- dead_fraction = share of latents that never fired on the evaluated rows; alive = how many fired.

Streaming, in float64, and mergeable (across batches or ranks) with Chan's parallel update
(`cache_format.stats.merge_moments`, the one the cache's statistics use), so the result does
not depend on how the rows were batched.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cache_format.stats import merge_moments

METRIC_NAMES = ("variance_explained", "mse", "l0", "dead_fraction", "alive")


class ReconstructionMetrics:
    def __init__(self, d_sae: int):
        self.d_sae = d_sae
        self.n = 0
        self.mean = None  # per-dimension running mean of x (float64)
        self.m2 = None  # per-dimension sum of (x - mean)^2 (float64)
        self.sse = 0.0  # sum ||x - x_hat||^2
        self.active = 0  # total active latents
        self.fired = torch.zeros(d_sae, dtype=torch.bool)

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, vals: Tensor, idx: Tensor) -> None:
        """Add a batch: inputs, reconstructions, and the top-k codes (vals, idx) of `TopKSAE.encode`."""
        x = x.detach().double()
        nb = x.shape[0]
        if nb == 0:
            return
        self.sse += float((x - x_hat.detach().double()).pow(2).sum())
        bmean = x.mean(dim=0)
        bm2 = (x - bmean).pow(2).sum(dim=0)
        self.n, self.mean, self.m2 = merge_moments(self.n, self.mean, self.m2, nb, bmean.cpu(), bm2.cpu())
        on = vals.detach() != 0
        self.active += int(on.sum())
        self.fired[idx.detach()[on].cpu()] = True

    def merge(self, other: ReconstructionMetrics) -> None:
        """Fold in another accumulator (e.g. from another rank)."""
        self.n, self.mean, self.m2 = merge_moments(self.n, self.mean, self.m2, other.n, other.mean, other.m2)
        self.sse += other.sse
        self.active += other.active
        self.fired |= other.fired

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no rows were evaluated")
        d = self.mean.numel()
        alive = int(self.fired.sum())
        m2 = float(self.m2.sum())
        return {
            "variance_explained": 1.0 - self.sse / m2 if m2 > 0 else float("nan"),
            "mse": self.sse / (self.n * d),
            "l0": self.active / self.n,
            "dead_fraction": 1.0 - alive / self.d_sae,
            "alive": alive,
            "tokens": self.n,
        }
