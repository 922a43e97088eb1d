"""The trainer: AuxK and its normalization, the step, the lr schedule, low-precision steps."""

import copy
import math

import pytest
import torch

from cache_format.config import ConfigError
from train.config import TrainConfig
from train.sae import TopKSAE
from train.trainer import SAETrainer, default_lr, lr_at


def test_aux_loss_fires_only_with_dead_latents():
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 4)
    tr = SAETrainer(sae, lr=1e-3, k_aux=8, dead_tokens=10_000, total_steps=10)
    x = torch.randn(128, 16)
    first = tr.step(x)
    assert first["dead"] == 0 and first["aux_loss"] == 0.0
    tr.since_fired[:40] = tr.dead_tokens  # these latents have not fired for the threshold
    w_before = sae.W_enc.detach().clone()
    st = tr.step(x)
    assert st["dead"] >= 30 and st["aux_loss"] > 0
    assert st["loss"] > st["fvu"]
    # the AuxK gradient reaches the dead latents' encoder columns
    assert not torch.equal(w_before[:, :40], sae.W_enc.detach()[:, :40])


def test_step_keeps_decoder_unit_norm_and_counts_tokens():
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 4)
    tr = SAETrainer(sae, lr=1e-2, total_steps=5, dead_tokens=100)
    for _ in range(3):
        tr.step(torch.randn(50, 16) * 5)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    assert tr.tokens == 150 and tr.steps == 3
    assert int(tr.since_fired.max()) <= 150


def test_schedule_and_width_scaled_lr():
    assert lr_at(0, 1e-3, 1e-4, 10, 100) == pytest.approx(1e-4)
    assert lr_at(9, 1e-3, 1e-4, 10, 100) == pytest.approx(1e-3)
    assert lr_at(100, 1e-3, 1e-4, 10, 100) == pytest.approx(1e-4)
    assert 1e-4 < lr_at(55, 1e-3, 1e-4, 10, 100) < 1e-3
    assert default_lr(2**14) == pytest.approx(2e-4)
    assert default_lr(2**16) == pytest.approx(1e-4)
    assert SAETrainer(TopKSAE(4, 16, 2), lr=0).peak_lr == pytest.approx(2e-4 / math.sqrt(16 / 2**14))


def test_lr_decay_steps_fall_linearly_to_zero_as_saelens():
    # SAELens' constant schedule with lr_decay_steps 4 of 10: LinearLR from 1 to 0, one factor per step
    assert [lr_at(s, 1e-3, 1e-3, 0, 10, 4) for s in range(10)] == pytest.approx([1e-3] * 7 + [7.5e-4, 5e-4, 2.5e-4])
    # the cosine reaches its floor where the decay starts; 0 steps leaves the schedule as it was
    assert lr_at(6, 1e-3, 1e-4, 0, 10, 4) == pytest.approx(1e-4)
    assert [lr_at(s, 1e-3, 1e-4, 2, 10, 0) for s in range(10)] == [lr_at(s, 1e-3, 1e-4, 2, 10) for s in range(10)]
    # the trainer steps with it: Adam's lr at each step
    torch.manual_seed(0)
    tr = SAETrainer(TopKSAE(16, 64, 4), lr=1e-2, total_steps=4, lr_decay_steps=2)
    seen = []
    for _ in range(4):
        tr.step(torch.randn(50, 16))
        seen.append(tr.opt.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-2, 1e-2, 1e-2, 5e-3])


def test_adam_betas_reach_the_optimizer_and_bad_ones_are_refused():
    assert SAETrainer(TopKSAE(4, 16, 2), adam_betas=(0.0, 0.99)).opt.param_groups[0]["betas"] == (0.0, 0.99)
    assert TrainConfig().adam_beta1 == 0.9 and TrainConfig().adam_beta2 == 0.999
    with pytest.raises(ConfigError, match=r"train.adam_beta2 = 1.0 must be in \[0, 1\)"):
        TrainConfig(adam_beta2=1.0)


def _pair(aux_norm_a, aux_norm_b, **kw):
    torch.manual_seed(3)
    a = SAETrainer(TopKSAE(16, 64, 4), aux_norm=aux_norm_a, **kw)
    b = SAETrainer(TopKSAE(16, 64, 4), aux_norm=aux_norm_b, **kw)
    b.sae.load_state_dict(a.sae.state_dict())
    return a, b


def test_aux_loss_is_normalized_by_the_residual_variance_or_the_total():
    kw = dict(lr=1e-3, k_aux=8, dead_tokens=100, total_steps=10)
    res, tot = _pair("residual", "total", **kw)
    x = torch.randn(256, 16) * 2 + 1
    for tr in (res, tot):
        tr.since_fired[:4] = tr.dead_tokens  # 4 dead latents, fewer than k_aux: sparsify scales by 4/8
    with torch.no_grad():
        err = x - res.sae(x)
        resid_var = (err - err.mean(0)).pow(2).sum()
        total_var = (x - x.mean(0)).pow(2).sum()
    a, b = res.step(x), tot.step(x)
    assert a["fvu"] == pytest.approx(b["fvu"], rel=1e-6)  # the same weights before the step
    assert a["aux_loss"] / b["aux_loss"] == pytest.approx(float(total_var / resid_var) / (4 / 8), rel=1e-4)


def test_a_resume_cannot_switch_the_aux_normalization():
    from cache_format.errors import UserError

    res, tot = _pair("residual", "total", lr=1e-3, total_steps=10)
    res.step(torch.randn(64, 16))
    state = res.state_dict()
    assert state["aux_norm"] == "residual"
    with pytest.raises(UserError, match="aux_norm='residual'"):
        tot.load_state_dict(state)
    legacy = {k: v for k, v in tot.state_dict().items() if k != "aux_norm"}  # saved before the key existed
    with pytest.raises(UserError, match="aux_norm='total'"):
        res.load_state_dict(legacy)
    fresh = SAETrainer(TopKSAE(16, 64, 4), aux_norm="residual", lr=1e-3, total_steps=10)
    fresh.load_state_dict(state)
    assert fresh.steps == 1 and torch.equal(fresh.sae.W_enc, res.sae.W_enc)
    with pytest.raises(ValueError):
        SAETrainer(TopKSAE(16, 64, 4), aux_norm="batch")


def test_bf16_low_precision_step_tracks_fp32_on_cpu():
    """The bf16 encoder matmul (GPU autocast's path) runs on CPU too. Tolerance: fvu within 2% and
    the AuxK loss within 5% (relative) at every one of 30 steps, final decoder rows at cosine > 0.99.
    Measured: 0.6% worst fvu gap, 0.7% worst AuxK gap, 0.9997 worst row cosine."""
    torch.manual_seed(5)
    dic = torch.nn.functional.normalize(torch.randn(48, 16), dim=1)

    def batch():
        codes = torch.rand(512, 48) * (torch.rand(512, 48) < 0.06)
        return codes @ dic + 0.01 * torch.randn(512, 16)

    batches = [batch() for _ in range(30)]
    fp32, bf16 = (
        SAETrainer(TopKSAE(16, 96, 4), lr=3e-3, k_aux=8, dead_tokens=2048, total_steps=30, low_precision=lp)
        for lp in (False, True)
    )
    bf16.sae.load_state_dict(fp32.sae.state_dict())
    for tr in (fp32, bf16):
        tr.init_from_sample(batches[0])
    for x in batches:
        for tr in (fp32, bf16):
            tr.since_fired[64:] = tr.dead_tokens  # a third held dead, so AuxK runs on both paths
        a, b = fp32.step(x), bf16.step(x)
        assert b["fvu"] == pytest.approx(a["fvu"], rel=0.02), (fp32.steps, a, b)
        assert b["aux_loss"] == pytest.approx(a["aux_loss"], rel=0.05) and a["dead"] == b["dead"] == 32
    cos = torch.nn.functional.cosine_similarity(fp32.sae.W_dec, bf16.sae.W_dec, dim=1)
    assert cos.min() > 0.99, cos.min()


def _kinds():
    from train.sae import BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE

    return [
        TopKSAE(16, 64, 4),
        BatchTopKSAE(16, 64, 4),
        MatryoshkaSAE(16, 64, 4, [16, 32, 64]),
        JumpReLUSAE(16, 64, init_threshold=0.2),
        ReLUSAE(16, 64),
    ]


@pytest.mark.parametrize("i", range(5))
def test_every_kind_steps_and_its_state_is_plain(i):
    """State holds tensors, numbers and strings only (the checkpoint format needs no pickle), and
    a fresh trainer loaded from it takes the identical next step."""
    torch.manual_seed(7)
    sae = _kinds()[i]
    kw = dict(lr=3e-3, k_aux=8, dead_tokens=256, total_steps=20, sparsity_coefficient=0.5, sparsity_warmup_steps=4)
    tr = SAETrainer(sae, **kw)
    xs = [torch.randn(128, 16) * 2 for _ in range(6)]
    tr.init_from_sample(xs[0])
    for x in xs[:4]:
        st = tr.step(x)
    assert st["l0"] > 0 and ("aux_loss" in st) == sae.revives_dead and ("sparsity_loss" in st) != sae.revives_dead
    if sae.unit_decoder:
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, (str, int)) and plain(x) for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        return v is None or isinstance(v, (torch.Tensor, int, float, str, bool))

    state = tr.state_dict()
    assert plain(state) and state["architecture"] == sae.architecture
    twin = SAETrainer(_kinds()[i], **kw)
    twin.load_state_dict(copy.deepcopy(state))  # as from a file: the live state's tensors are not shared
    a, b = tr.step(xs[4]), twin.step(xs[4])
    assert a == b and all(
        torch.equal(p, q) for p, q in zip(tr.sae.state_dict().values(), twin.sae.state_dict().values())
    )


def test_a_resume_steps_the_same_whatever_the_moments_memory_layout():
    """A checkpoint may hold Adam's moments in another memory layout than the live parameter
    (runs before W_enc was stored row-major kept it, and its moments, transposed); CPU's fused
    step pairs parameter and moments by memory position, so the load must relayout them."""
    torch.manual_seed(10)
    tr = SAETrainer(TopKSAE(16, 64, 4), lr=1e-2, total_steps=10)
    xs = [torch.randn(128, 16) for _ in range(3)]
    for x in xs[:2]:
        tr.step(x)
    state = copy.deepcopy(tr.state_dict())
    for v in state["opt"]["state"].values():
        v["exp_avg"], v["exp_avg_sq"] = (
            v[k].T.contiguous().T if v[k].dim() == 2 else v[k] for k in ("exp_avg", "exp_avg_sq")
        )
    twin = SAETrainer(TopKSAE(16, 64, 4), lr=1e-2, total_steps=10)
    twin.load_state_dict(state)
    tr.step(xs[2])
    twin.step(xs[2])
    assert torch.equal(tr.sae.W_enc, twin.sae.W_enc) and torch.equal(tr.sae.W_dec, twin.sae.W_dec)


def test_batchtopk_threshold_tracks_the_smallest_selected_activation():
    from train.sae import BatchTopKSAE

    torch.manual_seed(8)
    tr = SAETrainer(BatchTopKSAE(16, 64, 4), lr=1e-3, total_steps=10)
    mins = []
    for _ in range(3):
        x = torch.randn(128, 16)
        with torch.no_grad():
            mins.append(float(tr.sae.pre_acts(x).relu().flatten().topk(4 * 128).values.min()))
        tr.step(x)
    assert float(tr.sae.threshold) == pytest.approx(sum(mins) / 3, rel=1e-4)  # the mean of the first batches
    assert int(tr.sae.threshold_batches) == 3


def test_sparsity_coefficient_warms_up_linearly_as_saelens():
    from train.sae import ReLUSAE

    tr = SAETrainer(ReLUSAE(16, 64), lr=1e-3, total_steps=10, sparsity_coefficient=2.0, sparsity_warmup_steps=4)
    got = [tr.step(torch.randn(32, 16))["sparsity_coefficient"] for _ in range(6)]
    assert got == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]


def test_relu_keeps_its_decoder_free_and_a_resume_cannot_switch_kind():
    from cache_format.errors import UserError
    from train.sae import JumpReLUSAE, ReLUSAE

    torch.manual_seed(9)
    tr = SAETrainer(ReLUSAE(16, 64), lr=1e-2, total_steps=10, sparsity_coefficient=0.1)
    assert torch.allclose(tr.sae.W_dec.norm(dim=1), torch.full((64,), 0.1))  # SAELens' decoder_init_norm
    for _ in range(3):
        tr.step(torch.randn(64, 16) * 3)
    assert not torch.allclose(tr.sae.W_dec.norm(dim=1), torch.full((64,), 0.1), atol=1e-3)
    with pytest.raises(UserError, match="holds a relu SAE, not jumprelu"):
        SAETrainer(JumpReLUSAE(16, 64), total_steps=10).load_state_dict(tr.state_dict())


@pytest.mark.parametrize("i", range(5))
def test_coefficient_kinds_clip_the_gradient_in_saelens_units(i):
    """jumprelu and relu clip the gradient of SAELens' per-token objective at grad_clip (their
    loss is that objective over the batch's variance per token v, so this one's at grad_clip / v);
    the k kinds clip their own loss's gradient, as before."""
    torch.manual_seed(10)
    sae = _kinds()[i]
    tr = SAETrainer(sae, lr=1e-3, k_aux=8, dead_tokens=64, total_steps=10, sparsity_coefficient=0.5, grad_clip=0.5)
    x = torch.randn(256, 16) * 10
    tr.step(x)
    tr.step(x)  # AuxK on (every latent unseen for 256 tokens > 64 counts dead)
    norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in sae.trainable()])))
    v = float((x - x.mean(0)).pow(2).sum()) / len(x)  # ~1600
    if sae.clips_per_token_objective:
        assert norm == pytest.approx(0.5 / v, rel=1e-3)  # clipped in SAELens' units
    else:
        assert 0.5 / v * 10 < norm <= 0.5 + 1e-6


@pytest.mark.parametrize("i", range(5))
def test_b_dec_starts_at_the_median_except_for_relu(i):
    """relu's b_dec starts at 0, as SAELens' and dictionary_learning's standard SAEs (on the
    planted-feature bench the median start recovered fewer features at the same L0); the others
    start at the inputs' geometric median."""
    sae = _kinds()[i]
    x = torch.randn(512, 16) + 3.0
    SAETrainer(sae, total_steps=10).init_from_sample(x)
    if sae.architecture == "relu":
        assert torch.equal(sae.b_dec, torch.zeros(16))
    else:
        assert torch.allclose(sae.b_dec, torch.full((16,), 3.0), atol=0.3)
