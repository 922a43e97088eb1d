"""Per-feature statistics on hand-made codes: no labels or one class leave AUROC empty, mixed
labels within a rollout are refused."""

import numpy as np
import pytest

from train.config import AnalysisConfig


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
