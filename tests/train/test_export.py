"""Every kind exports as SAELens 6 saves its own (checked against pinned schemas of what SAELens
reads: topk as "topk", batchtopk and matryoshka as "jumprelu" with the learned threshold, jumprelu
as "jumprelu", relu as "standard"), and SAELens files load with SAELens' own encoding,
`rescale_acts_by_decoder_norm` included.

The schemas in fixtures/ were transcribed from sae-lens 6.54's config classes and loader; the
bench environment checks the same exports against SAELens itself (bench_trainer_export).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cache_format.errors import UserError
from train.export import export_sae, sae_lens_cfg
from train.published import load_sae
from train.sae import BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE, TopKSAE

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SCHEMAS = {
    a: json.loads((FIXTURES / f"sae_lens_6_{a}_cfg_schema.json").read_text()) for a in ("topk", "jumprelu", "standard")
}
SCHEMA = SCHEMAS["topk"]
TYPES = {"int": int, "str": str, "bool": bool}


def saelens_reference(w: dict, cfg: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense codes, reconstruction) as the schema's encode/decode formulas (SAELens' TopKSAE) say."""
    norm = w["W_dec"].norm(dim=1) if cfg.get("rescale_acts_by_decoder_norm") else torch.ones(w["W_dec"].shape[0])
    pre = ((x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)) @ w["W_enc"] + w["b_enc"]) * norm
    v, i = pre.topk(cfg["k"], dim=-1)
    acts = torch.zeros_like(pre).scatter(1, i, v.relu())
    return acts, (acts / norm) @ w["W_dec"] + w["b_dec"]


def make(kind):
    return {
        "topk": lambda: TopKSAE(16, 64, 4),
        "batchtopk": lambda: BatchTopKSAE(16, 64, 4),
        "matryoshka": lambda: MatryoshkaSAE(16, 64, 4, [16, 32, 64]),
        "jumprelu": lambda: JumpReLUSAE(16, 64, init_threshold=0.5),
        "relu": lambda: ReLUSAE(16, 64),
    }[kind]()


def export(tmp_path, *, relu=True, cache="caches/planted", normalize=False, kind="topk"):
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 4, relu=relu) if kind == "topk" else make(kind)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        if kind in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.4)
        if kind == "jumprelu":
            sae.threshold.uniform_(0.1, 1.5)
        if normalize:  # folded into the exported weights
            sae.input_mean.normal_()
            sae.input_scale.uniform_(0.5, 2.0)
    cfg = sae_lens_cfg(
        sae,
        layer=11,
        hook="resid_post",
        hook_module="model.language_model.layers.11",
        model="Qwen/Qwen3.6-27B",
        fingerprint="f" * 16,
        tokens=4096,
        split={"seed": 0, "fraction": 0.1},
        normalization={"kind": "none"},
        config={"exclude_special": False},
        cache_url=cache,
        source={"name": "corpus", "seq_len": 1024},
        context=1024,
    )
    out = tmp_path / ("L11_n64_k4" if kind == "topk" else f"L11_n64_{kind}")
    export_sae(sae, out, cfg)
    return sae, out


def test_export_is_a_sae_lens_6_topk_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sae, out = export(tmp_path, normalize=True)
    cfg = json.loads((out / "cfg.json").read_text())
    for name, field in SCHEMA["fields"].items():
        assert type(cfg[name]) is TYPES[field["type"]], name
        assert cfg[name] in field.get("choices", [cfg[name]]), name
    assert cfg["architecture"] == SCHEMA["architecture"] and cfg["k"] == 4 and (cfg["d_in"], cfg["d_sae"]) == (16, 64)
    meta = cfg["metadata"]
    version = tuple(int(v) for v in meta[SCHEMA["metadata"]["version_key"]].split(".")[:3])
    assert version >= tuple(int(v) for v in SCHEMA["metadata"]["min_version"].split("."))  # not a pre-6.0 config
    for key, t in SCHEMA["metadata"]["types"].items():
        assert type(meta[key]) is TYPES[t], key
    assert set(meta) <= set(SCHEMA["metadata"]["llm_keys"])
    assert meta["prepend_bos"] is False and meta["context_size"] == 1024 and meta["model_name"] == "Qwen/Qwen3.6-27B"
    assert meta["hook_name"] == "blocks.11.hook_resid_post"
    assert meta["hf_hook_name"] == "model.language_model.layers.11"
    # the cache resolves from anywhere: the relative path given is recorded absolute
    assert meta["dataset_path"] == cfg["cache"] == str(tmp_path / "caches" / "planted")
    assert cfg["layer"] == 11 and cfg["layer_fingerprint"] == "f" * 16 and cfg["split"]["fraction"] == 0.1
    w = load_file(str(out / SCHEMA["weights"]["file"]))
    for name, dims in SCHEMA["weights"].items():
        if name != "file":
            assert tuple(w[name].shape) == tuple(cfg[d] for d in dims), name
    # SAELens' encoding of the exported weights gives our codes on raw residuals
    x = torch.randn(32, 16) * 3
    acts, recon = saelens_reference(w, cfg, x)
    with torch.no_grad():
        torch.testing.assert_close(acts, sae.dense(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(recon, sae(x), rtol=1e-4, atol=1e-4)
        back = load_sae(out)
        torch.testing.assert_close(back.dense(x), sae.dense(x), rtol=1e-4, atol=1e-4)
    assert back.cfg["layer"] == 11


SAE_LENS_NAMES = {"batchtopk": "batchtopk", "matryoshka": "matryoshka_batchtopk", "jumprelu": "jumprelu"}


@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka", "jumprelu", "relu"])
def test_every_kind_exports_as_saelens_saves_it(tmp_path, kind):
    sae, out = export(tmp_path, normalize=True, kind=kind)
    cfg = json.loads((out / "cfg.json").read_text())
    arch = "standard" if kind == "relu" else "jumprelu"
    schema = SCHEMAS[arch]
    assert cfg["architecture"] == schema["architecture"] == arch and cfg["kind"] == kind
    for name, field in schema["fields"].items():
        assert type(cfg[name]) is TYPES[field["type"]], name
        assert cfg[name] in field.get("choices", [cfg[name]]), name
    assert "k" not in cfg and "rescale_acts_by_decoder_norm" not in cfg  # fields its config class lacks
    meta = cfg["metadata"]
    assert set(meta) <= set(schema["metadata"]["llm_keys"]) and meta["prepend_bos"] is False
    assert meta["training_architecture"] in schema["training_architectures"]
    assert meta["training_architecture"] == SAE_LENS_NAMES.get(kind, "standard")
    w = load_file(str(out / schema["weights"]["file"]))
    want = {n: d for n, d in schema["weights"].items() if n != "file"}
    assert set(w) == set(want)  # SAELens loads the state dict strictly
    for name, dims in want.items():
        assert tuple(w[name].shape) == tuple(cfg[d] for d in dims), name
    # the schema's encoding of the exported weights gives our codes on raw residuals
    x = torch.randn(48, 16) * 3
    pre = (x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]
    acts = pre.relu() * (pre > w["threshold"]) if arch == "jumprelu" else pre.relu()
    with torch.no_grad():
        torch.testing.assert_close(acts, sae.dense(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(acts @ w["W_dec"] + w["b_dec"], sae(x), rtol=1e-4, atol=1e-4)
        assert (acts != 0).any() and (acts == 0).any()
        back = load_sae(out)  # and `train eval` reads it back as the same kind of codes
        torch.testing.assert_close(back.dense(x), sae.dense(x), rtol=1e-4, atol=1e-4)
    pt = torch.load(out / f"sae_{out.name}.pt", weights_only=True)
    assert set(pt) == set(want)


def test_a_url_cache_is_recorded_as_given(tmp_path):
    _, out = export(tmp_path, cache="s3://team-bucket/caches/qwen")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["cache"] == cfg["metadata"]["dataset_path"] == "s3://team-bucket/caches/qwen"


def test_an_sae_without_relu_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        export(tmp_path, relu=False)
    assert "ReLU" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "L11_n64_k4").exists()


def test_rescale_acts_by_decoder_norm_is_honoured(tmp_path):
    g = torch.Generator().manual_seed(4)
    w = {
        "W_enc": torch.randn(16, 64, generator=g),
        "b_enc": torch.randn(64, generator=g) * 0.1,
        "W_dec": torch.randn(64, 16, generator=g) * (torch.rand(64, 1, generator=g) * 3 + 0.2),
        "b_dec": torch.randn(16, generator=g),
    }
    cfg = {
        "architecture": "topk",
        "d_in": 16,
        "d_sae": 64,
        "k": 4,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "rescale_acts_by_decoder_norm": True,
        "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.7.hook_resid_post"},
    }
    d = tmp_path / "saelens"
    d.mkdir()
    save_file(w, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps(cfg))
    x = torch.randn(40, 16, generator=g) * 2
    acts, recon = saelens_reference(w, cfg, x)
    plain, _ = saelens_reference(w, dict(cfg, rescale_acts_by_decoder_norm=False), x)
    assert not torch.allclose(acts, plain)  # the flag changes the codes, so ignoring it would show
    sae = load_sae(d)
    assert sae.cfg["layer"] == 7  # from the metadata block
    with torch.no_grad():
        torch.testing.assert_close(sae.dense(x), acts, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sae(x), recon, rtol=1e-4, atol=1e-4)
