"""Model loading: the tiny model's real architecture and provenance, other families by path, one-line errors."""

from pathlib import Path

import pytest

from harvest import tiny
from harvest.config import ModelConfig
from harvest.model import ModelError, describe_model, load_model

TINY = ModelConfig(name_or_path="builtin:tiny", dtype="float32", device_map="cpu")


def test_tiny_model_is_a_hybrid_qwen3_5_with_provenance():
    lm = load_model(TINY)
    assert type(lm.model).__name__ == "Qwen3_5ForConditionalGeneration"
    assert lm.layers_path == "model.language_model.layers" and lm.n_layers >= 6
    types = lm.model.config.text_config.layer_types
    assert {"linear_attention", "full_attention"} <= set(types)
    p = lm.provenance
    assert p["class"] == "Qwen3_5ForConditionalGeneration" and p["builtin"] == "tiny"
    assert p["weights_sha256"] == tiny.weights_hash(Path(p["resolved_path"]))
    assert p["dtype"] == "float32" and p["d_model"] == lm.d_model
    assert not lm.model.training
    info = describe_model(TINY)  # the driver's view, built on the meta device
    assert info["provenance"]["weights_sha256"] == p["weights_sha256"] and info["n_layers"] == lm.n_layers


def test_text_only_auto_class_finds_model_layers():
    lm = load_model(ModelConfig(name_or_path="builtin:tiny", dtype="float32", device_map="cpu", auto_class="causal-lm"))
    assert type(lm.model).__name__ == "Qwen3_5ForCausalLM" and lm.layers_path == "model.layers"


def test_model_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "nope")))
    with pytest.raises(ModelError, match="not a torch dtype"):
        load_model(ModelConfig(name_or_path="builtin:tiny", dtype="bfloat17", device_map="cpu"))
    with pytest.raises(ModelError, match="layers_path"):
        load_model(
            ModelConfig(name_or_path="builtin:tiny", dtype="float32", device_map="cpu", layers_path="model.nope")
        )
    lm = load_model(TINY)
    with pytest.raises(ModelError, match="past the model's depth"):
        lm.check_layers([1, lm.n_layers])


def test_a_saved_llama_style_model_loads_by_path_with_its_layers(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "llama" / name).write_bytes((tiny.assets() / name).read_bytes())
    lm = load_model(ModelConfig(name_or_path=str(tmp_path / "llama"), dtype="float32", device_map="cpu"))
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.layers_path == "model.layers"
    assert lm.n_layers == 3 and lm.d_model == 32 and lm.provenance["resolved_path"] == str(tmp_path / "llama")
