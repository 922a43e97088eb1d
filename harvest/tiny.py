"""The embedded tiny model: a random-init Qwen3.5-architecture model built offline.

`make demo` and the tests need a model of the real architecture class
(`Qwen3_5ForConditionalGeneration`, Gated DeltaNet + full attention layers) without any
download. Its config and tokenizer ship as package data; the weights are drawn from a fixed
seed on first use and renamed into a user cache directory in one step, so two workers that
build it at the same time never see a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from importlib import resources
from pathlib import Path

TINY_NAME = "builtin:tiny"
SEED = 1234
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)
_BUILD_LOCK = threading.Lock()  # torch's global RNG is shared by threads: one seeded build at a time
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def assets() -> Path:
    return Path(str(resources.files("harvest") / "assets" / "tiny"))


def cache_root() -> Path:
    """Where built assets live: $ACTCACHE_HOME, else $XDG_CACHE_HOME/actcache, else ~/.cache."""
    if os.environ.get("ACTCACHE_HOME"):
        return Path(os.environ["ACTCACHE_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "actcache"


def tiny_config() -> dict:
    return json.loads((assets() / "config.json").read_text())


def tiny_model_dir() -> Path:
    """Build the tiny model once (atomically) and return its directory.

    The directory name carries a hash of the packaged config and seed, so changing either
    builds a new model instead of silently reusing a stale one.
    """
    cfg_text = (assets() / "config.json").read_text()
    tok_bytes = (assets() / "tokenizer.json").read_bytes()
    key = hashlib.sha256(cfg_text.encode() + tok_bytes + str(SEED).encode()).hexdigest()[:12]
    final = cache_root() / f"tiny-model-{key}"
    if (final / "weights.sha256").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=final.parent))
    try:
        _build_into(tmp)
        try:
            os.rename(tmp, final)  # atomic; loses the race harmlessly if another built it
        except OSError:
            if not (final / "weights.sha256").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_into(out: Path) -> None:
    import torch
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    config = Qwen3_5Config(**tiny_config())
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen3_5ForConditionalGeneration(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(assets() / name, out / name)
    (out / "weights.sha256").write_text(weights_hash(out) + "\n")


def weights_hash(model_dir: Path) -> str:
    """sha256 over the safetensors files in name order: what the provenance records."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_files(path: Path | None = None) -> dict[str, bytes]:
    """The tokenizer files a cache carries, read from a model/tokenizer directory."""
    path = Path(path) if path else assets()
    out = {}
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.json", "merges.txt", "chat_template.jinja"):
        if (path / name).is_file():
            out[name] = (path / name).read_bytes()
    return out


def train_tokenizer(out_dir: Path, vocab_size: int = 1024) -> None:
    """Regenerate the packaged tokenizer from the bundled text (deterministic).

    Run by hand (`python -m harvest.tiny`) only when the bundled text changes; the result
    ships as package data so that tests never train it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    # Qwen3.5's own pre-tokenization, so transformers (which rebuilds it for model_type
    # qwen3_5) and plain `tokenizers` split text identically.
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX

    texts = [(assets() / "corpus.txt").read_text()]
    for line in (assets() / "questions.jsonl").read_text().splitlines():
        rec = json.loads(line)
        texts.append(rec["question"] + "\n" + "\n".join(rec["options"]))
    texts.append("Answer: A B C D E F G H I J \\boxed{A} Let me think step by step. system user assistant")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


if __name__ == "__main__":
    train_tokenizer(assets())
    print(f"wrote {assets()}/tokenizer.json")
