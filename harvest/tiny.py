"""The embedded tiny model, tokenizer and data: a small Qwen3.5-architecture language model built offline.

`make demo` and the tests need a model of the real architecture class
(`Qwen3_5ForConditionalGeneration`, Gated DeltaNet + full attention layers) without any
download. Its config, tokenizer and training text ship as package data. On first use the
weights are drawn from a fixed seed and then trained for a few seconds on the bundled text
(a pure random init predicts worse than uniform, which turns loss recovered upside down),
and the result is renamed into a user cache directory in one step, so two workers that
build it at the same time never see a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import threading
from pathlib import Path

from cache_format.stores.local import atomic_dir

from .config import tiny_assets as assets  # the bundled files; tests and benchmarks read them too
from .supergpqa import format_question

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
_BUILD_LOCK = threading.Lock()  # torch's global RNG and thread count are process-wide: one build at a time
# The build's training recipe. Every field is part of the cache directory's key and of the
# recorded provenance; one thread and a seeded batch order make the weights hash reproducible
# on a given machine. ~30 s on one core of a shared 2-core box.
RECIPE = {
    "version": 2,  # 1 was the untrained random init
    "steps": 90,
    "batch": 4,
    "seq_len": 128,
    "lr": 1e-2,
    "warmup": 10,  # linear warmup, then cosine decay to 10%
    "weight_decay": 0.01,
    "clip": 1.0,
    "threads": 1,
    "questions": "even",  # chat renderings of the even-numbered questions only
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


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

    The directory name carries a hash of the packaged config, tokenizer, training text, seed
    and recipe, so changing any of them builds a new model instead of reusing a stale one.
    """
    key = hashlib.sha256(
        (assets() / "config.json").read_bytes()
        + (assets() / "tokenizer.json").read_bytes()
        + _text_bytes()
        + json.dumps({"seed": SEED, **RECIPE}, sort_keys=True).encode()
    ).hexdigest()[:12]
    final = cache_root() / f"tiny-model-{key}"
    if (final / "weights.sha256").is_file():
        return final
    try:
        with atomic_dir(final) as tmp:  # renamed in one step; loses the race harmlessly if another built it
            _build_into(tmp)
    except OSError:
        if not (final / "weights.sha256").is_file():
            raise
    return final


def build_info(model_dir: Path) -> dict:
    """What the provenance records about a built tiny model (written at build time)."""
    return json.loads((Path(model_dir) / "build.json").read_text())


def _text_bytes() -> bytes:
    return (assets() / "corpus.txt").read_bytes() + (assets() / "questions.jsonl").read_bytes()


def training_documents(tokenizer) -> list[str]:
    """The build's training text: the corpus's documents and, for every other question, the
    chat-template prompt the rollouts use followed by a short reasoned answer. The odd
    questions stay unseen, so greedy rollouts over the bundled set are partly right."""
    docs = [d.strip() for d in (assets() / "corpus.txt").read_text().split("\n\n") if d.strip()]
    lines = (assets() / "questions.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):
        if i % 2:
            continue
        q = json.loads(line)
        msgs = [{"role": "user", "content": format_question(q, "answer-line")}]
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
        docs.append(
            f"{prompt}The question asks: {q['question']} The correct option is {q['answer']}.\n"
            f"</think>\n\nAnswer: {q['answer_letter']}<|im_end|>"
        )
    return docs


def _build_into(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen3_5Config, Qwen3_5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(str(assets()))
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    stream = []
    for doc in training_documents(tok):
        stream += list(tok(doc, add_special_tokens=False)["input_ids"]) + [sep]
    data = torch.tensor(stream, dtype=torch.long)
    r = RECIPE
    threads = torch.get_num_threads()
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        try:
            torch.set_num_threads(r["threads"])
            torch.manual_seed(SEED)
            model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(**tiny_config()))
            losses = _train(model, data, r)
        finally:
            torch.set_num_threads(threads)
    model.eval().save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(assets() / name, out / name)
    info = {
        "seed": SEED,
        "recipe": r,
        "train_tokens": len(stream),
        "data_sha256": hashlib.sha256(data.numpy().astype("<i4").tobytes()).hexdigest(),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
    }
    (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "weights.sha256").write_text(weights_hash(out) + "\n")


def _train(model, data, r: dict) -> list[float]:
    """AdamW on random windows of the token stream, batch order drawn from the seed."""
    import math

    import torch

    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / r["warmup"]) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / r["steps"])))),
    )
    model.train()
    losses = []
    for _ in range(r["steps"]):
        starts = torch.randint(0, len(data) - r["seq_len"], (r["batch"],), generator=gen)
        ids = torch.stack([data[s : s + r["seq_len"]] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


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
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
    ):
        if (path / name).is_file():
            out[name] = (path / name).read_bytes()
    return out


def write_corpus(path, min_tokens: int) -> int:
    """A corpus file of at least `min_tokens` tokens (EOS not counted) from the bundled documents,
    for rehearsals and benchmarks at scale: variants of each document (two words prefixed) in
    seeded shuffled passes, documents separated by blank lines. Returns its token count."""
    from tokenizers import Tokenizer

    base = [d.strip() for d in (assets() / "corpus.txt").read_text().split("\n\n") if d.strip()]
    words = "amber basalt cedar delta ember fjord garnet harbor indigo juniper kelp lagoon".split()
    variants = [f"{a} {b}: {d}" for a in words for b in words[:4] for d in base]
    tok = Tokenizer.from_file(str(assets() / "tokenizer.json"))
    per_pass = sum(len(e.ids) for e in tok.encode_batch(variants, add_special_tokens=False))
    passes = math.ceil(min_tokens / per_pass)
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(passes):
            rng.shuffle(variants)
            f.write("\n\n".join(variants) + "\n\n")
    return passes * per_pass


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
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
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
