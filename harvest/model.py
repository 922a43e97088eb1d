"""The base model: loading it onto its devices, finding its decoder layers, and which GPU a
worker takes.

The auto class matters for Qwen3.5/3.6: `AutoModelForImageTextToText` gives
`Qwen3_5ForConditionalGeneration` (layers at `model.model.language_model.layers`), while
`AutoModelForCausalLM` gives the text-only `Qwen3_5ForCausalLM` (`model.model.layers`).
Both are accepted; the class and resolved path go into the cache's provenance so that anyone
can rebuild the exact hook.

GPU facts harvest acts on: is CUDA here (`python -m harvest detect-gpu` prints `cuda` or
`cpu`; `make install` adds flash-linear-attention and causal-conv1d there), are the fast
DeltaNet kernels installed, and which GPU each dask worker takes. Two environment variables
are the seams that let CI (no GPU) test the decisions: `ACTCACHE_CUDA=1|0` overrides the
detection, `ACTCACHE_GPU_COUNT=N` the number of GPUs a worker divides its slot by.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cache_format.errors import UserError

from . import tiny
from .config import TINY_NAME, ModelConfig

# Tried in order when `layers_path` is empty: Qwen3.5 multimodal, then common text stacks.
LAYER_PATHS = (
    "model.language_model.layers",
    "model.model.language_model.layers",
    "model.layers",
    "model.model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "layers",
)
# model_type → preferred auto class when auto_class = "auto"
IMAGE_TEXT_TYPES = {"qwen3_5", "qwen3_5_moe", "qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl", "qwen2_vl", "gemma3"}


class ModelError(UserError):
    """The model cannot be found, loaded, or does not have what was asked for."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    layers: torch.nn.ModuleList
    layers_path: str
    provenance: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        return int(cfg.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check_layers(self, layers: list[int]) -> None:
        bad = [x for x in layers if x < 0 or x >= self.n_layers]
        if bad:
            raise ModelError(
                f"layer {bad[0]} is past the model's depth ({self.n_layers} decoder layers, "
                f"0..{self.n_layers - 1}); pass --layers within that range"
            )


def resolve_path(cfg: ModelConfig) -> tuple[str, dict]:
    """Return (path passed to from_pretrained, provenance extras). Builds the tiny model."""
    if cfg.name_or_path == TINY_NAME:
        d = tiny.tiny_model_dir()
        return str(d), {
            "builtin": "tiny",
            "weights_sha256": (d / "weights.sha256").read_text().strip(),
            "seed": tiny.SEED,
            "build": tiny.build_info(d),
        }
    p = Path(cfg.name_or_path).expanduser()
    looks_local = cfg.name_or_path.startswith((".", "/", "~")) or p.exists() or cfg.name_or_path.count("/") > 1
    if looks_local:
        if not (p / "config.json").is_file():
            raise ModelError(
                f"model path {cfg.name_or_path} does not exist or has no config.json; "
                "set model.name_or_path to a hub id or a saved model directory"
            )
        return str(p), {}
    return cfg.name_or_path, {}


def _torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ModelError(f"model.dtype {name!r} is not a torch dtype; use bfloat16, float16 or float32")
    return dt


def _auto_class(cfg: ModelConfig, model_type: str):
    import transformers as tf

    choice = cfg.auto_class
    if choice == "auto":
        choice = "image-text-to-text" if model_type in IMAGE_TEXT_TYPES else "causal-lm"
    # ModelConfig has checked the name: image-text-to-text or causal-lm
    return tf.AutoModelForImageTextToText if choice == "image-text-to-text" else tf.AutoModelForCausalLM


def find_layers(model: torch.nn.Module, layers_path: str = "") -> tuple[torch.nn.ModuleList, str]:
    """The decoder layer list, by an explicit dotted path or the first known one that exists."""
    candidates = (layers_path,) if layers_path else LAYER_PATHS
    for path in candidates:
        node: Any = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, torch.nn.ModuleList) and len(node) > 0:
            return node, path
    if layers_path:
        raise ModelError(
            f"model.layers_path {layers_path!r} is not a module list in {type(model).__name__}; "
            "fix the dotted path (e.g. model.model.layers)"
        )
    raise ModelError(f"cannot find the decoder layers of {type(model).__name__}; set model.layers_path")


def _model_config(cfg: ModelConfig):
    """Resolve the path and read the transformers config: what loading and describing share."""
    import transformers as tf

    path, extra = resolve_path(cfg)
    kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if not extra:
        kw["revision"] = cfg.revision
    try:
        mcfg = tf.AutoConfig.from_pretrained(path, **kw)
    except OSError as e:
        raise ModelError(
            f"cannot load model config from {cfg.name_or_path!r} ({str(e).splitlines()[0]}); "
            "check model.name_or_path / revision and network access"
        ) from None
    return path, extra, kw, mcfg


def load_model(cfg: ModelConfig, device: str | None = None) -> LoadedModel:
    """Load model + tokenizer in eval mode, resolve the layers, and record provenance."""
    import transformers as tf

    path, extra, kw, mcfg = _model_config(cfg)
    dtype = _torch_dtype(cfg.dtype)
    cls = _auto_class(cfg, mcfg.model_type)
    device_map = device or cfg.device_map
    load_kw = dict(kw, dtype=dtype, attn_implementation=cfg.attn_implementation)
    if device_map and device_map != "cpu":
        load_kw["device_map"] = device_map
    try:
        model = cls.from_pretrained(path, **load_kw)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"cannot load {cfg.name_or_path!r} with {cls.__name__} ({str(e).splitlines()[0]}); "
            "check model.auto_class and model.name_or_path"
        ) from None
    model.eval()
    model.requires_grad_(False)
    tok_src = cfg.tokenizer or path
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(tok_src, **({} if extra or cfg.tokenizer else kw))
    except OSError as e:
        raise ModelError(f"cannot load tokenizer {tok_src!r} ({str(e).splitlines()[0]}); set model.tokenizer") from None
    layers, layers_path = find_layers(model, cfg.layers_path)
    prov = _provenance(cfg, path, model, cls, mcfg, layers_path, len(layers), extra)
    prov["device_map"] = str(device_map)
    lm = LoadedModel(model=model, tokenizer=tokenizer, layers=layers, layers_path=layers_path, provenance=prov)
    prov["d_model"] = lm.d_model
    prov["tokenizer"] = {
        "name_or_path": tok_src if cfg.tokenizer else cfg.name_or_path,
        "sha256": tokenizer_hash(tokenizer_files_of(lm)),
    }
    return lm


def tokenizer_files_of(lm: LoadedModel) -> dict[str, bytes]:
    """The tokenizer's own files (tokenizer.json + config), to store inside the cache."""
    import tempfile

    src = Path(lm.provenance["resolved_path"])
    files = tiny.tokenizer_files(src) if src.is_dir() else {}
    if "tokenizer.json" not in files:
        with tempfile.TemporaryDirectory() as d:
            lm.tokenizer.save_pretrained(d)
            files = tiny.tokenizer_files(Path(d))
    return files


def tokenizer_hash(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(files[name])
    return h.hexdigest()


def describe_model(cfg: ModelConfig) -> dict:
    """Class, layer path, depth, width, tokenizer and provenance without loading weights.

    The driver of a run (which may fan out to dask workers) needs these to create the cache
    and check layers; the model itself is built on the meta device, so this is cheap even
    for a 27B model.
    """
    import transformers as tf

    path, extra, kw, mcfg = _model_config(cfg)
    _torch_dtype(cfg.dtype)
    cls = _auto_class(cfg, mcfg.model_type)
    with torch.device("meta"):
        try:
            skeleton = cls.from_config(mcfg, trust_remote_code=cfg.trust_remote_code)
        except ValueError as e:
            raise ModelError(
                f"{cls.__name__} cannot build {mcfg.model_type!r} ({str(e).splitlines()[0]}); set model.auto_class"
            ) from None
    layers, layers_path = find_layers(skeleton, cfg.layers_path)
    tok_src = cfg.tokenizer or path
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(tok_src, **({} if extra or cfg.tokenizer else kw))
    except OSError as e:
        raise ModelError(f"cannot load tokenizer {tok_src!r} ({str(e).splitlines()[0]}); set model.tokenizer") from None
    lm = LoadedModel(
        model=skeleton, tokenizer=tokenizer, layers=layers, layers_path=layers_path, provenance={"resolved_path": path}
    )
    files = tokenizer_files_of(lm)
    prov = _provenance(cfg, path, skeleton, cls, mcfg, layers_path, len(layers), extra)
    prov["d_model"] = lm.d_model
    prov["tokenizer"] = {"name_or_path": cfg.tokenizer or cfg.name_or_path, "sha256": tokenizer_hash(files)}
    return {
        "provenance": prov,
        "d_model": lm.d_model,
        "n_layers": len(layers),
        "tokenizer": tokenizer,
        "tokenizer_files": files,
    }


def _provenance(cfg, path, model, cls, mcfg, layers_path, n_layers, extra) -> dict:
    return {
        "name_or_path": cfg.name_or_path,
        "revision": cfg.revision,
        "resolved_path": path,
        "dtype": cfg.dtype,
        "class": type(model).__name__,
        "auto_class": cls.__name__,
        "model_type": mcfg.model_type,
        "layers_path": layers_path,
        "n_layers": n_layers,
        "config_sha256": hashlib.sha256(json.dumps(mcfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest(),
        "commit": getattr(mcfg, "_commit_hash", None),
        **extra,
    }


# ---------------------------------------------------------------------------------------
# GPUs: detection, the fast kernels, a GPU per worker

# The packages transformers' Qwen3.5 Gated DeltaNet imports for its fast path (else torch's reference code).
FAST_KERNELS = {"fla": "flash-linear-attention", "causal_conv1d": "causal-conv1d"}


def cuda_present() -> bool:
    env = os.environ.get("ACTCACHE_CUDA", "")
    if env:
        return env.lower() in ("1", "true", "yes", "cuda")
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def reference_kernel_note(model, device) -> str | None:
    """One line when a model with Gated DeltaNet layers will run the reference kernels on a GPU."""
    if not str(device).startswith("cuda"):
        return None
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    n = sum(t == "linear_attention" for t in (getattr(cfg, "layer_types", None) or []))
    missing = [pip for mod, pip in FAST_KERNELS.items() if importlib.util.find_spec(mod) is None]
    if not n or not missing:
        return None
    return (
        f"harvest: {n} Gated DeltaNet layers run torch's reference kernels on {device} "
        f"({' and '.join(missing)} not installed); `make install` on a CUDA machine installs them"
    )


def gpu_count() -> int:
    env = os.environ.get("ACTCACHE_GPU_COUNT", "")
    if env:
        return int(env)
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_slots(workers: dict) -> dict[str, int]:
    """{worker address: its index among the workers of its host}, ordered by name then address.

    `workers` is dask's `scheduler_info()["workers"]`. Names need not be numbers.
    """
    by_host: dict[str, list] = defaultdict(list)
    for addr, w in workers.items():
        by_host[w.get("host") or addr.rsplit(":", 1)[0]].append((str(w.get("name", "")), addr))
    return {addr: i for ws in by_host.values() for i, (_, addr) in enumerate(sorted(ws))}


def device_for(slot: int) -> str | None:
    """A worker's device: its own CUDA_VISIBLE_DEVICES when that names one GPU, else slot mod GPUs."""
    n = gpu_count()
    if not n:
        return None
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return "cuda:0" if len(visible) == 1 else f"cuda:{slot % n}"
