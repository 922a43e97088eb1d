"""The tiny model's build: atomic and concurrent-safe, offline tokenizer, trained better than uniform."""

import json
import math
import threading

import pytest
import torch

from harvest import tiny
from harvest.config import ModelConfig
from harvest.model import load_model

TINY = ModelConfig(name_or_path="builtin:tiny", dtype="float32", device_map="cpu")


def test_two_concurrent_builds_publish_one_identical_model(tmp_path, monkeypatch):
    import transformers

    transformers.Qwen3_5ForConditionalGeneration  # resolve the lazy import before threads race on it
    # a 3-step recipe: same code path, a second instead of the full training
    monkeypatch.setitem(tiny.RECIPE, "steps", 3)
    monkeypatch.setenv("ACTCACHE_HOME", str(tmp_path / "a"))
    dirs = []
    ts = [threading.Thread(target=lambda: dirs.append(tiny.tiny_model_dir())) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(dirs) == 2 and dirs[0] == dirs[1]
    assert [p.name for p in (tmp_path / "a").iterdir()] == [dirs[0].name]  # no half-built leftovers
    recorded = (dirs[0] / "weights.sha256").read_text().strip()
    assert recorded == tiny.weights_hash(dirs[0])
    info = tiny.build_info(dirs[0])
    assert info["recipe"]["steps"] == 3 and info["seed"] == tiny.SEED and len(info["data_sha256"]) == 64
    assert info["loss_last"] < info["loss_first"]
    # the recipe is part of the key: the full model lives elsewhere
    monkeypatch.setitem(tiny.RECIPE, "steps", 4)
    assert tiny.tiny_model_dir().name != dirs[0].name
    # the same seed and recipe build the same weights again, elsewhere
    monkeypatch.setitem(tiny.RECIPE, "steps", 3)
    monkeypatch.setenv("ACTCACHE_HOME", str(tmp_path / "b"))
    again = tiny.tiny_model_dir()
    assert again.name == dirs[0].name and (again / "weights.sha256").read_text().strip() == recorded


def test_tokenizer_works_offline_in_both_libraries():
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny.assets()))
    msgs = [{"role": "user", "content": "What is 2+2?\nA. 3\nB. 4"}]
    on = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on.startswith("<|im_start|>user\n") and on.endswith("<|im_start|>assistant\n<think>\n")
    assert off.endswith("<think>\n\n</think>\n\n")
    plain = Tokenizer.from_file(str(tiny.assets() / "tokenizer.json"))
    assert plain.encode(on).ids == tok(on)["input_ids"]
    for special in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"):
        assert len(plain.encode(special).ids) == 1
    assert json.loads((tiny.assets() / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


def test_tiny_model_predicts_better_than_uniform_and_ablation_hurts():
    """The build trains it on the bundled text: clean CE well under ln(vocab), and zeroing a
    middle layer's output (the residual then stays zero: uniform logits) costs over a nat."""
    lm = load_model(TINY)
    assert lm.provenance["build"]["recipe"] == tiny.RECIPE
    text = (tiny.assets() / "corpus.txt").read_text()
    ids = torch.tensor(lm.tokenizer(text)["input_ids"][:512]).view(4, 128)

    def ce(hook=None):
        h = lm.layers[lm.n_layers // 2 - 1].register_forward_hook(hook) if hook else None
        try:
            with torch.no_grad():
                return lm.model(input_ids=ids, labels=ids).loss.item()
        finally:
            if h:
                h.remove()

    uniform = math.log(lm.model.config.text_config.vocab_size)
    clean, zero = ce(), ce(lambda m, a, o: torch.zeros_like(o))
    assert clean < uniform - 1.5, (clean, uniform)
    assert zero == pytest.approx(uniform, abs=1e-3)
    assert zero - clean > 1.0, (clean, zero)
