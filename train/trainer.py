"""One SAE's training state and its step: the kind's loss, Adam, warmup + cosine, clipping.

`SAETrainer.step(x)` is the whole training step on a float32 batch of raw residuals: the kind's
loss (`SAE.loss`, a pure function in train.sae), backward, cross-rank gradient sum,
parallel-gradient removal and decoder renormalization (kinds with unit decoder rows),
clipping (jumprelu and relu: in SAELens' units, `_max_grad_norm`), Adam, the BatchTopK
threshold update and the dead counters. The run loop (`train.run`) and the benchmarks call it
as is.

AuxK (topk, batchtopk, matryoshka) adds aux_alpha × the squared error of the residual
e = x - x_hat as reconstructed from the top k_aux dead latents. `aux_norm` says what that error
is divided by:

- "residual" (default, OpenAI's `sparse_autoencoder`): sum ||e - mean(e)||^2, the variance of
  the error it predicts, so the aux loss stays O(1) however small the residual has become.
- "total" (EleutherAI sparsify): the batch's total variance sum ||x - mean||^2, times
  min(n_dead / k_aux, 1). As the fit improves the residual shrinks and so does this loss, so
  dead latents get less and less pull; measured here it recovers fewer planted features.

The coefficient kinds (jumprelu, relu) add sparsity_coefficient × their sparsity term instead,
the coefficient rising linearly from 0 over `sparsity_warmup_steps` (as SAELens does).

A latent is dead when it has not fired for `dead_tokens` tokens. With several ranks, the
variances and the gradients are summed across ranks, so N ranks take the step one process
would on the global batch; BatchTopK selects within each rank's share (as SAELens does per
device) and averages the threshold's batch statistic across ranks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cache_format.errors import UserError

from . import dist
from .config import AUX_NORMS
from .sae import SAE, BatchTopKSAE, StepInput, default_k_aux, geometric_median


def default_lr(d_sae: int) -> float:
    """sparsify's width-scaled rule: 2e-4 at 2^14 latents, scaled by 1/sqrt(width)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


def lr_at(step: int, peak: float, floor: float, warmup: int, total: int, decay: int = 0) -> float:
    """Linear warmup to `peak`, cosine decay to `floor` by step `total - decay`, then (SAELens'
    `lr_decay_steps`) linear to 0 over the last `decay` steps: settling the weights at the end
    of a short run at a high lr lifts its held-out VE."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    end = total - decay
    span = max(end - warmup, 1)
    t = min(max(step - warmup, 0) / span, 1.0)
    lr = floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))
    return lr * min(1.0, (total - step) / decay) if decay else lr


class SAETrainer:
    def __init__(
        self,
        sae: SAE,
        *,
        lr: float = 0.0,
        lr_min: float | None = None,
        warmup_steps: int = 0,
        total_steps: int = 1,
        lr_decay_steps: int = 0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        k_aux: int = 0,
        aux_alpha: float = 1 / 32,
        dead_tokens: int = 10_000_000,
        grad_clip: float = 1.0,
        low_precision: bool | None = None,
        aux_norm: str = "residual",
        sparsity_coefficient: float = 0.0,
        sparsity_warmup_steps: int = 0,
    ):
        if aux_norm not in AUX_NORMS:
            raise ValueError(f"aux_norm={aux_norm!r}: pick one of {AUX_NORMS}")
        self.sae, self.aux_norm = sae, aux_norm
        self.peak_lr = lr or default_lr(sae.d_sae)
        self.lr_min = self.peak_lr if lr_min is None else min(lr_min, self.peak_lr)
        self.warmup_steps, self.total_steps = warmup_steps, max(total_steps, 1)
        self.lr_decay_steps = lr_decay_steps
        self.k_aux = k_aux or default_k_aux(sae.d_in)
        self.aux_alpha, self.dead_tokens, self.grad_clip = aux_alpha, dead_tokens, grad_clip
        self.sparsity_coefficient, self.sparsity_warmup_steps = sparsity_coefficient, sparsity_warmup_steps
        dev = sae.W_enc.device
        self.low_precision = dev.type == "cuda" if low_precision is None else low_precision
        self.params = sae.trainable()
        self.opt = torch.optim.Adam(
            self.params, lr=self.peak_lr, betas=adam_betas, eps=1e-8, fused=dev.type in ("cpu", "cuda")
        )
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.int64, device=dev)  # tokens since last fired
        self.steps = 0
        self.tokens = 0

    @torch.no_grad()
    def init_from_sample(self, x: Tensor, normalize: bool = False) -> None:
        """b_dec at the geometric median of a sample (kinds with `median_b_dec`); optionally a scale
        to mean norm sqrt(d_in)."""
        sae = self.sae
        x = x.float().to(sae.W_enc.device)
        if normalize:
            scale = x.norm(dim=1).mean() / math.sqrt(sae.d_in)
            sae.input_scale.fill_(float(scale))
        if sae.median_b_dec:
            sae.b_dec.copy_(geometric_median(sae.normalize(x)))

    def dead_mask(self) -> Tensor:
        return self.since_fired >= self.dead_tokens

    def coefficient(self) -> float:
        """This step's sparsity coefficient: linear from 0 over the warmup, as SAELens."""
        warm = self.sparsity_warmup_steps
        return self.sparsity_coefficient * (min(1.0, self.steps / warm) if warm else 1.0)

    def step(self, x: Tensor) -> dict[str, float]:
        """One optimizer step on x (N, d_in) float32 raw residuals; returns the step's scalars."""
        sae = self.sae
        dead = self.dead_mask().nonzero().squeeze(1)
        coefficient = self.coefficient()
        variances = []  # the loss's batch variance, for clipping in per-token units

        def variance(xn: Tensor) -> Tensor:
            variances.append(self._total_variance(xn))
            return variances[-1]

        out = sae.loss(
            x,
            StepInput(
                dead=dead,
                k_aux=self.k_aux,
                aux_alpha=self.aux_alpha,
                aux_norm=self.aux_norm,
                sparsity_coefficient=coefficient,
                low_precision=self.low_precision,
                variance=variance,
            ),
        )
        for p in self.params:
            p.grad = None
        out.loss.backward()
        dist.all_reduce_sum([p.grad for p in self.params])
        if sae.unit_decoder:
            sae.remove_parallel_decoder_grad()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self._max_grad_norm(x, variances), foreach=True)
        lr = lr_at(self.steps, self.peak_lr, self.lr_min, self.warmup_steps, self.total_steps, self.lr_decay_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        sae.project()

        with torch.no_grad():
            codes = out.codes
            fired = sae.fired(codes).round().long()
            counts = torch.stack([torch.tensor(x.shape[0], device=x.device), codes.l0.sum().round().long()])
            dist.all_reduce_sum([fired, counts])
            n_global, active = int(counts[0]), int(counts[1])
            self.since_fired += n_global
            self.since_fired[fired > 0] = 0
            if isinstance(sae, BatchTopKSAE):
                sae.update_threshold(self._smallest_selected(codes.vals[codes.vals > 0]))
        self.steps += 1
        self.tokens += n_global
        scalars = {"loss": float(out.loss.detach()), "fvu": float(out.fvu.detach())}
        if sae.revives_dead:
            scalars["aux_loss"] = float(out.aux.detach())
        else:
            scalars.update(sparsity_loss=float(out.aux.detach()), sparsity_coefficient=coefficient)
        return {**scalars, "l0": active / n_global, "dead": int(dead.numel()), "lr": lr}

    def _max_grad_norm(self, x: Tensor, variances: list[Tensor]) -> float:
        """grad_clip in the loss's units, or for `clips_per_token_objective` kinds in SAELens':
        the loss here is SAELens' per-token objective divided by the batch's variance per token
        v, so clipping that objective's gradient at grad_clip is clipping this one at grad_clip / v
        (v ≈ 10 on the planted-feature bench: a clip at 1.0 here would be one at 10 there)."""
        if not (self.sae.clips_per_token_objective and variances):
            return self.grad_clip
        rows = torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device)
        dist.all_reduce_sum([rows])
        return self.grad_clip * float(rows) / max(float(variances[0]), torch.finfo(torch.float32).tiny)

    @staticmethod
    def _smallest_selected(vals: Tensor) -> float:
        """The batch's smallest selected activation, averaged over the ranks that selected any."""
        s = torch.tensor([float(vals.min()) if vals.numel() else 0.0, float(vals.numel() > 0)], dtype=torch.float64)
        dist.all_reduce_sum([s])
        return float(s[0] / s[1]) if s[1] else 0.0

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
        """Tensors and plain scalars and strings only (the checkpoint format needs no pickle)."""
        return {
            "sae": self.sae.state_dict(),
            "opt": self.opt.state_dict(),
            "since_fired": self.since_fired,
            "steps": self.steps,
            "tokens": self.tokens,
            "peak_lr": self.peak_lr,
            "aux_norm": self.aux_norm,
            "architecture": self.sae.architecture,
        }

    @torch.no_grad()
    def _moments_in_parameter_layout(self) -> None:
        """Lay Adam's moments out as their parameters: the fused step pairs the three element by
        element in memory, so a moment that comes back transposed (a checkpoint of a run whose
        W_enc was stored column-major) would be applied to the wrong weights."""
        for p in self.params:
            for k, v in self.opt.state.get(p, {}).items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    self.opt.state[p][k] = torch.empty_like(p).copy_(v)

    def load_state_dict(self, state: dict) -> None:
        """Refuses a state trained with another AuxK normalization (older states were "total")."""
        saved = state.get("aux_norm", "total")
        if saved != self.aux_norm:
            raise UserError(
                f"this checkpoint was trained with train.aux_norm={saved!r}, not {self.aux_norm!r}; "
                f"resume with --set train.aux_norm='{saved}' or pass --fresh"
            )
        kind = state.get("architecture", "topk")
        if kind != self.sae.architecture:
            raise UserError(
                f"this checkpoint holds a {kind} SAE, not {self.sae.architecture}; "
                f"resume with --set train.architecture='{kind}' or pass --fresh"
            )
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self._moments_in_parameter_layout()
        self.since_fired.copy_(state["since_fired"])
        self.steps, self.tokens = int(state["steps"]), int(state["tokens"])
