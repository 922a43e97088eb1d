"""Harvest's sections of `pipeline.toml`: the model, capture, and the two sources.

Each default is written once, here; `pipeline.toml` documents the real run and a test keeps
the two equal. Checks sit in each section's `__post_init__`, so a value a run could not use
is refused in one line before any work, whether it came from the file, a profile, `--set` or
code. The keys harvest shares with train (`[harvest].cache`, parts of `[train]` and
`[analysis]`) are declared in `cache_format.config`, which both stages may import.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cache_format.config import (
    AnalysisKeys,
    ConfigError,
    HarvestKeys,
    Loaded,
    OutOfRange,
    TrainKeys,
    check_ranges,
    load_sections,
    setting,
    shared_section,
)

AUTO_CLASSES = ("auto", "image-text-to-text", "causal-lm")
MAX_ROWS = 2**63 - 1  # a cache's row indices and seq_ids are int64 (cache_format.layout)
# The value of model.name_or_path, supergpqa.dataset or a corpus source's path that names the
# bundled tiny model, questions or corpus (`harvest.tiny`; the files are package data).
TINY_NAME = "builtin:tiny"


def tiny_assets() -> Path:
    """`harvest/assets/tiny`: the tiny model's config and tokenizer, its questions and corpus."""
    return Path(__file__).resolve().parent / "assets" / "tiny"


@dataclass
class ModelConfig:
    """What harvest passes to `from_pretrained`, and where the decoder layers sit."""

    name_or_path: str = setting(
        "Qwen/Qwen3.6-27B", "hub id or local directory of the base model (builtin:tiny: the bundled tiny model)"
    )
    revision: str = setting("main", "hub revision of the model (branch, tag or commit)")
    dtype: str = setting("bfloat16", "torch dtype name without the 'torch.' prefix")
    device_map: str = setting("auto", "from_pretrained's device_map (auto spreads the model over the GPUs)")
    auto_class: str = setting(
        "auto", "auto | image-text-to-text | causal-lm: the transformers Auto class that loads it"
    )
    layers_path: str = setting("", "dotted path to the decoder layer list; empty: resolved per model family")
    attn_implementation: str = setting("sdpa", "from_pretrained's attn_implementation")
    trust_remote_code: bool = setting(False, "run the model repo's own code (only for repos you trust)")
    tokenizer: str = setting("", "tokenizer hub id or directory; empty: the model's own")

    def __post_init__(self):
        if self.auto_class not in AUTO_CLASSES:
            raise ConfigError(
                f"model.auto_class {self.auto_class!r} is unknown; use {', '.join(AUTO_CLASSES[:-1])} "
                f"or {AUTO_CLASSES[-1]}"
            )


SOURCES = ("supergpqa", "corpus")


@dataclass
class HarvestConfig(HarvestKeys):
    """How activations are captured and laid out in the cache."""

    layers: list[int] = setting([11, 31, 55], "decoder layers whose output (resid_post) is cached")
    source: str = setting("supergpqa", "supergpqa | corpus: what the harvested sequences are")
    hook: str = setting("resid_post", "where in a layer the rows are taken (resid_post: the decoder layer's output)")
    batch_size: int = setting(2, "sequences per forward pass")
    codec: str = setting("blosc-zstd1", "chunk codec (see cache_format.codecs); none stores raw")
    chunk_tokens: int = setting(4096, "rows per chunk (the loader's read unit)")
    shard_mib: int = setting(256, "target size of one shard object, in MiB")
    segment_sequences: int = setting(256, "sequences per segment: the unit of commit and resume")
    mix_window: int = setting(
        256, "sequences permuted together at write time (the loader needs it to mix); 0 = in order"
    )
    mix_seed: int = setting(0, "seed of the write-time permutation")
    queue_depth: int = setting(8, "batches in flight between the GPU and the writer threads")
    writer_threads: int = setting(2, "segments compressed and committed in parallel (each in its own thread)")
    workers: int = setting(0, "dask workers (one per GPU); 0 = run in this process")
    scheduler: str = setting("", "address of an existing dask scheduler; empty: none")
    torch_threads: int = setting(
        0, "intra-op threads for the forward; 0 = torch's default (dask workers: cores // workers)"
    )

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ConfigError(f"unknown source {self.source!r}; use --source supergpqa or --source corpus")
        check_ranges(
            self,
            "harvest",
            [
                ("batch_size", 1, True),
                ("segment_sequences", 1, True),
                ("chunk_tokens", 1, True),
                ("shard_mib", 0, False),
                ("queue_depth", 1, True),
                ("writer_threads", 1, True),
                ("workers", 0, True),
                ("mix_window", 0, True),
                ("torch_threads", 0, True),
            ],
        )


@dataclass
class VLLMConfig:
    """The vLLM engine's knobs (`[supergpqa.vllm]`), passed through to `vllm.LLM(...)`."""

    python: str = setting(".venv-vllm/bin/python", "the interpreter of `make vllm-env`")
    tensor_parallel_size: int = setting(1, "GPUs one engine spans (27B in bf16 fits one 80 GB GPU)")
    max_model_len: int = setting(0, "0 = the longest prompt plus max_new_tokens")
    gpu_memory_utilization: float = setting(0.9, "share of each GPU vLLM may take (weights + KV cache)")
    max_num_seqs: int = setting(0, "concurrent sequences; 0 = vLLM's default")
    enforce_eager: bool = setting(False, "skip CUDA graph capture (slower decode, faster start)")


PROMPT_FORMATS = ("supergpqa", "answer-line")
BACKENDS = ("transformers", "vllm")


@dataclass
class SuperGPQAConfig:
    """Greedy rollouts on SuperGPQA (the `000_*` card: 150 questions, seed 100)."""

    dataset: str = setting("m-a-p/SuperGPQA", "hub id, or a local .jsonl/.parquet in its schema")
    revision: str = setting("main", "hub revision; resolved to its commit and recorded in the cache")
    split: str = setting("train", "dataset split")
    questions: int = setting(150, "questions to roll out")
    seed: int = setting(100, "seed of the question selection")
    max_new_tokens: int = setting(32768, "generation budget per rollout (SuperGPQA's reasoning-model budget)")
    enable_thinking: bool = setting(True, "the chat template's thinking mode")
    prompt_format: str = setting("supergpqa", "supergpqa = its official zero-shot prompt; answer-line = the old format")
    backend: str = setting("transformers", "transformers | vllm: what generates the rollouts")
    generate_batch_size: int = setting(8, "transformers backend: prompts per generate() call (and per save)")
    questions_per_unit: int = setting(16, "rollouts per work unit (segment): the unit of capture, resume and WORKERS")
    force_answer: bool = setting(True, "no answer found: append the answer prefix, take the likeliest valid letter")
    vllm: VLLMConfig = setting(doc="the vLLM engine's knobs (the vllm backend)", factory=VLLMConfig)

    def __post_init__(self):
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"supergpqa.prompt_format {self.prompt_format!r}: use {' or '.join(PROMPT_FORMATS)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"supergpqa.backend {self.backend!r} is unknown; use {' or '.join(BACKENDS)}")
        keys = ("questions", "max_new_tokens", "generate_batch_size", "questions_per_unit")
        check_ranges(self, "supergpqa", [(key, 1, True) for key in keys])


@dataclass
class CorpusSource:
    name: str = setting("", "the source's name in records and row counts")
    path: str = setting("", "hub dataset id, or a local .jsonl/.parquet/.txt")
    weight: float = setting(1.0, "its share of the mixture (see corpus.mix)")
    text_field: str = setting("text", "the record field that holds the text (or the conversation)")
    subset: str = setting("", "hub config name; empty: none")
    split: str = setting("train", "dataset split")
    revision: str = setting(
        "", "hub sources: branch, tag or commit (empty: the default branch); pinned to a commit at first use"
    )


def _default_corpus_sources() -> list[CorpusSource]:
    # The `001_*` card's reasoning-aware mixture.
    return [
        CorpusSource("fineweb-edu", "HuggingFaceFW/fineweb-edu", 0.7, "text", "sample-10BT"),
        CorpusSource("openthoughts", "open-thoughts/OpenThoughts-114k", 0.2, "conversations"),
        CorpusSource("openmathinstruct2", "nvidia/OpenMathInstruct-2", 0.1, "generated_solution"),
    ]


@dataclass
class CorpusConfig:
    """Packed text streams (the `001_*` card: 1024-token sequences, 70/20/10)."""

    sources: list[CorpusSource] = setting(doc="the text sources and their weights", factory=_default_corpus_sources)
    seq_len: int = setting(1024, "tokens per packed sequence")
    tokens: int = setting(200_000_000, "corpus rows to reach (stops at the first whole sequence)")
    seed: int = setting(0, "seed of the mixture and the document order")
    mix: str = setting("tokens", "weights are token shares (tokens) or per-document draw odds (documents)")
    tokenizer_threads: int = setting(0, "background tokenization pool; 0 = min(4, cores)")

    def __post_init__(self):
        check_ranges(self, "corpus", [("tokens", 1, True), ("seq_len", 2, True)])
        if self.tokens > MAX_ROWS:
            raise OutOfRange("corpus.tokens", self.tokens, f"at most {MAX_ROWS:,} (2^63 - 1: the rows a cache indexes)")


@dataclass
class PipelineConfig(Loaded):
    """`pipeline.toml` as harvest reads it: its own sections, and the keys it shares with train."""

    OTHER_SECTIONS: ClassVar[tuple[str, ...]] = ("recipes",)  # train's: checked by train

    model: ModelConfig = field(default_factory=ModelConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    supergpqa: SuperGPQAConfig = field(default_factory=SuperGPQAConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    train: TrainKeys = shared_section(TrainKeys)  # the rest of [train] is train's
    analysis: AnalysisKeys = shared_section(AnalysisKeys)  # the rest of [analysis] is train's

    def source_selection(self) -> dict:
        """What decides which sequences a run holds: a cache is appended to only with the same."""
        if self.harvest.source == "supergpqa":
            s = self.supergpqa
            return {
                "name": "supergpqa",
                "dataset": s.dataset,
                "revision": s.revision,
                "split": s.split,
                "seed": s.seed,
                "enable_thinking": s.enable_thinking,
                "max_new_tokens": s.max_new_tokens,
                "prompt_format": s.prompt_format,
                "force_answer": s.force_answer,
            }
        c = self.corpus
        # a source's revision is checked against the commit its segments recorded (corpus.pin_revisions)
        return {
            "name": "corpus",
            "seq_len": c.seq_len,
            "seed": c.seed,
            "mix": c.mix,
            "sources": [{k: v for k, v in dataclasses.asdict(s).items() if k != "revision"} for s in c.sources],
        }


def load_config(
    path: str | Path | None = None, profile: str | None = None, overrides: typing.Iterable[str] = (), **flags: Any
) -> PipelineConfig:
    """pipeline.toml for harvest (see `cache_format.config.load_sections`)."""
    return load_sections(PipelineConfig, path, profile, overrides, **flags)
