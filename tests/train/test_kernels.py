"""The fused sparse kernel against dense autograd, for every selection rule."""

import pytest
import torch

from train.kernels import Select, sparse_autoencode

N, D, S = 48, 12, 96


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(D, S, generator=g).requires_grad_(),
        torch.randn(S, generator=g).requires_grad_(),
        torch.randn(D, generator=g).requires_grad_(),
        torch.randn(S, D, generator=g).requires_grad_(),
    ]


def pre_acts(x, W, be, bd, sub):
    return ((x - bd) if sub else x) @ W + be


def aux_codes(pre, dead, k_aux, relu):
    mask = torch.full((pre.shape[1],), float("-inf"))
    mask[dead] = 0
    av, ai = (pre + mask).topk(k_aux, dim=-1)
    return torch.zeros_like(pre).scatter(1, ai, av.relu() if relu else av)


def assert_grads_match(loss, ref_loss, inputs):
    got, want = torch.autograd.grad(loss, inputs), torch.autograd.grad(ref_loss, inputs)
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-4 * w.abs().max()), (g - w).abs().max()


@pytest.mark.parametrize("relu,sub", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("dead_every", [4, 1])  # a quarter dead (compact top-k), all dead (masked top-k)
def test_topk_matches_dense_autograd(relu, sub, dead_every):
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    W, be, bd, Wd = p = params()
    dead = torch.arange(1, S, 4) if dead_every > 1 else torch.arange(S)
    c = sparse_autoencode(x, W, be, bd, Wd, Select("topk", 4, relu, sub, k_aux=6), dead=dead)
    err = x - (c.recon + bd)
    loss = err.pow(2).sum() + 0.5 * (c.aux_recon - err.detach()).pow(2).sum()
    pre = pre_acts(x, W, be, bd, sub)
    v, i = pre.topk(4, dim=-1)
    z = torch.zeros_like(pre).scatter(1, i, v.relu() if relu else v)
    r_err = x - (z @ Wd + bd)
    r_loss = r_err.pow(2).sum() + 0.5 * (aux_codes(pre, dead, 6, relu) @ Wd - r_err.detach()).pow(2).sum()
    assert_grads_match(loss, r_loss, p)
    assert c.l0.sum() == (z != 0).sum() and torch.equal(c.rows, torch.arange(N).repeat_interleave(4))


@pytest.mark.parametrize("groups", [(), (24, 48)])  # BatchTopK, Matryoshka's nested prefixes
def test_batchtopk_and_its_prefixes_match_dense_autograd(groups):
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(2))
    W, be, bd, Wd = p = params(1)
    dead = torch.arange(0, S, 3)
    c = sparse_autoencode(x, W, be, bd, Wd, Select("batchtopk", 3, k_aux=5, groups=groups), dead=dead)
    recon = c.recon.cumsum(0) if groups else c.recon[None]
    err = x - (recon + bd)
    loss = err.pow(2).sum() + 0.5 * (c.aux_recon - err[-1].detach()).pow(2).sum()
    pre = pre_acts(x, W, be, bd, True)
    v, i = pre.relu().flatten().topk(3 * N)  # the top k x N of the whole batch
    z = torch.zeros(N * S).scatter(0, i, v).view(N, S)
    ends = [*groups, S]
    r_err = torch.stack([x - (z[:, :e] @ Wd[:e] + bd) for e in ends])
    r_loss = r_err.pow(2).sum() + 0.5 * (aux_codes(pre, dead, 5, True) @ Wd - r_err[-1].detach()).pow(2).sum()
    assert_grads_match(loss, r_loss, p)
    assert len(c.vals) == 3 * N and (c.l0.sum() == (z > 0).sum())
    assert len(set(c.rows.tolist())) < N or c.rows.bincount().std() > 0  # rows hold different counts


def test_batchtopk_widens_its_candidates_for_a_row_that_takes_many():
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(3))
    x[7] *= 50  # one row dominates the batch: it holds far more than its share of the top k x N
    W, be, bd, Wd = params(2)
    c = sparse_autoencode(x, W, be, bd, Wd, Select("batchtopk", 2))
    pre = pre_acts(x, W, be, bd, True).detach()
    want = pre.flatten().topk(2 * N).values.sort().values
    assert torch.allclose(c.vals.sort().values, want.relu(), rtol=1e-5) and (c.rows == 7).sum() > 8


@pytest.mark.parametrize("select", [Select("topk", 2), Select("batchtopk", 2), Select("threshold")])
def test_an_empty_batch_gives_no_codes_and_zero_gradients(select):
    W, be, bd, Wd = params(2)
    c = sparse_autoencode(torch.zeros(0, D), W, be, bd, Wd, select)
    assert c.recon.shape == (0, D) and len(c.vals) == 0
    c.recon.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in (W, be, bd, Wd))


def jumprelu_reference(pre, theta, eps):
    """The paper's JumpReLU with straight-through estimators (Rajamanoharan et al. 2024, eq. 11-12)."""

    class Jump(torch.autograd.Function):
        @staticmethod
        def forward(ctx, p, t):
            ctx.save_for_backward(p, t)
            return p * (p > t)

        @staticmethod
        def backward(ctx, g):
            p, t = ctx.saved_tensors
            k = ((p - t).abs() < eps / 2).to(p) / eps
            return g * (p > t), (-t * k * g).sum(0)

    class Step(torch.autograd.Function):
        @staticmethod
        def forward(ctx, p, t):
            ctx.save_for_backward(p, t)
            return (p > t).to(p)

        @staticmethod
        def backward(ctx, g):
            p, t = ctx.saved_tensors
            return None, (-((p - t).abs() < eps / 2).to(p) / eps * g).sum(0)

    return Jump.apply(pre, theta), Step.apply(pre, theta).sum(0)


@pytest.mark.parametrize("dense_above", [1.0, 0.0])  # the sparse path, the dense path
def test_jumprelu_straight_through_gradients_match_the_paper(dense_above):
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(4))
    W, be, bd, Wd = params(3)
    log_t = torch.full((S,), 1.0).add(torch.rand(S, generator=torch.Generator().manual_seed(5))).log()
    log_t.requires_grad_()
    eps, c0 = 0.5, 0.3
    sel = Select("threshold", bandwidth=eps, dense_above=dense_above)
    c = sparse_autoencode(x, W, be, bd, Wd, sel, theta=log_t.exp())
    loss = (x - (c.recon + bd)).pow(2).sum() + c0 * c.l0.sum()
    z, l0 = jumprelu_reference(pre_acts(x, W, be, bd, True), log_t.exp(), eps)
    r_loss = (x - (z @ Wd + bd)).pow(2).sum() + c0 * l0.sum()
    assert_grads_match(loss, r_loss, [W, be, bd, Wd, log_t])
    assert (len(c.vals) == 0) == (dense_above == 0.0)  # the dense path keeps no entries
    assert torch.equal(c.l0, (z > 0).sum(0).float())


@pytest.mark.parametrize("dense_above", [1.0, 0.0])
@pytest.mark.parametrize("column_major", [False, True])  # the SAEs store W_enc as W_dec.T
def test_relu_with_an_l1_on_the_mass_matches_dense_autograd(dense_above, column_major):
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(6))
    W, be, bd, Wd = p = params(4)
    if column_major:
        W = p[0] = W.detach().T.contiguous().T.requires_grad_()
    with torch.no_grad():
        be -= 2.0  # a sparse-ish pattern
    c = sparse_autoencode(x, W, be, bd, Wd, Select("threshold", dense_above=dense_above))
    loss = (x - (c.recon + bd)).pow(2).sum() + 0.1 * (c.mass * Wd.norm(dim=1)).sum()
    z = pre_acts(x, W, be, bd, True).relu()
    r_loss = (x - (z @ Wd + bd)).pow(2).sum() + 0.1 * (z * Wd.norm(dim=1)).sum()
    assert_grads_match(loss, r_loss, p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on GPU machines)")
@pytest.mark.parametrize(
    "select, with_theta",
    [
        (Select("topk", 4, k_aux=6), True),
        (Select("batchtopk", 3, k_aux=5, groups=(24, 48)), True),
        (Select("threshold", bandwidth=0.5, dense_above=1.0), True),
        (Select("threshold", bandwidth=0.5, dense_above=0.0), True),
        (Select("threshold", dense_above=1.0), True),
        (Select("threshold", dense_above=1.0), False),  # relu: the dense pass
        (Select("threshold", dense_above=0.0), False),  # relu: the sparse pass
    ],
)
def test_every_rule_runs_on_cuda_as_on_cpu(select, with_theta):
    """The same pass on a GPU gives the CPU's loss and gradients (fp32; the bf16 path is the trainer's)."""
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(7))
    out = {}
    for dev in ("cpu", "cuda"):
        W, be, bd, Wd = p = [t.detach().to(dev).requires_grad_() for t in params(6)]
        theta = torch.full((S,), 1.2, device=dev, requires_grad=True) if with_theta else None
        dead = torch.arange(0, S, 3, device=dev)
        c = sparse_autoencode(x.to(dev), W, be, bd, Wd, select, theta=theta, dead=dead)
        recon = c.recon.sum(0) if c.recon.dim() == 3 else c.recon
        loss = (x.to(dev) - recon - bd).pow(2).sum() + c.aux_recon.pow(2).sum() + 0.3 * c.l0.sum() + 0.1 * c.mass.sum()
        grads = torch.autograd.grad(loss, [*p] + ([theta] if with_theta else []), allow_unused=True)
        out[dev] = (loss.detach().cpu(), [None if g is None else g.cpu() for g in grads])
    assert torch.allclose(out["cpu"][0], out["cuda"][0], rtol=1e-4)
    for a, b in zip(out["cpu"][1], out["cuda"][1]):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-3, atol=1e-3 * a.abs().max()))
