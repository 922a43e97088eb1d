"""The SAE contract, the training kernels against dense autograd, and AuxK."""

import math

import pytest
import torch

from train.kernels import sparse_decode, topk_autoencode
from train.sae import TopKSAE, geometric_median
from train.trainer import SAETrainer, default_lr, lr_at


def dense_reference(x, W, be, bd, Wd, k, relu, sub, dead, k_aux):
    pre = ((x - bd) if sub else x) @ W + be
    v, i = pre.topk(k, dim=-1)
    v = v.relu() if relu else v
    recon = torch.zeros(x.shape[0], W.shape[1]).scatter(1, i, v) @ Wd + bd
    mask = torch.full((W.shape[1],), float("-inf"))
    mask[dead] = 0
    av, ai = (pre + mask).topk(k_aux, dim=-1)
    av = av.relu() if relu else av
    aux = torch.zeros(x.shape[0], W.shape[1]).scatter(1, ai, av) @ Wd
    return recon, aux


@pytest.mark.parametrize("relu,sub", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("dead_every", [4, 1])  # a quarter dead (compact top-k), all dead (masked top-k)
def test_sparse_kernels_match_dense_autograd(relu, sub, dead_every):
    torch.manual_seed(0)
    N, D, S, K, KA = 48, 12, 96, 4, 6
    x = torch.randn(N, D)
    params = [torch.randn(D, S, requires_grad=True), torch.randn(S, requires_grad=True),
              torch.randn(D, requires_grad=True), torch.randn(S, D, requires_grad=True)]
    W, be, bd, Wd = params
    dead = torch.arange(1, S, 4) if dead_every > 1 else torch.arange(S)
    recon, v, i, aux = topk_autoencode(x, W, be, bd, Wd, K, relu=relu, subtract_b_dec=sub, dead=dead, k_aux=KA)
    err = x - (recon + bd)
    loss = err.pow(2).sum() + 0.5 * (aux - err.detach()).pow(2).sum()
    got = torch.autograd.grad(loss, params)
    r_recon, r_aux = dense_reference(x, W, be, bd, Wd, K, relu, sub, dead, KA)
    r_err = x - r_recon
    r_loss = r_err.pow(2).sum() + 0.5 * (r_aux - r_err.detach()).pow(2).sum()
    want = torch.autograd.grad(r_loss, params)
    assert torch.allclose(loss, r_loss, rtol=1e-5)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-4 * w.abs().max())


def test_sparse_decode_matches_embedding_bag_autograd():
    torch.manual_seed(0)
    vals = torch.rand(40, 5, requires_grad=True)
    idx = torch.randint(0, 64, (40, 5))
    W = torch.randn(64, 8, requires_grad=True)
    g = torch.randn(40, 8)
    got = torch.autograd.grad(sparse_decode(vals, idx, W), [vals, W], g)
    want = torch.autograd.grad(torch.nn.functional.embedding_bag(idx, W, per_sample_weights=vals, mode="sum"),
                               [vals, W], g)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))


def test_contract_shapes_conventions_and_fold():
    torch.manual_seed(1)
    sae = TopKSAE(8, 32, 3)
    assert sae.W_enc.shape == (8, 32) and sae.W_dec.shape == (32, 8)
    assert torch.allclose(sae.W_enc, sae.W_dec.T)  # tied init
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32))
    x = torch.randn(20, 8)
    vals, idx = sae.encode(x)
    assert vals.shape == idx.shape == (20, 3) and idx.dtype == torch.int64 and (vals >= 0).all()
    dense = sae.dense(x)
    assert torch.allclose(dense @ sae.W_dec + sae.b_dec, sae(x), atol=1e-5)
    with torch.no_grad():
        sae.input_mean.normal_()
        sae.input_scale.uniform_(0.5, 2.0)
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    folded = sae.folded()
    assert torch.allclose(folded.input_scale, torch.ones(8)) and torch.allclose(folded(x), sae(x), atol=1e-4)
    q = TopKSAE(8, 32, 3, relu=False, subtract_b_dec=False)
    with torch.no_grad():
        q.input_mean.normal_()
        q.input_scale.uniform_(0.5, 2.0)
    assert torch.allclose(q.folded()(x), q(x), atol=1e-4)
    with torch.no_grad():
        q.b_enc.fill_(-100.0)
    assert (q.encode(x)[0] < 0).all()  # no ReLU in the Qwen-Scope convention
    with pytest.raises(ValueError):
        TopKSAE(8, 4, 4)


def test_geometric_median_resists_outliers():
    torch.manual_seed(0)
    x = torch.randn(400, 5) * 0.1 + 3.0
    x[:40] += 100.0  # 10% far outliers drag the mean, not the median
    gm = geometric_median(x)
    assert (gm - 3.0).abs().max() < 0.1 and (x.mean(0) - 3.0).abs().max() > 5


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
    fp32, bf16 = (SAETrainer(TopKSAE(16, 96, 4), lr=3e-3, k_aux=8, dead_tokens=2048, total_steps=30,
                             low_precision=lp) for lp in (False, True))
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
