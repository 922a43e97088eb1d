"""The SAE kinds: the shared contract (shapes, conventions, folding), each kind's loss against its
plain forward, the BatchTopK threshold and inference form, and the geometric-median init."""

import pytest
import torch

from train.config import ARCHITECTURES
from train.sae import (
    KINDS,
    BatchTopKSAE,
    JumpReLUSAE,
    MatryoshkaSAE,
    ReLUSAE,
    StepInput,
    TopKSAE,
    default_k_aux,
    geometric_median,
)

D, S = 8, 32


def kinds():
    return {
        "topk": TopKSAE(D, S, 3),
        "batchtopk": BatchTopKSAE(D, S, 3),
        "matryoshka": MatryoshkaSAE(D, S, 3, [8, 16, 32]),
        "jumprelu": JumpReLUSAE(D, S, init_threshold=0.5),
        "relu": ReLUSAE(D, S),
    }


def perturbed(sae):
    with torch.no_grad():
        sae.input_mean.normal_()
        sae.input_scale.uniform_(0.5, 2.0)
        sae.b_dec.normal_()
        sae.b_enc.normal_()
        if isinstance(sae, BatchTopKSAE):
            sae.threshold.fill_(0.3)
    return sae


def test_every_architecture_of_the_schema_is_a_kind():
    assert set(KINDS) == set(ARCHITECTURES) and all(KINDS[a].architecture == a for a in KINDS)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_contract_shapes_conventions_and_fold(kind):
    torch.manual_seed(1)
    sae = perturbed(kinds()[kind])
    assert sae.W_enc.shape == (D, S) and sae.W_dec.shape == (S, D)
    x = torch.randn(20, D) * 3
    with torch.no_grad():
        vals, idx = sae.encode(x)
        dense = sae.dense(x)
        assert vals.shape == idx.shape and idx.dtype == torch.int64 and (vals >= 0).all()
        assert ((dense != 0).sum(1) <= vals.shape[1]).all()  # padding entries are zeros
        recon = (dense @ sae.W_dec + sae.b_dec) * sae.input_scale + sae.input_mean
        torch.testing.assert_close(recon, sae(x), atol=1e-4, rtol=1e-4)
        folded = sae.folded()
        assert torch.equal(folded.input_scale, torch.ones(D)) and type(folded) is type(sae)
        torch.testing.assert_close(folded(x), sae(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(folded.dense(x), dense, atol=1e-4, rtol=1e-4)


def test_topk_conventions():
    x = torch.randn(20, D)
    q = TopKSAE(D, S, 3, relu=False, subtract_b_dec=False)
    with torch.no_grad():
        q.b_enc.fill_(-100.0)
    assert (q.encode(x)[0] < 0).all()  # no ReLU in the Qwen-Scope convention
    assert torch.allclose(TopKSAE(D, S, 3).W_enc, TopKSAE(D, S, 3).W_enc) is False  # random init
    with pytest.raises(ValueError):
        TopKSAE(8, 4, 4)
    with pytest.raises(ValueError, match="must increase and end at d_sae"):
        MatryoshkaSAE(D, S, 3, [16, 8, 32])


@pytest.mark.parametrize("kind", ["topk", "jumprelu", "relu"])
def test_the_loss_codes_are_the_plain_forward(kind):
    """The fused kernel path of the training loss gives the codes and reconstruction of
    `encode`/`decode` (the kinds whose training codes are their inference codes)."""
    torch.manual_seed(2)
    sae = perturbed(kinds()[kind])
    x = torch.randn(64, D) * 2
    out = sae.loss(x, StepInput(sparsity_coefficient=0.1))
    with torch.no_grad():
        dense = sae.dense(x)
        recon = sae(x)
    c = out.codes
    if len(c.vals):  # the threshold kinds run dense (no entries) while most latents fire
        got = torch.zeros(64, S).index_put_((c.rows, c.cols), c.vals.detach())
        torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.l0, (dense != 0).sum(0).float())
    torch.testing.assert_close(c.mass.detach(), dense.sum(0), atol=1e-4, rtol=1e-4)
    recon_n = c.recon.detach() + sae.b_dec.detach()
    torch.testing.assert_close(recon_n * sae.input_scale + sae.input_mean, recon, atol=1e-4, rtol=1e-4)
    xn = sae.normalize(x)
    fvu = ((xn - sae.normalize(recon)).pow(2).sum() / (xn - xn.mean(0)).pow(2).sum()).item()
    assert out.fvu.item() == pytest.approx(fvu, rel=1e-4)


def test_batchtopk_selects_k_per_row_on_average_and_its_threshold_is_a_running_mean():
    torch.manual_seed(3)
    sae = BatchTopKSAE(D, S, 3, threshold_lr=0.5)
    x = torch.randn(64, D)
    out = sae.loss(x, StepInput())
    counts = out.codes.rows.bincount(minlength=64)
    assert counts.sum() == 3 * 64 and counts.min() != counts.max()  # per row: anything, k on average
    pre = sae.pre_acts(x).detach()
    assert out.codes.vals.min().item() == pytest.approx(
        pre.flatten().topk(3 * 64).values.min().clamp_min(0).item(), rel=1e-5
    )
    for v, want in ((2.0, 2.0), (4.0, 3.0), (1.0, 2.0)):  # mean of the first 1/threshold_lr, then EMA
        sae.update_threshold(v)
        assert float(sae.threshold) == pytest.approx(want)


def test_batchtopk_inference_form_is_a_jumprelu_at_its_threshold():
    torch.manual_seed(4)
    sae = perturbed(MatryoshkaSAE(D, S, 3, [8, 32]))
    jr = sae.jumprelu()
    assert isinstance(jr, JumpReLUSAE) and torch.allclose(jr.threshold, torch.full((S,), 0.3))
    x = torch.randn(30, D) * 3
    with torch.no_grad():
        pre = sae.pre_acts(x)
        want = pre.relu() * (pre > 0.3)
        torch.testing.assert_close(sae.dense(x), want)
        torch.testing.assert_close(jr.dense(x), want)
        torch.testing.assert_close(jr(x), sae(x))


def test_matryoshka_sums_the_prefix_losses():
    torch.manual_seed(5)
    sae = MatryoshkaSAE(D, S, 3, [8, 16, 32])
    x = torch.randn(64, D)
    out = sae.loss(x, StepInput())
    c = out.codes
    z = torch.zeros(64, S).index_put_((c.rows, c.cols), c.vals.detach())
    xn = sae.normalize(x)
    tv = (xn - xn.mean(0)).pow(2).sum()
    fvus = [((xn - (z[:, :e] @ sae.W_dec[:e] + sae.b_dec)).pow(2).sum() / tv).item() for e in (8, 16, 32)]
    assert out.fvu.item() == pytest.approx(fvus[-1], rel=1e-4)
    assert out.loss.item() == pytest.approx(sum(fvus), rel=1e-4)  # no dead latents: no AuxK term


def test_coefficient_kinds_add_saelens_scaled_sparsity():
    """loss = (SAELens' MSE + c · S) / per-token variance: jumprelu's S is the L0, relu's the
    decoder-norm-weighted L1 (SAELens' StandardTrainingSAE)."""
    torch.manual_seed(6)
    x = torch.randn(64, D) * 2
    for sae in (JumpReLUSAE(D, S, init_threshold=0.5), ReLUSAE(D, S)):
        out = sae.loss(x, StepInput(sparsity_coefficient=0.7))
        with torch.no_grad():
            z = sae.dense(x)
            mse = (x - sae(x)).pow(2).sum(1).mean()
            s = (
                (z != 0).sum(1).float().mean()
                if sae.architecture == "jumprelu"
                else (z * sae.W_dec.norm(dim=1)).sum(1).mean()
            )
            per_token_var = (x - x.mean(0)).pow(2).sum() / 64
        assert out.loss.item() == pytest.approx(((mse + 0.7 * s) / per_token_var).item(), rel=1e-4)


def test_k_aux_default_has_one_home():
    assert default_k_aux(5120) == 2560


def test_geometric_median_resists_outliers():
    torch.manual_seed(0)
    x = torch.randn(400, 5) * 0.1 + 3.0
    x[:40] += 100.0  # 10% far outliers drag the mean, not the median
    gm = geometric_median(x)
    assert (gm - 3.0).abs().max() < 0.1 and (x.mean(0) - 3.0).abs().max() > 5
