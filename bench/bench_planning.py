"""Corpus planning + tokenization throughput by thread count, against the rate at which the
27B truncated forward consumes tokens on an H100 (computed from its FLOPs).

Why: planning runs beside the forward; it must never be what the GPU waits for. Each
setting runs in its own subprocess, because the Rust tokenizer fixes its thread pool at first
use: `TOKENIZERS_PARALLELISM=false` leaves exactly the planner's pool threads, `rayon` adds
the tokenizer's own parallelism inside each batch call (the default in a harvest).

    python bench/bench_planning.py                       # 2M tokens per setting, threads 1,2,4
    python bench/bench_planning.py --tokens 5000000 --threads 1,2,4,8
    python bench/bench_planning.py --memory 1e6,1e7,1e8,1e9   # planning's peak RSS by TOKENS

Writes bench/results/planning.json (`--memory`: bench/results/planning_memory.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages, whatever the environment's editable install points at
H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM, dense bf16 tensor cores
DEEPEST = 55  # the 001 card's layers 11/31/55: the forward stops after decoder layer 55


def write_corpus(path: Path, n_docs: int) -> None:
    """Variants of the tiny profile's bundled documents (the real run's text is not here offline)."""
    import random

    from harvest import tiny

    base = [d.strip() for d in (tiny.assets() / "corpus.txt").read_text().split("\n\n") if d.strip()]
    rng = random.Random(0)
    words = "amber basalt cedar delta ember fjord garnet harbor indigo juniper kelp lagoon".split()
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(f"{rng.choice(words)} {i}: {rng.choice(base)}\n\n")


def forward_flops_per_token(seq_len: int = 1024) -> dict:
    """2 x parameters of embedding-free layers 0..DEEPEST, plus causal attention scores."""
    import torch
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_harvest import SHAPES

    text = dict(SHAPES["qwen3.6-27b"])
    n = text["num_hidden_layers"]
    types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]
    text.update(
        model_type="qwen3_5_text",
        linear_conv_kernel_dim=4,
        layer_types=types,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
    )
    vision = dict(
        model_type="qwen3_5_vision",
        depth=1,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        out_hidden_size=text["hidden_size"],
        num_position_embeddings=64,
    )
    with torch.device("meta"):
        m = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vision))
    layers = m.model.language_model.layers[: DEEPEST + 1]
    params = sum(p.numel() for p in layers.parameters())
    full = sum(t == "full_attention" for t in types[: DEEPEST + 1])
    attn = full * 4 * text["num_attention_heads"] * text["head_dim"] * (seq_len / 2)  # QK^T and AV, mean context
    flops = 2 * params + attn
    return {
        "layers_run": DEEPEST + 1,
        "params_run": params,
        "full_attention_layers": full,
        "flops_per_token": flops,
        "h100_tokens_per_s_at_100pct_mfu": H100_BF16_DENSE / flops,
        "h100_tokens_per_s_at_50pct_mfu": 0.5 * H100_BF16_DENSE / flops,
    }


def measure(corpus: str, tokens: int, threads: int, mode: str) -> dict:
    """One setting, in this process: plan `tokens` rows of 1024-token units and time it."""
    from transformers import AutoTokenizer

    from harvest import tiny
    from harvest.config import load_config
    from harvest.corpus import PlannedUnits

    tok = AutoTokenizer.from_pretrained(str(tiny.assets()))
    if mode == "per-document":  # what planning did before: one call per document, one thread
        from harvest.config import CorpusSource
        from harvest.corpus import iter_documents

        t0, n = time.perf_counter(), 0
        for text in iter_documents(CorpusSource("gen", corpus), 0):
            n += len(list(tok(text, add_special_tokens=False)["input_ids"])) + 1
            if n >= tokens:
                break
        return {"tokens": n, "seconds": time.perf_counter() - t0}
    cfg = load_config(
        None,
        "tiny",
        [f'corpus.sources=[{{name="gen", path="{corpus}"}}]', "corpus.seq_len=1024", "harvest.segment_sequences=64"],
        **{"corpus.tokens": tokens, "corpus.tokenizer_threads": threads, "harvest.source": "corpus"},
    )
    units = PlannedUnits(cfg, tok, set(), [])
    t0, n = time.perf_counter(), 0
    for u in units:
        n += u.n_tokens
    return {"tokens": n, "seconds": time.perf_counter() - t0}


def memory(tokens: int, units: int = 8) -> dict:
    """Peak RSS of planning a run of `tokens` rows, in this process: the plan's bookkeeping,
    then its first `units` units (the tiny profile: 128-token sequences, 64 per unit, over its
    bundled corpus, which cycles, so any TOKENS can be planned without a file that large)."""
    import resource

    from transformers import AutoTokenizer

    from harvest import tiny
    from harvest.config import load_config
    from harvest.corpus import PlannedUnits

    tok = AutoTokenizer.from_pretrained(str(tiny.assets()))
    cfg = load_config(
        None, "tiny", ["harvest.segment_sequences=64"], **{"corpus.tokens": tokens, "harvest.source": "corpus"}
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10  # KiB on Linux
    t0 = time.perf_counter()
    plan = PlannedUnits(cfg, tok, set(), [])
    t1 = time.perf_counter()
    for i, _ in enumerate(plan):
        if i + 1 == units:
            break
    return {
        "tokens": tokens,
        "sequences": plan.n_seq,
        "units_planned": units,
        "rss_before_mib": before,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10,
        "bookkeeping_s": round(t1 - t0, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "planning.json"))
    ap.add_argument("--memory", default="", metavar="T,T,...", help="peak RSS of planning at these TOKENS (1e9 ok)")
    ap.add_argument("--one", nargs=4, metavar=("CORPUS", "TOKENS", "THREADS", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--one-memory", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.one[0], int(a.one[1]), int(a.one[2]), a.one[3])))
        return
    if a.one_memory:
        print(json.dumps(memory(a.one_memory)))
        return
    if a.memory:
        main_memory([int(float(t)) for t in a.memory.split(",")], a.out)
        return
    with tempfile.TemporaryDirectory() as d:
        corpus = Path(d) / "corpus.txt"
        write_corpus(corpus, a.tokens // 60)  # ~100 tokens a document
        runs = []
        settings = [(1, "per-document", "false")]
        settings += [(t, "pool", "false") for t in map(int, a.threads.split(","))]
        settings += [(t, "pool", "true") for t in map(int, a.threads.split(","))]
        for threads, mode, par in settings:
            env = {**os.environ, "TOKENIZERS_PARALLELISM": par}
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(corpus), str(a.tokens), str(threads), mode],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(threads=threads, mode=mode, rayon=par == "true", tokens_per_s=r["tokens"] / r["seconds"])
            runs.append(r)
            print(
                f"{mode:>12}  pool threads {threads}  rayon {'on ' if r['rayon'] else 'off'}  "
                f"{r['tokens_per_s'] / 1e6:6.2f} M tokens/s  ({r['tokens']:,} tokens in {r['seconds']:.2f} s)"
            )
    fwd = forward_flops_per_token()
    print(
        f"27B forward to layer {DEEPEST}: {fwd['flops_per_token'] / 1e9:.1f} GFLOP/token; one H100 consumes at most "
        f"{fwd['h100_tokens_per_s_at_100pct_mfu']:,.0f} tokens/s (100% MFU), "
        f"{fwd['h100_tokens_per_s_at_50pct_mfu']:,.0f} at 50%"
    )
    slowest = min(r["tokens_per_s"] for r in runs if r["mode"] == "pool")
    print(f"slowest planning setting / H100 at 100% MFU: {slowest / fwd['h100_tokens_per_s_at_100pct_mfu']:.0f}x")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"runs": runs, "forward": fwd, "cpus": os.cpu_count()}, indent=2))
    print(f"wrote {a.out}")


def main_memory(tokens: list[int], out: str) -> None:
    """Each TOKENS in its own process, so that one's peak does not hide another's."""
    runs = []
    for t in tokens:
        p = subprocess.run(
            [sys.executable, __file__, "--one-memory", str(t)], capture_output=True, text=True, cwd=ROOT, check=True
        )
        r = json.loads(p.stdout.strip().splitlines()[-1])
        runs.append(r)
        print(
            f"TOKENS {t:>14,}  {r['sequences']:>12,} sequences  peak RSS {r['peak_rss_mib']:>5} MiB "
            f"({r['peak_rss_mib'] - r['rss_before_mib']:+} MiB over the loaded tokenizer)  "
            f"bookkeeping {r['bookkeeping_s']:.3f} s"
        )
    path = Path(out).with_name("planning_memory.json") if out.endswith("planning.json") else Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs, "cpus": os.cpu_count()}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
