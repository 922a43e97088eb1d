"""Logit effects on the tiny real-architecture model: each decoder row's top and bottom tokens
equal a reference computed by hand (RMSNorm with Qwen's (1 + w) scale, then the unembedding)."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from harvest.cli import logit_effects_cmd
from harvest.config import ModelConfig
from harvest.model import load_model
from train.export import export_sae
from train.sae import TopKSAE


def test_logit_effects_command_matches_a_hand_computed_reference(tmp_path, monkeypatch):
    from harvest import splice

    monkeypatch.setattr(splice, "FEATURE_CHUNK", 7)  # several chunks, the last one partial
    d, n = 64, 20
    torch.manual_seed(0)
    sae = TopKSAE(d, n, 4)
    export_sae(sae, tmp_path / "sae", {"d_in": d, "d_sae": n, "k": 4, "layer": 3})
    r = CliRunner().invoke(logit_effects_cmd, ["--profile", "tiny", "--sae", str(tmp_path / "sae"), "--quiet"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    t = pq.read_table(tmp_path / "sae" / "logit_effects.parquet").to_pandas()
    assert t["feature"].tolist() == list(range(n))

    lm = load_model(ModelConfig(name_or_path="builtin:tiny", dtype="float32", device_map="cpu"))
    norm = lm.model.model.language_model.norm
    w_u = lm.model.get_output_embeddings().weight.detach().double()
    x = sae.W_dec.detach().double()
    normed = x / torch.sqrt((x**2).mean(dim=1, keepdim=True) + norm.eps) * (1 + norm.weight.detach().double())
    logits = (normed @ w_u.T).numpy()
    for f in (0, 6, 7, 19):
        order = np.argsort(-logits[f])
        assert t.loc[f, "top_token_ids"].tolist() == order[:10].tolist()
        assert t.loc[f, "top_values"] == pytest.approx(logits[f][order[:10]], rel=1e-4, abs=1e-4)
        assert t.loc[f, "bottom_token_ids"].tolist() == order[::-1][:10].tolist()
        assert t.loc[f, "top_tokens"][0] == lm.tokenizer.decode([int(order[0])], skip_special_tokens=False)
        assert sum(t.loc[f, "hist_counts"]) == logits.shape[1]
        assert t.loc[f, "hist_low"] == pytest.approx(logits[f].min(), rel=1e-4)


def test_wrong_width_is_one_line(tmp_path):
    sae = TopKSAE(32, 8, 2)
    export_sae(sae, tmp_path / "sae", {"d_in": 32, "d_sae": 8, "k": 2, "layer": 1})
    r = CliRunner().invoke(logit_effects_cmd, ["--profile", "tiny", "--sae", str(tmp_path / "sae"), "--quiet"])
    assert r.exit_code != 0 and "d_in=32" in str(r.exception) and "hidden size is 64" in str(r.exception)


def test_a_cache_harvested_from_another_model_is_refused(tmp_path):
    """--cache is checked, not ignored: decoder rows mean something only through the model whose
    residuals the SAE was trained on."""
    from support import write_cache

    sae = TopKSAE(64, 8, 2)
    export_sae(sae, tmp_path / "sae", {"d_in": 64, "d_sae": 8, "k": 2, "layer": 1})
    write_cache(str(tmp_path / "c"), d_model=64)  # harvested from "test/model"
    args = ["--profile", "tiny", "--sae", str(tmp_path / "sae"), "--cache", str(tmp_path / "c"), "--quiet"]
    r = CliRunner().invoke(logit_effects_cmd, args)
    assert r.exit_code != 0 and "was harvested from 'test/model'" in str(r.exception)
    assert not (tmp_path / "sae" / "logit_effects.parquet").exists()
