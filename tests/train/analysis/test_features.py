"""The whole analysis (feature statistics and the reverse index) on a real cache whose labels and activations are
known by construction: an exact ±basis SAE makes feature j's activation equal to x_j.

Per-feature statistics on hand-made codes: no labels or one class leave AUROC empty, mixed
labels within a rollout are refused.

Decoder-cosine neighbours against a brute-force numpy reference, within and across SAEs.
"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from analysis_data import FRACTION, LAYER, SEED, D, identity_sae, make_cache

import cache_format as cf
from cache_format.split import is_heldout
from train.analysis import features as neighbours
from train.analysis.features import analyze, decoder_neighbours
from train.analysis.scan import RowSelection
from train.config import AnalysisConfig


@pytest.fixture(scope="module")
def cache_url(tmp_path_factory):
    return make_cache(str(tmp_path_factory.mktemp("c") / "cache"))


def _expected_rows(url):
    c = cf.open_cache(url)
    seq, roles = c.seq_ids[:], c.roles[:]
    keep = is_heldout(seq, SEED, FRACTION) & np.isin(roles, [2, 3])
    x = c.residuals(LAYER)[:].float().numpy()
    return c, keep, x


def test_feature_metrics_and_reverse_index(cache_url, tmp_path):
    cfg = AnalysisConfig(top_examples=3, context_tokens=4, bootstrap=50, permutations=500, min_fires=2)
    out = tmp_path / "a"
    summary = analyze(identity_sae(), cache_url, LAYER, out, cfg, RowSelection(SEED, FRACTION, (2, 3)), progress=False)
    fm = pq.read_table(out / "feature_metrics.parquet").to_pandas().set_index("feature")
    c, keep, x = _expected_rows(cache_url)
    xs = x[keep]
    assert summary["summary"]["tokens"] == keep.sum()
    # fire rate, mean and max by hand from the residuals (feature j = relu(x_j) for j < 16)
    for j in range(D):
        on = xs[:, j] > 0
        assert fm.loc[j, "fire_rate"] == pytest.approx(on.mean())
        if on.any():
            assert fm.loc[j, "max_activation"] == pytest.approx(xs[on, j].max(), rel=1e-6)
            assert fm.loc[j, "mean_activation"] == pytest.approx(xs[on, j].mean(), rel=1e-5)
    assert (fm.loc[D:, "fire_count"] == 0).all()  # the −basis half never fires
    # feature 0 separates correct from wrong perfectly; feature 1 carries no signal
    assert fm.loc[0, "auroc"] == pytest.approx(1.0) and fm.loc[0, "direction"] == "correct↑"
    assert fm.loc[0, "seq_auroc"] == pytest.approx(1.0)
    assert fm.loc[0, "auroc_ci_low"] == pytest.approx(1.0)
    assert fm.loc[1, "auroc"] == pytest.approx(0.5) and fm.loc[1, "p_value"] == pytest.approx(1.0)
    assert fm.loc[0, "fire_rate_correct"] == pytest.approx(1.0) and fm.loc[0, "fire_rate_wrong"] == 0.0
    # A perfect split of ~20 held-out rollouts: none of 500 label shuffles (each a 2/C(n, n_pos)
    # chance) reaches it, so p = (1 + 0) / (1 + 500); BH keeps it significant.
    assert fm.loc[0, "p_value"] == pytest.approx(1 / 501)
    assert fm.loc[0, "q_value"] <= 0.05
    assert fm.loc[D, "p_value"] != fm.loc[D, "p_value"]  # dead features are not tested (NaN)

    prompts = pq.read_table(out / "feature_prompts.parquet").to_pandas()
    tok = c.tokenizer()
    seq_tokens = {r["seq_id"]: np.asarray(r["token_ids"]) for r in c.sequences().to_pylist()}
    assert set(prompts["feature"]) == set(fm.index[fm["fire_count"] > 0])
    for r in prompts.to_dict("records"):
        full = seq_tokens[r["seq_id"]]
        p = r["position"]
        assert full[p] == r["token_id"]
        assert list(r["context_token_ids"]) == full[max(0, p - 4) : p + 5].tolist()
        assert r["token"] == tok.decode([int(r["token_id"])], skip_special_tokens=False)
        assert r["context_before"] == tok.decode(full[max(0, p - 4) : p].tolist(), skip_special_tokens=False)
        if r["feature"] >= 8:
            assert r["token_id"] % 8 == r["feature"] - 8  # the feature's own token
        # the row really activates the feature by the stored amount
        assert xs[:, r["feature"]].max() >= r["activation"] - 1e-6
    assert not prompts.duplicated(["feature", "seq_id"]).any()  # one example per sequence
    assert prompts.groupby("feature").size().max() == cfg.top_examples
    top = prompts[prompts["rank"] == 0].set_index("feature")
    for j in top.index:
        assert top.loc[j, "activation"] == pytest.approx(fm.loc[j, "max_activation"], rel=1e-6)
    stats = json.loads((out / "feature_stats.json").read_text())[f"L{LAYER}"]
    assert len(stats["auroc"]) == 2 * D and stats["auroc"][0] == pytest.approx(1.0)


def test_window_values_and_profiles(cache_url, tmp_path):
    """Every window token's stored value is the feature's activation on that row (relu(x_j) for
    the ±basis SAE) where the scan covered it, NaN where it did not; the histogram and the fire
    rates by role and position count the same rows."""
    from analysis_data import residual

    from train.analysis.features import POSITION_EDGES, position_bucket

    cfg = AnalysisConfig(top_examples=3, context_tokens=40, bootstrap=0, permutations=0)  # whole sequences
    out = tmp_path / "a"
    res = analyze(identity_sae(), cache_url, LAYER, out, cfg, RowSelection(SEED, FRACTION, (2, 3)), progress=False)
    c, keep, x = _expected_rows(cache_url)
    seq, pos, roles = c.seq_ids[:], c.positions[:], c.roles[:]
    scanned = {(int(s), int(p)) for s, p in zip(seq[keep], pos[keep])}
    correct = {r["seq_id"]: r["correct"] for r in c.sequences().to_pylist()}
    tok = c.tokenizer()
    prompts = pq.read_table(out / "feature_prompts.parquet").to_pandas()
    n_nan = 0
    for r in prompts.to_dict("records"):
        ids, vals, focus = list(r["context_token_ids"]), r["context_activations"], r["context_focus"]
        assert len(vals) == len(ids) == len(r["context_tokens"])
        assert ids[focus] == r["token_id"] and vals[focus] == pytest.approx(r["activation"], rel=1e-6)
        assert list(r["context_tokens"]) == [tok.decode([i], skip_special_tokens=False) for i in ids]
        for j, (t, v) in enumerate(zip(ids, vals)):
            p = r["position"] - focus + j
            if (r["seq_id"], p) in scanned:
                want = max(0.0, residual(t, p, correct[r["seq_id"]])[r["feature"]])
                assert v == pytest.approx(want, rel=1e-2, abs=1e-6), (r["feature"], r["seq_id"], p)
            else:
                assert np.isnan(v)
                n_nan += 1
    assert n_nan > 0  # the windows reach prompt rows, which the scan skips

    prof = pq.read_table(out / "feature_profiles.parquet").to_pandas().set_index("feature")
    xs = x[keep]
    for j in range(D):
        on = xs[:, j] > 0
        assert sum(prof.loc[j, "hist_counts"]) == on.sum()
        if on.any():
            assert prof.loc[j, "hist_high"] == pytest.approx(xs[on, j].max(), rel=1e-6)
        for code, name in ((2, "thinking"), (3, "answer")):
            rows = roles[keep] == code
            assert prof.loc[j, f"fire_rate_{name}"] == pytest.approx(on[rows].mean())
        assert np.isnan(prof.loc[j, "fire_rate_prompt"])  # prompt rows were not analyzed
        bucket = position_bucket(pos[keep])
        for b in range(len(POSITION_EDGES)):
            rate = prof.loc[j, "fire_rate_by_position"][b]
            if (bucket == b).any():
                assert rate == pytest.approx(on[bucket == b].mean(), rel=1e-5)
            else:
                assert np.isnan(rate)
    assert res["profiles"]["rows_by_role"]["prompt"] == 0
    assert pq.ParquetFile(out / "feature_prompts.parquet").metadata.num_columns >= 17


def test_corpus_rows_without_labels_leave_auroc_empty():
    from train.analysis.features import feature_metrics, top_examples
    from train.analysis.report import top_features

    rng = np.random.default_rng(0)
    n, d, k = 200, 12, 3
    idx = np.stack([rng.choice(d - 2, k, replace=False) for _ in range(n)]).astype(np.int32)  # 10, 11 dead
    vals = rng.random((n, k)).astype(np.float32) + 0.1
    seq = np.repeat(np.arange(20), 10)
    cfg = AnalysisConfig(bootstrap=5, permutations=5)
    fm, summary = feature_metrics(idx, vals, seq, np.full(n, -1), d, cfg)
    assert summary["labels"] == "none" and summary["alive"] == d - 2
    assert np.isnan(fm["auroc"]).all() and np.isnan(fm["q_value"]).all() and (fm["direction"] == "").all()
    np.testing.assert_allclose(fm["fire_rate"], np.bincount(idx.ravel(), minlength=d) / n)
    # one class only: still no AUROC, said so
    _, s1 = feature_metrics(idx, vals, seq, np.ones(n, int), d, cfg)
    assert s1["labels"] == "one class only"
    # the report then ranks alive features by their strongest activation
    import pandas as pd

    top = top_features(pd.DataFrame({k2: v for k2, v in fm.items()}), 3)
    assert list(top["max_activation"]) == sorted(fm["max_activation"][: d - 2], reverse=True)[:3]
    ex = top_examples(idx, vals, 2)
    assert set(ex["feature"]) == set(range(d - 2)) and (np.bincount(ex["feature"]) == 2).all()


def test_rollout_with_mixed_labels_is_refused():
    from cache_format.errors import UserError
    from train.analysis.features import feature_metrics

    idx = np.array([[0], [1], [0], [1]], np.int32)
    vals = np.ones((4, 1), np.float32)
    with pytest.raises(UserError, match="both correct and wrong labels"):
        feature_metrics(idx, vals, np.array([7, 7, 8, 8]), np.array([1, 0, 1, 1]), 2, AnalysisConfig())


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
