"""One SAE's training state and its step: TopK + AuxK, Adam, warmup + cosine, clipping.

`SAETrainer.step(x)` is the whole training step on a float32 batch of raw residuals (forward,
AuxK, backward, cross-rank gradient sum, parallel-gradient removal, clipping, Adam, decoder
renormalization, dead counters). The run loop (`train.run`) and the benchmarks call it as is.

Loss (per batch): fvu = sum ||x - x_hat||^2 / sum ||x - mean||^2, plus aux_alpha * the AuxK
loss: the squared error of the residual e = x - x_hat as reconstructed from the top k_aux dead
latents. `aux_norm` says what that error is divided by:

- "residual" (default, OpenAI's `sparse_autoencoder`): sum ||e - mean(e)||^2, the variance of
  the error it predicts, so the aux loss stays O(1) however small the residual has become.
- "total" (EleutherAI sparsify): the batch's total variance sum ||x - mean||^2, times
  min(n_dead / k_aux, 1). As the fit improves the residual shrinks and so does this loss, so
  dead latents get less and less pull; measured here it recovers fewer planted features.

A latent is dead when it has not fired for `dead_tokens` tokens. With several ranks, the
variances and the gradients are summed across ranks, so N ranks take the step one process
would on the global batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cache_format.errors import UserError

from . import dist
from .config import AUX_NORMS
from .kernels import topk_autoencode
from .sae import TopKSAE, geometric_median


def default_lr(d_sae: int) -> float:
    """sparsify's width-scaled rule: 2e-4 at 2^14 latents, scaled by 1/sqrt(width)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


def lr_at(step: int, peak: float, floor: float, warmup: int, total: int) -> float:
    """Linear warmup to `peak`, then cosine decay to `floor` at `total` steps."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - warmup, 1)
    t = min(max(step - warmup, 0) / span, 1.0)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


class SAETrainer:
    def __init__(
        self,
        sae: TopKSAE,
        *,
        lr: float = 0.0,
        lr_min: float | None = None,
        warmup_steps: int = 0,
        total_steps: int = 1,
        k_aux: int | None = None,
        aux_alpha: float = 1 / 32,
        dead_tokens: int = 10_000_000,
        grad_clip: float = 1.0,
        low_precision: bool | None = None,
        aux_norm: str = "residual",
    ):
        if aux_norm not in AUX_NORMS:
            raise ValueError(f"aux_norm={aux_norm!r}: pick one of {AUX_NORMS}")
        self.sae, self.aux_norm = sae, aux_norm
        self.peak_lr = lr or default_lr(sae.d_sae)
        self.lr_min = self.peak_lr if lr_min is None else min(lr_min, self.peak_lr)
        self.warmup_steps, self.total_steps = warmup_steps, max(total_steps, 1)
        self.k_aux = sae.d_in // 2 if not k_aux else k_aux
        self.aux_alpha, self.dead_tokens, self.grad_clip = aux_alpha, dead_tokens, grad_clip
        dev = sae.W_enc.device
        self.low_precision = dev.type == "cuda" if low_precision is None else low_precision
        self.params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
        self.opt = torch.optim.Adam(
            self.params, lr=self.peak_lr, betas=(0.9, 0.999), eps=1e-8, fused=dev.type in ("cpu", "cuda")
        )
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.int64, device=dev)  # tokens since last fired
        self.steps = 0
        self.tokens = 0

    @torch.no_grad()
    def init_from_sample(self, x: Tensor, normalize: bool = False) -> None:
        """b_dec at the geometric median of a sample; optionally a scale to mean norm sqrt(d_in)."""
        sae = self.sae
        x = x.float().to(sae.W_enc.device)
        if normalize:
            scale = x.norm(dim=1).mean() / math.sqrt(sae.d_in)
            sae.input_scale.fill_(float(scale))
        xn = (x - sae.input_mean) / sae.input_scale
        sae.b_dec.copy_(geometric_median(xn))

    def dead_mask(self) -> Tensor:
        return self.since_fired >= self.dead_tokens

    def step(self, x: Tensor) -> dict[str, float]:
        """One optimizer step on x (N, d_in) float32 raw residuals; returns the step's scalars."""
        sae = self.sae
        xn = (x - sae.input_mean) / sae.input_scale
        n_local = xn.shape[0]
        dead = self.dead_mask().nonzero().squeeze(1)
        n_dead = int(dead.numel())
        recon, vals, idx, aux_recon = topk_autoencode(
            xn,
            sae.W_enc,
            sae.b_enc,
            sae.b_dec,
            sae.W_dec,
            sae.k,
            relu=sae.relu,
            subtract_b_dec=sae.subtract_b_dec,
            dead=dead if n_dead else None,
            k_aux=self.k_aux,
            low_precision=self.low_precision,
        )
        err = xn - (recon + sae.b_dec)
        total_var = self._total_variance(xn.detach())
        fvu = err.pow(2).sum() / total_var
        loss = fvu
        aux = torch.zeros((), device=x.device)
        if n_dead:
            e = err.detach()
            sq = (aux_recon - e).pow(2).sum()
            if self.aux_norm == "residual":
                aux = (sq / self._total_variance(e)).nan_to_num(0.0)
            else:
                aux = min(n_dead / self.k_aux, 1.0) * sq / total_var
            loss = loss + self.aux_alpha * aux

        for p in self.params:
            p.grad = None
        loss.backward()
        dist.all_reduce_sum([p.grad for p in self.params])
        sae.remove_parallel_decoder_grad()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        lr = lr_at(self.steps, self.peak_lr, self.lr_min, self.warmup_steps, self.total_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        sae.set_decoder_norm_to_unit()

        with torch.no_grad():
            fired = torch.zeros(sae.d_sae, dtype=torch.int64, device=x.device)
            fired.index_add_(0, idx.reshape(-1), (vals.reshape(-1) > 0).long())
            n_global = torch.tensor([n_local], dtype=torch.int64, device=x.device)
            dist.all_reduce_sum([fired, n_global])
            n_global = int(n_global)
            self.since_fired += n_global
            self.since_fired[fired > 0] = 0
        self.steps += 1
        self.tokens += n_global
        return {
            "loss": float(loss.detach()),
            "fvu": float(fvu.detach()),
            "aux_loss": float(aux.detach()),
            "dead": n_dead,
            "lr": lr,
        }

    @staticmethod
    def _total_variance(xn: Tensor) -> Tensor:
        """sum ||x - mean||^2 over the global batch (summed moments across ranks)."""
        if dist.world_size() == 1:
            return (xn - xn.mean(dim=0)).pow(2).sum()
        xd = xn.double()
        n = torch.tensor([xd.shape[0]], dtype=torch.float64, device=xn.device)
        s = xd.sum(dim=0)
        sq = xd.pow(2).sum().reshape(1)
        dist.all_reduce_sum([n, s, sq])
        return (sq - s.pow(2).sum() / n).squeeze().float()

    def state_dict(self) -> dict:
        return {
            "sae": self.sae.state_dict(),
            "opt": self.opt.state_dict(),
            "since_fired": self.since_fired,
            "steps": self.steps,
            "tokens": self.tokens,
            "peak_lr": self.peak_lr,
            "aux_norm": self.aux_norm,
        }

    def load_state_dict(self, state: dict) -> None:
        """Refuses a state trained with another AuxK normalization (older states were "total")."""
        saved = state.get("aux_norm", "total")
        if saved != self.aux_norm:
            raise UserError(
                f"this checkpoint was trained with train.aux_norm={saved!r}, not {self.aux_norm!r}; "
                f"resume with --set train.aux_norm='{saved}' or pass --fresh"
            )
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.since_fired.copy_(state["since_fired"])
        self.steps, self.tokens = int(state["steps"]), int(state["tokens"])
