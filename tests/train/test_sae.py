"""The SAE contract (shapes, conventions, folding) and its geometric-median init."""

import pytest
import torch

from train.sae import TopKSAE, geometric_median


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
