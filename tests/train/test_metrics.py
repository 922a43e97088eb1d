"""train.metrics: the definitions, and the same numbers however the rows are batched or split
across accumulators (ranks, dask chunks)."""

import torch

from train.metrics import ReconstructionMetrics


def test_metrics_match_their_definitions_however_the_rows_are_batched():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g) * 3 + 5  # far from zero mean: the variance needs the mean
    x_hat = x + 0.5 * torch.randn(300, 8, generator=g)
    vals = torch.rand(300, 2, generator=g)
    vals[::3, 1] = 0
    idx = torch.randint(0, 20, (300, 2), generator=g)
    whole = ReconstructionMetrics(32)
    whole.update(x, x_hat, vals, idx)
    merged = ReconstructionMetrics(32)  # starts empty
    for a, b in ((0, 7), (7, 150), (150, 300)):
        part = ReconstructionMetrics(32)
        part.update(x[a:b], x_hat[a:b], vals[a:b], idx[a:b])
        merged.merge(part)
    xd = x.double()
    got = whole.compute()
    want_ve = 1 - float((xd - x_hat.double()).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum())
    assert abs(got["variance_explained"] - want_ve) < 1e-12 and 0 < want_ve < 1
    assert abs(got["mse"] - float((xd - x_hat.double()).pow(2).mean())) < 1e-12
    alive = len(set(idx[vals != 0].tolist()))
    assert got["l0"] == int((vals != 0).sum()) / 300 and got["alive"] == alive == 20
    assert got["dead_fraction"] == 1 - alive / 32 and got["tokens"] == 300
    assert all(abs(merged.compute()[k] - v) < 1e-12 for k, v in got.items())
