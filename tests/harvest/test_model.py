"""The base model: the tiny model's real architecture and provenance, other families by path,
one-line errors; the tiny model's build (atomic and concurrent-safe, offline tokenizer, trained
better than uniform); and GPU machines without a GPU: the install's CUDA detection, the
reference-kernel note, and each dask worker's GPU, all through their seams (ACTCACHE_CUDA,
ACTCACHE_GPU_COUNT)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from harvest import run as hr
from harvest import tiny
from harvest.config import ModelConfig
from harvest.model import (
    FAST_KERNELS,
    ModelError,
    describe_model,
    device_for,
    load_model,
    reference_kernel_note,
    worker_slots,
)

TINY = ModelConfig(name_or_path="builtin:tiny", dtype="float32", device_map="cpu")
ROOT = Path(__file__).resolve().parents[2]


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


# -- the tiny model's build


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


# -- GPU machines


def make(*args, **env):
    return subprocess.run(
        ["make", "-s", "--no-print-directory", *args, f"PY={sys.executable}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_make_install_adds_the_fast_kernels_only_where_cuda_is_detected():
    on = make("gpu-kernels", "PIP_GPU=echo pip-install", ACTCACHE_CUDA="1")
    assert on.returncode == 0 and "pip-install flash-linear-attention causal-conv1d" in on.stdout, on
    off = make("gpu-kernels", "PIP_GPU=echo pip-install", ACTCACHE_CUDA="0")
    assert off.returncode == 0 and "pip-install" not in off.stdout and "not installed" in off.stdout, off
    dry = make("-n", "-W", "pyproject.toml", "install", ACTCACHE_CUDA="1")
    assert "gpu-kernels" in dry.stdout  # the install recipe runs the detection step
    failing = make("gpu-kernels", "PIP_GPU=false", ACTCACHE_CUDA="1")  # a kernel that cannot build
    assert failing.returncode == 0 and "could not install" in failing.stdout, failing
    for value, want in (("1", "cuda"), ("0", "cpu")):
        out = subprocess.run(
            [sys.executable, "-m", "harvest", "detect-gpu"],
            capture_output=True,
            text=True,
            env={**os.environ, "ACTCACHE_CUDA": value},
        )
        assert out.stdout.strip() == want


def test_harvest_names_the_reference_kernels_in_one_line_on_a_gpu_only():
    lm = load_model(TINY)
    assert reference_kernel_note(lm.model, "cpu") is None
    note = reference_kernel_note(lm.model, "cuda:1")
    if all(importlib.util.find_spec(m) for m in FAST_KERNELS):
        assert note is None
    else:
        assert "\n" not in note and "6 Gated DeltaNet layers" in note and "cuda:1" in note and "make install" in note


def test_worker_slots_count_per_host_whatever_the_names():
    workers = {
        "tcp://10.0.0.1:4001": {"host": "10.0.0.1", "name": "trainer-b"},
        "tcp://10.0.0.1:4000": {"host": "10.0.0.1", "name": "trainer-a"},
        "tcp://10.0.0.2:4000": {"host": "10.0.0.2", "name": "trainer-c"},
    }
    assert worker_slots(workers) == {"tcp://10.0.0.1:4000": 0, "tcp://10.0.0.1:4001": 1, "tcp://10.0.0.2:4000": 0}


@pytest.mark.slow
def test_dask_workers_with_names_that_are_not_numbers_get_distinct_gpus(monkeypatch):
    from dask.distributed import Client, Scheduler, SpecCluster, Worker

    monkeypatch.setenv("ACTCACHE_GPU_COUNT", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    spec = {name: {"cls": Worker, "options": {"nthreads": 1}} for name in ("gpu-node-b", "gpu-node-a")}
    with (
        SpecCluster(
            workers=spec, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}}, asynchronous=False
        ) as cluster,
        Client(cluster) as client,
    ):
        pinned = hr.pin_worker_devices(client)
        assert sorted(pinned.values()) == ["cuda:0", "cuda:1"]
        assert client.run(lambda dask_worker: dask_worker.actcache_device) == pinned
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # a launcher gave each worker its own GPU
        assert set(hr.pin_worker_devices(client).values()) == {"cuda:0"}
    monkeypatch.setenv("ACTCACHE_GPU_COUNT", "0")
    assert device_for(1) is None
