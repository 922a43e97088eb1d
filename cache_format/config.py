"""The one typed schema of `pipeline.toml`, shared by both stages.

It lives beside the storage contract because both sides record it: harvest writes its
sections into the cache's provenance, train writes `[train]` into every SAE it exports.
Precedence is toml < `[profile.NAME]` < CLI flags / `--set section.key=value`.
Unknown sections and keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UserError


class ConfigError(UserError):
    """pipeline.toml (or a --set override) is malformed or names an unknown key."""


@dataclass
class ModelConfig:
    """What harvest passes to `from_pretrained`, and where the decoder layers sit."""

    name_or_path: str = "Qwen/Qwen3.6-27B"
    revision: str = "main"
    dtype: str = "bfloat16"  # torch dtype name without the "torch." prefix
    device_map: str = "auto"
    auto_class: str = "auto"  # auto | image-text-to-text | causal-lm
    layers_path: str = ""  # dotted path to the decoder layer list; "" resolves it per family
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    tokenizer: str = ""  # "" = the model's own


@dataclass
class HarvestConfig:
    """How activations are captured and laid out in the cache."""

    cache: str = "caches/qwen36-27b"
    layers: list[int] = field(default_factory=lambda: [11, 31, 55])
    source: str = "supergpqa"  # supergpqa | corpus
    hook: str = "resid_post"
    batch_size: int = 2  # sequences per forward pass
    codec: str = "blosc-zstd1"  # see cache_format.codecs; "none" stores raw
    chunk_tokens: int = 4096  # rows per chunk (the loader's read unit)
    shard_mib: int = 256  # target size of one shard object
    segment_sequences: int = 256  # sequences per segment: the unit of commit and resume
    mix_window: int = 0  # sequences permuted together at write time; 0 = write in order
    mix_seed: int = 0
    queue_depth: int = 8  # batches in flight between the GPU and the writer threads
    writer_threads: int = 2  # segments compressed/committed in parallel (each in its own thread)
    workers: int = 0  # dask workers (one per GPU); 0 = run in this process
    scheduler: str = ""  # address of an existing dask scheduler
    torch_threads: int = 0  # intra-op threads for the forward; 0 = torch's default (dask workers: cores // workers)


@dataclass
class VLLMConfig:
    """The vLLM engine's knobs (`[supergpqa.vllm]`), passed through to `vllm.LLM(...)`."""

    python: str = ".venv-vllm/bin/python"  # the interpreter of `make vllm-env`
    tensor_parallel_size: int = 1  # GPUs one engine spans (27B in bf16 fits one 80 GB GPU)
    max_model_len: int = 0  # 0 = the longest prompt plus max_new_tokens
    gpu_memory_utilization: float = 0.9  # share of each GPU vLLM may take (weights + KV cache)
    max_num_seqs: int = 0  # concurrent sequences; 0 = vLLM's default
    enforce_eager: bool = False  # skip CUDA graph capture (slower decode, faster start)


PROMPT_FORMATS = ("supergpqa", "answer-line")


@dataclass
class SuperGPQAConfig:
    """Greedy rollouts on SuperGPQA (the `000_*` card: 150 questions, seed 100)."""

    dataset: str = "m-a-p/SuperGPQA"  # hub id, or a local .jsonl/.parquet in its schema
    revision: str = "main"  # hub revision; resolved to its commit and recorded in the cache
    split: str = "train"
    questions: int = 150
    seed: int = 100
    max_new_tokens: int = 32768  # SuperGPQA's reasoning-model budget
    enable_thinking: bool = True
    prompt_format: str = "supergpqa"  # supergpqa = its official zero-shot prompt; answer-line = the old format
    backend: str = "transformers"  # transformers | vllm
    generate_batch_size: int = 8  # transformers backend: prompts per generate() call (and per save)
    questions_per_unit: int = 16  # rollouts per work unit (segment): the unit of capture, resume and WORKERS
    force_answer: bool = True  # no answer found: append the answer prefix, take the likeliest valid letter
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def __post_init__(self):
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"supergpqa.prompt_format {self.prompt_format!r}: use {' or '.join(PROMPT_FORMATS)}")
        for key in ("max_new_tokens", "generate_batch_size", "questions_per_unit"):
            if getattr(self, key) < 1:
                raise ConfigError(f"supergpqa.{key} = {getattr(self, key)}: must be at least 1")
        if self.questions < 0:
            raise ConfigError(f"supergpqa.questions = {self.questions}: must be 0 or more")


@dataclass
class CorpusSource:
    name: str = ""
    path: str = ""  # hub dataset id, or a local .jsonl/.parquet/.txt
    weight: float = 1.0
    text_field: str = "text"
    subset: str = ""  # hub config name
    split: str = "train"
    # Hub sources only: a branch, tag or commit; "" = the default branch. Resolved to a commit
    # at first use and recorded in every segment, so a resume reads the same dataset version.
    revision: str = ""


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

    sources: list[CorpusSource] = field(default_factory=_default_corpus_sources)
    seq_len: int = 1024
    tokens: int = 200_000_000
    seed: int = 0
    mix: str = "tokens"  # weights are token shares ("tokens") or per-document draw odds ("documents")
    tokenizer_threads: int = 0  # background tokenization pool; 0 = min(4, cores)


@dataclass
class SweepSetting:
    """One extra (d_sae, k) trained per layer from the same batches."""

    d_sae: int = 0
    k: int = 0


@dataclass
class TrainConfig:
    """TopK+AuxK SAE training; defaults from the `001_*` card. Key names are stable.

    A recipe (`[recipes.NAME]`) is applied under the keys set in `[train]`: see `recipe`.
    """

    recipe: str = "auto"  # auto (by the cache's source: rollouts or corpus) | rollouts | corpus | none
    cache: str = ""  # "" = [harvest].cache
    out: str = "runs/qwen36-27b"
    layers: list[int] = field(default_factory=list)  # [] = every layer in the cache
    d_sae: int = 65536
    k: int = 128
    k_aux: int = 0  # 0 = d_model // 2
    aux_alpha: float = 1 / 32
    dead_tokens: int = 10_000_000  # a latent unseen for this many tokens counts as dead
    aux_norm: str = "residual"  # AuxK loss over the residual error's variance (OpenAI) | "total" (sparsify's)
    lr: float = 2e-4  # 0 = scale with width, as sparsify does
    lr_min: float = 6e-5
    lr_schedule: str = "cosine"  # after warmup: "cosine" decays to lr_min, "constant" holds lr
    warmup_steps: int = 5000
    batch_size: int = 4096  # global across ranks
    grad_clip: float = 1.0
    training_tokens: int = 200_000_000
    epochs: float = 0.0  # > 0: the budget is epochs × the train split's rows (after max_rows); wins over training_tokens
    seed: int = 0
    checkpoint_every_tokens: int = 10_000_000
    keep_last: int = 2
    keep_best: int = 2
    eval_every_tokens: int = 10_000_000
    eval_tokens: int = 1_000_000
    heldout_fraction: float = 0.01
    split_seed: int = 0
    roles: list[str] = field(default_factory=list)  # [] = thinking+answer on rollouts, all on text
    exclude_position0: bool = False
    exclude_special: bool = False
    norm_outlier: float = 0.0  # drop rows with norm > this × median; 0 = keep all
    normalize: bool = False  # scale inputs to unit mean norm; folded into exported weights
    geometric_median_samples: int = 16384
    sweep: list[SweepSetting] = field(default_factory=list)
    device: str = "auto"
    loader_threads: int = 0  # decode threads; 0 = the cores this rank may use less one, 1 to 16
    shuffle_buffer_tokens: int = 262_144
    torch_threads: int = 0  # intra-op threads for training; 0 = torch's default (1 is fastest for tiny shapes)
    log: str = "none"  # experiment log of each SAE's trajectory: "none" | "tensorboard" | "wandb"
    log_dir: str = ""  # where the log writes; "" = OUT/logs (wandb follows WANDB_MODE, e.g. offline)
    max_rows: int = 0  # cap the train split to a random sample of this many rows (the 000 card: 200k); 0 = all


RECIPES = ("rollouts", "corpus")


def _rollouts_recipe() -> dict[str, Any]:
    # The `000_*` card: n=4096, k=32, Adam 3e-4, batch 4096, 20 epochs of <= 200k rows per layer.
    # Sized for a ~1000-step run: warmup 5%, and a dead threshold (~120 steps) that AuxK reaches.
    return {"d_sae": 4096, "k": 32, "k_aux": 512, "aux_alpha": 1 / 32, "lr": 3e-4, "lr_schedule": "constant",
            "warmup_steps": 50,
            "batch_size": 4096, "epochs": 20.0, "max_rows": 200_000, "dead_tokens": 500_000,
            "checkpoint_every_tokens": 1_000_000, "eval_every_tokens": 500_000, "eval_tokens": 1_000_000,
            "heldout_fraction": 0.1}


@dataclass
class RecipesConfig:
    """Per-source training recipes: partial `[train]` tables, applied under `[train]`'s own keys."""

    rollouts: dict[str, Any] = field(default_factory=_rollouts_recipe)  # SuperGPQA rollouts: the 000 card
    corpus: dict[str, Any] = field(default_factory=dict)  # packed corpus: the 001 card (= TrainConfig's defaults)

    def __post_init__(self):
        hints = typing.get_type_hints(TrainConfig)
        for name in RECIPES:
            table = getattr(self, name)
            for key, value in table.items():
                if key not in hints or key in ("recipe", "cache", "out", "layers"):
                    raise ConfigError(f"recipes.{name}: {key!r} is not a recipe key (any [train] key but "
                                      "recipe, cache, out and layers)")
                table[key] = _coerce(hints[key], value, f"recipes.{name}.{key}")


@dataclass
class AnalysisConfig:
    """Feature statistics, reverse index and loss recovered after training."""

    top_examples: int = 16  # reverse index: examples kept per feature
    context_tokens: int = 8  # tokens decoded on each side of an example
    bootstrap: int = 200  # sequence-bootstrap resamples for the AUROC CI; 0 = skip
    permutations: int = 200  # label permutations for the p-value; 0 = skip
    min_fires: int = 5  # features firing fewer times are not tested (no CI, p, q)
    alpha: float = 0.05  # BH false-discovery rate for "significant"
    max_tokens: int = 1_000_000  # rows analyzed (the first ones in cache order)
    rows: str = "auto"  # heldout | train | all; auto = all labeled rows on rollouts (as the 000 card), else heldout
    loss_sequences: int = 64  # held-out sequences for loss recovered
    loss_batch_size: int = 4
    report_features: int = 24  # top features shown per SAE in the report
    scheduler: str = ""  # dask scheduler address; "" = a LocalCluster


@dataclass
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    supergpqa: SuperGPQAConfig = field(default_factory=SuperGPQAConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipes: RecipesConfig = field(default_factory=RecipesConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    profile: str = ""  # the profile applied, recorded for provenance
    source_path: str = ""  # the toml file read
    train_keys_set: list[str] = field(default_factory=list)  # [train] keys the toml, profile or flags set

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# loading


def find_config(path: str | Path | None = None) -> Path:
    """`--config` if given, else ./pipeline.toml, else the copy shipped with the package."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist: pass --config PATH to a pipeline.toml")
        return p
    local = Path("pipeline.toml")
    if local.is_file():
        return local
    return Path(str(resources.files("cache_format") / "pipeline.toml"))


def load_config(
    path: str | Path | None = None,
    profile: str | None = None,
    overrides: typing.Iterable[str] = (),
    **flags: Any,
) -> PipelineConfig:
    """Read pipeline.toml, apply a profile, then `--set` overrides and CLI flags.

    `flags` are dotted keys from CLI options (`{"harvest.layers": [1, 3]}`); None values
    are ignored so that an absent flag never overrides the file.
    """
    p = find_config(path)
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: malformed TOML ({e}); fix the file's syntax") from None
    profiles = raw.pop("profile", {})
    if not isinstance(profiles, dict):
        raise ConfigError(f"{p}: [profile] must be a table of [profile.NAME] tables")
    if profile:
        if profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            raise ConfigError(f"{p}: unknown profile {profile!r} (known: {known})")
        raw = _deep_merge(raw, profiles[profile])
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    for key, value in flags.items():
        if value is not None:
            _set_dotted(raw, key, value)
    for internal in _INTERNAL:
        if internal in raw:
            raise ConfigError(f"{p}: unknown section {internal!r}")
    cfg = _build(PipelineConfig, raw, where=str(p))
    cfg.profile = profile or ""
    cfg.source_path = str(p)
    cfg.train_keys_set = sorted((raw.get("train") or {}).keys())
    _check_ranges(cfg, p)
    return cfg


_INTERNAL = ("profile", "source_path", "train_keys_set")


def build_section(cls: type, raw: dict, where: str) -> Any:
    """A section's dataclass from a plain table, with the same checks as pipeline.toml's."""
    return _build(cls, raw, where)


# (section.key, lowest allowed value, whether the bound itself is allowed): values a run could
# not use are refused before any work, in one line, instead of an empty or untrained result.
_RANGES = [("harvest.batch_size", 1, True), ("harvest.segment_sequences", 1, True), ("harvest.chunk_tokens", 1, True),
           ("harvest.shard_mib", 0, False), ("harvest.queue_depth", 1, True), ("harvest.writer_threads", 1, True),
           ("harvest.workers", 0, True), ("harvest.mix_window", 0, True), ("harvest.torch_threads", 0, True),
           ("supergpqa.questions", 1, True), ("supergpqa.max_new_tokens", 1, True),
           ("supergpqa.generate_batch_size", 1, True), ("corpus.tokens", 1, True), ("corpus.seq_len", 2, True),
           ("train.d_sae", 1, True), ("train.k", 1, True), ("train.k_aux", 0, True), ("train.aux_alpha", 0, True),
           ("train.dead_tokens", 1, True), ("train.lr", 0, True), ("train.lr_min", 0, True),
           ("train.warmup_steps", 0, True), ("train.batch_size", 1, True), ("train.grad_clip", 0, True),
           ("train.training_tokens", 1, True), ("train.checkpoint_every_tokens", 0, True),
           ("train.keep_last", 0, True), ("train.keep_best", 0, True), ("train.eval_every_tokens", 0, True),
           ("train.eval_tokens", 0, True), ("train.heldout_fraction", 0, True), ("train.norm_outlier", 0, True),
           ("train.loader_threads", 0, True), ("train.shuffle_buffer_tokens", 0, True), ("train.max_rows", 0, True),
           ("train.epochs", 0, True)]


def _check_ranges(cfg: PipelineConfig, path) -> None:
    for section in {key.split(".")[0] for key, _, _ in _RANGES}:
        check_ranges(section, getattr(cfg, section), f"fix it in {path} or with --set")


def check_ranges(section: str, values: Any, fix: str) -> None:
    """Refuse a section's values that a run could not use (train also checks the recipe it resolved)."""
    for key, low, inclusive in _RANGES:
        sec, name = key.split(".")
        if sec != section:
            continue
        v = getattr(values, name)
        if v < low or (v == low and not inclusive):
            bound = f"at least {low}" if inclusive else f"above {low}"
            raise ConfigError(f"{key} = {v} must be {bound}; {fix} {key}=VALUE")
    if section == "train" and values.heldout_fraction >= 1:
        raise ConfigError(f"train.heldout_fraction = {values.heldout_fraction} must be below 1 (a share of the "
                          f"sequences, e.g. 0.01); {fix} train.heldout_fraction=VALUE")


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=VALUE (VALUE a TOML literal)")
    key, text = item.split("=", 1)
    key = key.strip()
    if "." not in key:
        raise ConfigError(f"--set {item!r}: the key must name its section, e.g. train.k=32")
    try:
        return key, tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return key, _BareString(text)  # typed below: accepted only where a string is expected


class _BareString(str):
    """An unquoted --set value; valid only for string-typed keys."""


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = value


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            known = ", ".join(sorted(n for n in names if n not in _INTERNAL))
            raise ConfigError(f"{where}: unknown key {key!r} (known: {known})")
        kwargs[key] = _coerce(hints[key], value, f"{where} [{key}]" if cls is PipelineConfig else f"{where}.{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int)) and item_tp is int:
            value = _int_list(value, where)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if isinstance(value, _BareString) and tp is not str:
        raise ConfigError(f"{where}: {str(value)!r} is not a TOML literal; quote strings, e.g. \"text\"")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def _int_list(value: str | int, where: str) -> list[int]:
    """`LAYERS=11,31,55` arrives as a string (or one int); accept it for int lists."""
    if isinstance(value, int):
        return [value]
    try:
        return [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{where}: expected comma-separated integers, got {value!r}") from None


def config_options(f=None, *, layers: bool = True, cache_help: str = "Cache location (path or fsspec URL)."):
    """The flags every stage's commands take: --config, --profile, --cache, [--layers,] --set.

    Use bare (`@config_options`) or configured (`@config_options(layers=False, cache_help=...)`).
    """
    import click

    def wrap(f):
        f = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                         help="Override any pipeline.toml key with a TOML literal.")(f)
        if layers:
            f = click.option("--layers", default=None, metavar="N,N,...",
                             help="Comma-separated layer numbers, as the model counts them.")(f)
        f = click.option("--cache", default=None, metavar="URL", help=cache_help)(f)
        f = click.option("--profile", default=None, help="Apply [profile.NAME] from pipeline.toml (e.g. tiny).")(f)
        f = click.option("--config", "config_path", default=None, metavar="PATH",
                         help="pipeline.toml to read (default: ./pipeline.toml, else the packaged copy).")(f)
        return f

    return wrap(f) if f is not None else wrap


def parse_layers(text: str | None) -> list[int] | None:
    """`--layers 11,31,55` → [11, 31, 55]; None stays None (the config decides)."""
    if text is None or text == "":
        return None
    try:
        layers = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--layers {text!r}: expected comma-separated integers like 11,31,55") from None
    if not layers or any(x < 0 for x in layers):
        raise ConfigError(f"--layers {text!r}: layers are non-negative integers like 11,31,55")
    return layers
