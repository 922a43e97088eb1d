"""Decoder-cosine neighbours against a brute-force numpy reference, within and across SAEs."""

import numpy as np
import pytest
import torch

from train.analysis import features as neighbours
from train.analysis.features import decoder_neighbours


def test_neighbours_match_brute_force(monkeypatch):
    monkeypatch.setattr(neighbours, "BLOCK", 7)  # several blocks, the last one partial
    g = torch.Generator().manual_seed(0)
    decs = {"A": torch.randn(30, 8, generator=g) * 3, "B": torch.randn(20, 8, generator=g), "C": torch.randn(5, 4)}
    out = decoder_neighbours(decs)
    unit = {k: (v / v.norm(dim=1, keepdim=True)).numpy() for k, v in decs.items()}
    a = out["A"]
    assert set(a["sae"]) == {"A", "B"}  # C has another d_in: never compared
    for f in (0, 13, 29):
        mine = {s: (a["neighbour"][(a["feature"] == f) & (a["sae"] == s)]) for s in ("A", "B")}
        cos_a = unit["A"] @ unit["A"][f]
        cos_a[f] = -np.inf
        assert mine["A"].tolist() == np.argsort(-cos_a)[: neighbours.SAME_SAE].tolist()
        cos_b = unit["B"] @ unit["A"][f]
        assert mine["B"].tolist() == np.argsort(-cos_b)[: neighbours.OTHER_SAE].tolist()
        got = a["cosine"][(a["feature"] == f) & (a["sae"] == "B")]
        assert got == pytest.approx(np.sort(cos_b)[::-1][: neighbours.OTHER_SAE], abs=1e-5)
    rows = a["feature"] == 3
    assert a["sae"][rows].tolist() == ["A"] * neighbours.SAME_SAE + ["B"] * neighbours.OTHER_SAE  # own SAE first
    assert out["C"]["sae"].tolist() == ["C"] * 5 * 4  # 5 features, 4 others each (self excluded)
