"""The training kernels against dense autograd."""

import pytest
import torch

from train.kernels import sparse_decode, topk_autoencode


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
    params = [
        torch.randn(D, S, requires_grad=True),
        torch.randn(S, requires_grad=True),
        torch.randn(D, requires_grad=True),
        torch.randn(S, D, requires_grad=True),
    ]
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
    want = torch.autograd.grad(
        torch.nn.functional.embedding_bag(idx, W, per_sample_weights=vals, mode="sum"), [vals, W], g
    )
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))
