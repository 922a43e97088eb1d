"""Sparse autoencoders, one class per kind (`train.architecture`), each with its training loss.

| kind | paper | codes | loss (besides the reconstruction) |
|---|---|---|---|
| topk | Gao et al. 2024 | the k largest pre-activations of a row | AuxK on dead latents |
| batchtopk | Bussmann, Leask, Nanda 2024 | the k × N largest of the batch; inference: JumpReLU at θ | AuxK |
| matryoshka | Bussmann et al. 2025 | as batchtopk | nested prefixes' reconstructions, AuxK |
| jumprelu | Rajamanoharan et al. 2024 | pre > θ (per latent, learned) | L0 penalty via a straight-through estimator |
| relu | Anthropic, April 2024 | relu(pre) | L1 of activation × decoder-row norm |

Shared by every kind (`SAE`): float32 parameters in SAELens' orientation, W_enc (d_in, d_sae),
b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,); inputs mapped to (x - input_mean) /
input_scale before encoding and back after decoding (`normalize`, identity by default;
`folded()` bakes it into the weights for export), so an SAE always takes raw residuals;
`encode(x)` → row-sparse codes (vals, idx) of shape (N, m), where an entry of value 0 is
padding (TopK's m is k, the others' the most active latents of any row in the batch);
`decode(vals, idx)`; `forward(x) = decode(encode(x))`; `dense(x)`, the (N, d_sae) codes.

`loss(x, step)` is the kind's training objective on a batch of raw rows: a pure function of the
SAE, the batch and `StepInput` (the dead latents, this step's coefficients) that returns the
reconstruction term, the auxiliary or sparsity term and the codes (`Loss`). It runs the fused
sparse kernel of `train.kernels`; `encode`/`decode` are the plain reference that inference,
evaluation and splicing use, and a test ties the two together. The reconstruction term is the
fraction of variance unexplained, Σ‖x − x̂‖² / Σ‖x − x̄‖² over the batch (summed across ranks).

`sparsity_coefficient` (jumprelu, relu) has SAELens 6's meaning and scale: SAELens minimizes
MSE + c · S per token (MSE summed over d_in, S the L0 or the norm-weighted L1); the loss here
is that same sum divided by the batch's variance per token, so the optimum and the trade-off
are the same for the same c on the same inputs (`normalize = true` is SAELens'
`normalize_activations = "expected_average_only_in"`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import Codes, Select, sparse_autoencode


def default_k_aux(d_in: int) -> int:
    """AuxK's dead latents per row when train.k_aux is 0: d_in / 2, as OpenAI, sparsify and SAELens."""
    return d_in // 2


def batch_variance(x: Tensor) -> Tensor:
    """Σ‖x − x̄‖² over the rows of one process's batch (the trainer sums it across ranks)."""
    return (x - x.mean(dim=0)).pow(2).sum()


@dataclass(frozen=True)
class StepInput:
    """What a step's loss reads besides the SAE and the batch."""

    dead: Tensor | None = None  # ids of the latents counted dead: the k kinds' AuxK revives them
    k_aux: int = 0  # AuxK's latents per row (the trainer resolves 0 with default_k_aux)
    aux_alpha: float = 1 / 32
    aux_norm: str = "residual"  # AuxK's error over the residual's variance (OpenAI) | "total" (sparsify)
    sparsity_coefficient: float = 0.0  # this step's (warmed-up) coefficient: jumprelu, relu
    low_precision: bool = False
    variance: Callable[[Tensor], Tensor] = field(default=batch_variance)


class Loss(NamedTuple):
    loss: Tensor  # what the step minimizes
    fvu: Tensor  # the whole dictionary's reconstruction, as a fraction of variance unexplained
    aux: Tensor  # AuxK's loss (k kinds, before aux_alpha), or the sparsity term as added (jumprelu, relu)
    codes: Codes  # the batch's sparse codes (train.kernels.Codes)


class SAE(nn.Module):
    """What every kind shares: parameters, normalization, the sparse decode, folding for export."""

    architecture: ClassVar[str]
    unit_decoder: ClassVar[bool] = True  # decoder rows renormalized after every step
    revives_dead: ClassVar[bool] = False  # AuxK on dead latents
    # grad_clip bounds the gradient of SAELens' per-token objective (the loss here times the
    # batch's variance per token), as SAELens clips: the coefficient kinds, whose L0 for a given
    # coefficient depends on the steps taken (train.trainer)
    clips_per_token_objective: ClassVar[bool] = False
    median_b_dec: ClassVar[bool] = True  # b_dec starts at the inputs' geometric median (train.trainer)

    def __init__(self, d_in: int, d_sae: int, *, subtract_b_dec: bool = True, decoder_norm: float = 1.0):
        super().__init__()
        self.d_in, self.d_sae, self.subtract_b_dec = d_in, d_sae, subtract_b_dec
        W_dec = torch.randn(d_sae, d_in)
        W_dec /= W_dec.norm(dim=1, keepdim=True)  # unit-norm decoder rows
        if decoder_norm != 1.0:
            W_dec *= decoder_norm
        self.W_dec = nn.Parameter(W_dec)
        # tied init, stored row-major: CPU's fused Adam steps a transposed parameter ~10x slower
        self.W_enc = nn.Parameter(W_dec.T.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_mean", torch.zeros(d_in))
        self.register_buffer("input_scale", torch.ones(d_in))
        self.cfg: dict = {}  # free-form metadata: layer, hook, fingerprint, model, split, ...

    def settings(self) -> dict:
        """The constructor's keywords besides d_in and d_sae (a copy is built from them)."""
        return {"subtract_b_dec": self.subtract_b_dec}

    def normalize(self, x: Tensor) -> Tensor:
        return (x.float() - self.input_mean) / self.input_scale

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations (N, d_sae) of raw inputs."""
        xn = self.normalize(x)
        if self.subtract_b_dec:
            xn = xn - self.b_dec
        return xn @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(vals (N, m), idx (N, m) int64): the active codes of each row, zeros as padding."""
        z = self.activation(self.pre_acts(x))
        m = max(1, int((z != 0).sum(dim=1).max())) if len(z) else 1
        return z.topk(min(m, self.d_sae), dim=-1, sorted=False)

    def activation(self, pre: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, vals: Tensor, idx: Tensor) -> Tensor:
        """(N, d_in) reconstruction in the input space; a sparse sum over the active rows."""
        xn = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals.to(self.W_dec.dtype), mode="sum")
        return (xn + self.b_dec) * self.input_scale + self.input_mean

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(*self.encode(x))

    def dense(self, x: Tensor) -> Tensor:
        """(N, d_sae) codes, zeros where inactive."""
        vals, idx = self.encode(x)
        return torch.zeros(vals.shape[0], self.d_sae, dtype=vals.dtype, device=vals.device).scatter_(1, idx, vals)

    def fired(self, codes: Codes) -> Tensor:
        """(d_sae,) how many rows of a training batch each latent fired on (the dead counters)."""
        return codes.l0

    def trainable(self) -> list[nn.Parameter]:
        """The parameters the optimizer steps, in a fixed order."""
        return [self.W_enc, self.b_enc, self.W_dec, self.b_dec]

    @torch.no_grad()
    def folded(self) -> SAE:
        """An equivalent SAE with identity normalization: it takes raw residuals directly.

        The pre-activations are unchanged, so thresholds carry over as they are.
        """
        m, s = self.input_mean, self.input_scale
        out = copy.deepcopy(self)
        out.W_enc.copy_(self.W_enc / s[:, None])
        out.W_dec.copy_(self.W_dec * s[None, :])
        out.b_dec.copy_(self.b_dec * s + m)
        # with b_dec subtracted the mean rides in b_dec; otherwise it moves into b_enc
        out.b_enc.copy_(self.b_enc if self.subtract_b_dec else self.b_enc - (m / s) @ self.W_enc)
        out.input_mean.zero_()
        out.input_scale.fill_(1.0)
        return out

    @torch.no_grad()
    def project(self) -> None:
        """After each optimizer step: restore the kind's constraints (unit decoder rows)."""
        if self.unit_decoder:
            self.set_decoder_norm_to_unit()

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
        """The plain state dict of the `000_*` card: W_enc, b_enc, W_dec, b_dec (+ the kind's own)."""
        return {n: getattr(self, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}

    def _pass(self, xn: Tensor, select: Select, step: StepInput, theta: Tensor | None = None) -> Codes:
        dead = step.dead if self.revives_dead and step.dead is not None and step.dead.numel() else None
        return sparse_autoencode(xn, self.W_enc, self.b_enc, self.b_dec, self.W_dec, select, theta=theta, dead=dead)


def _fvu_and_auxk(sae: SAE, x: Tensor, step: StepInput) -> Loss:
    """The loss of the kinds that select k codes (TopK per row, BatchTopK per batch): fvu plus
    `aux_alpha` times AuxK on the dead latents."""
    xn = sae.normalize(x)
    codes = sae._pass(xn, sae.select(step), step)
    err = xn - (codes.recon + sae.b_dec)
    total_var = step.variance(xn.detach())
    fvu = err.pow(2).sum() / total_var
    aux = _auxk(err, codes, step, total_var)
    return Loss(fvu + step.aux_alpha * aux, fvu, aux, codes)


def _auxk(err: Tensor, codes: Codes, step: StepInput, total_var: Tensor) -> Tensor:
    """AuxK: the dead latents' reconstruction of the residual error, normalized by `aux_norm`."""
    n_dead = 0 if step.dead is None else int(step.dead.numel())
    if not n_dead:
        return err.new_zeros(())
    e = err.detach()
    sq = (codes.aux_recon - e).pow(2).sum()
    if step.aux_norm == "residual":
        return (sq / step.variance(e)).nan_to_num(0.0)
    return min(n_dead / step.k_aux, 1.0) * sq / total_var


class TopKSAE(SAE):
    """TopK (+AuxK): the k largest pre-activations of each row. `relu=False, subtract_b_dec=False`
    is the Qwen-Scope (`003_*`) convention; `000`/`001`/SAELens subtract b_dec and apply ReLU."""

    architecture = "topk"
    revives_dead = True

    def __init__(self, d_in: int, d_sae: int, k: int, *, relu: bool = True, subtract_b_dec: bool = True):
        if not 0 < k < d_sae:
            raise ValueError(f"k={k} must be between 1 and d_sae-1={d_sae - 1}")
        super().__init__(d_in, d_sae, subtract_b_dec=subtract_b_dec)
        self.k, self.relu = k, relu

    def settings(self) -> dict:
        return {"k": self.k, "relu": self.relu, "subtract_b_dec": self.subtract_b_dec}

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(top_vals (N, k), top_idx (N, k) int64), unsorted within a row."""
        vals, idx = self.pre_acts(x).topk(self.k, dim=-1, sorted=False)
        return (F.relu(vals) if self.relu else vals), idx

    def select(self, step: StepInput) -> Select:
        return Select(
            "topk", self.k, self.relu, self.subtract_b_dec, k_aux=step.k_aux, low_precision=step.low_precision
        )

    loss = _fvu_and_auxk


class BatchTopKSAE(SAE):
    """BatchTopK: the k × N largest pre-activations of the whole batch, so a row may use more or
    fewer than k latents; AuxK as TopK. Inference is a JumpReLU with one threshold θ for every
    latent: the running mean of each training batch's smallest selected activation (the mean
    of all batches so far for the first 1/threshold_lr, then an exponential average)."""

    architecture = "batchtopk"
    revives_dead = True

    def __init__(self, d_in: int, d_sae: int, k: int, *, threshold_lr: float = 0.01):
        if not 0 < k < d_sae:
            raise ValueError(f"k={k} must be between 1 and d_sae-1={d_sae - 1}")
        super().__init__(d_in, d_sae)
        self.k, self.threshold_lr = k, threshold_lr
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        self.register_buffer("threshold_batches", torch.zeros((), dtype=torch.int64))

    def settings(self) -> dict:
        return {"k": self.k, "threshold_lr": self.threshold_lr}

    def activation(self, pre: Tensor) -> Tensor:
        return F.relu(pre) * (pre > self.threshold.to(pre.dtype))

    def select(self, step: StepInput) -> Select:
        return Select("batchtopk", self.k, k_aux=step.k_aux, low_precision=step.low_precision)

    loss = _fvu_and_auxk

    def fired(self, codes: Codes) -> Tensor:
        """Selected above θ: a latent selected only in batches whose cutoff fell below θ never
        fires in the exported JumpReLU, so it counts as dead and AuxK revives it."""
        on = codes.vals > self.threshold.to(codes.vals.dtype)
        return torch.bincount(codes.cols[on], minlength=self.d_sae).to(codes.l0.dtype)

    @torch.no_grad()
    def update_threshold(self, smallest: float) -> None:
        """Fold one batch's smallest selected (positive) activation into θ."""
        self.threshold_batches += 1
        w = max(self.threshold_lr, 1.0 / float(self.threshold_batches))
        self.threshold.mul_(1 - w).add_(w * smallest)

    def jumprelu(self) -> JumpReLUSAE:
        """The inference form SAELens exports: a JumpReLU with θ for every latent."""
        out = JumpReLUSAE(self.d_in, self.d_sae, subtract_b_dec=self.subtract_b_dec)
        out.load_state_dict(
            {
                **{k: v for k, v in self.state_dict().items() if not k.startswith("threshold")},
                "threshold": torch.full((self.d_sae,), float(self.threshold)),
            }
        )
        out.cfg = dict(self.cfg)
        return out


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK: BatchTopK codes, and the reconstruction loss summed over the nested
    prefixes `sizes` of the dictionary (increasing, the last = d_sae), so the first latents learn
    the most general features on their own. Inference and threshold as BatchTopK."""

    architecture = "matryoshka"

    def __init__(self, d_in: int, d_sae: int, k: int, sizes: list[int], *, threshold_lr: float = 0.01):
        if not sizes or sizes[-1] != d_sae or any(a >= b for a, b in zip(sizes, sizes[1:])) or sizes[0] <= 0:
            raise ValueError(f"matryoshka sizes {sizes} must increase and end at d_sae={d_sae}")
        super().__init__(d_in, d_sae, k, threshold_lr=threshold_lr)
        self.sizes = list(sizes)

    def settings(self) -> dict:
        return {"k": self.k, "sizes": self.sizes, "threshold_lr": self.threshold_lr}

    def select(self, step: StepInput) -> Select:
        return super().select(step)._replace(groups=tuple(self.sizes[:-1]))

    def loss(self, x: Tensor, step: StepInput) -> Loss:
        xn = self.normalize(x)
        codes = self._pass(xn, self.select(step), step)
        prefixes = codes.recon.cumsum(dim=0)  # (len(sizes), N, d_in): the first i+1 groups' sum
        err = xn - (prefixes + self.b_dec)
        total_var = step.variance(xn.detach())
        fvus = err.pow(2).sum(dim=(1, 2)) / total_var
        aux = _auxk(err[-1], codes, step, total_var)
        return Loss(fvus.sum() + step.aux_alpha * aux, fvus[-1], aux, codes)


class JumpReLUSAE(SAE):
    """JumpReLU: a latent is active where its pre-activation exceeds its own threshold θ, learned
    with straight-through estimators of the step function through a rectangle kernel of width
    `bandwidth` (Rajamanoharan et al. 2024); the loss adds sparsity_coefficient × the L0 per row.
    Trained as SAELens 6 trains it, which the planted-feature bench bears out
    (docs/benchmarks.md): θ is learned itself and kept ≥ 0 after each step (the paper's log θ
    moves multiplicatively, about lr per Adam step, far too slowly from a small start), and the
    decoder rows are free, initialized at norm `decoder_norm` (unit rows recover half as many
    features). Also the inference form of BatchTopK and Matryoshka, and of Gemma Scope's SAEs
    (subtract_b_dec=False)."""

    architecture = "jumprelu"
    unit_decoder = False
    clips_per_token_objective = True

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        bandwidth: float = 0.05,
        init_threshold: float = 0.01,
        decoder_norm: float = 0.1,
        subtract_b_dec: bool = True,
    ):
        super().__init__(d_in, d_sae, subtract_b_dec=subtract_b_dec, decoder_norm=decoder_norm)
        self.bandwidth = bandwidth
        self.threshold = nn.Parameter(torch.full((d_sae,), float(init_threshold)))

    def settings(self) -> dict:
        return {"bandwidth": self.bandwidth, "subtract_b_dec": self.subtract_b_dec}

    def activation(self, pre: Tensor) -> Tensor:
        return F.relu(pre) * (pre > self.threshold.to(pre.dtype))

    def trainable(self) -> list[nn.Parameter]:
        return [*super().trainable(), self.threshold]

    def weights(self) -> dict[str, Tensor]:
        return {**super().weights(), "threshold": self.threshold.detach()}

    @torch.no_grad()
    def project(self) -> None:
        super().project()
        self.threshold.clamp_(min=0.0)  # below 0 the gate would pass negative pre-activations

    def loss(self, x: Tensor, step: StepInput) -> Loss:
        xn = self.normalize(x)
        select = Select("threshold", subtract_b_dec=self.subtract_b_dec, bandwidth=self.bandwidth)
        codes = self._pass(xn, select._replace(low_precision=step.low_precision), step, self.threshold)
        err = xn - (codes.recon + self.b_dec)
        total_var = step.variance(xn.detach())
        fvu = err.pow(2).sum() / total_var
        sparsity = step.sparsity_coefficient * codes.l0.sum() / total_var
        return Loss(fvu + sparsity, fvu, sparsity, codes)


class ReLUSAE(SAE):
    """ReLU + L1 (the standard SAE, as Anthropic's April 2024 update trains it): codes relu(pre),
    the loss adds sparsity_coefficient × Σ code × ‖decoder row‖; the decoder rows are free
    (initialized at norm `decoder_norm`, SAELens' decoder_init_norm), the L1 weighting is what
    keeps them from growing."""

    architecture = "relu"
    unit_decoder = False
    clips_per_token_objective = True
    median_b_dec = False  # b_dec at 0, as SAELens' and dictionary_learning's standard SAEs

    def __init__(self, d_in: int, d_sae: int, *, decoder_norm: float = 0.1, subtract_b_dec: bool = True):
        super().__init__(d_in, d_sae, subtract_b_dec=subtract_b_dec, decoder_norm=decoder_norm)

    def settings(self) -> dict:
        return {"subtract_b_dec": self.subtract_b_dec}

    def activation(self, pre: Tensor) -> Tensor:
        return F.relu(pre)

    def loss(self, x: Tensor, step: StepInput) -> Loss:
        xn = self.normalize(x)
        select = Select("threshold", subtract_b_dec=self.subtract_b_dec, low_precision=step.low_precision)
        codes = self._pass(xn, select, step)
        err = xn - (codes.recon + self.b_dec)
        total_var = step.variance(xn.detach())
        fvu = err.pow(2).sum() / total_var
        l1 = (codes.mass * self.W_dec.norm(dim=1)).sum()
        sparsity = step.sparsity_coefficient * l1 / total_var
        return Loss(fvu + sparsity, fvu, sparsity, codes)


KINDS: dict[str, type[SAE]] = {c.architecture: c for c in (TopKSAE, BatchTopKSAE, MatryoshkaSAE, JumpReLUSAE, ReLUSAE)}


def make_sae(s, d_in: int) -> SAE:
    """A fresh SAE for one resolved setting (`train.config.SweepSetting`: architecture, d_sae, ...)."""
    if s.architecture == "topk":
        return TopKSAE(d_in, s.d_sae, s.k)
    if s.architecture == "batchtopk":
        return BatchTopKSAE(d_in, s.d_sae, s.k)
    if s.architecture == "matryoshka":
        return MatryoshkaSAE(d_in, s.d_sae, s.k, s.matryoshka_sizes)
    if s.architecture == "jumprelu":
        return JumpReLUSAE(d_in, s.d_sae, bandwidth=s.jumprelu_bandwidth, init_threshold=s.jumprelu_init_threshold)
    if s.architecture == "relu":
        return ReLUSAE(d_in, s.d_sae)
    raise ValueError(f"unknown architecture {s.architecture!r}")


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
