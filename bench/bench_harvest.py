"""Harvest overhead: capture + async copy + background compress/write vs the bare forward.

Both arms run the same random-init Qwen3.5-architecture model over the same token batches
in one process, interleaved, with fixed threads:

- bare:    the forward truncated at the deepest requested layer (a hook raises there), outputs dropped;
- harvest: the real path (`harvest.units.capture_unit`): every requested layer captured in that
           forward, bf16 rows copied to the host, compressed and written to a real cache by the
           background writer, segments committed; timed until the last commit lands;
- full:    the untruncated forward with the LM head, for what early stopping saves.

    python bench/bench_harvest.py                       # CPU, ~284M-param hybrid model, 1 thread
    python bench/bench_harvest.py --shape qwen3.6-27b --device cuda --dtype bfloat16 \\
        --layers 11,31,55 --batch-size 4 --seq-len 2048 --batches 8 --unit-seqs 16 --threads 8   # on a GPU

The 27B shape is Qwen3.6-27B's text stack (64 layers, d_model 5120, 3 Gated DeltaNet : 1
full attention) built from its config with random weights: no download. Install
flash-linear-attention and causal-conv1d there, or the DeltaNet layers use the slow torch path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    # ~290M parameters: big enough that the forward, not Python, dominates on CPU.
    "cpu-300m": dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        linear_num_key_heads=8,
        linear_num_value_heads=16,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        vocab_size=32768,
    ),
    # Qwen3.6-27B's text config (hidden 5120, 64 layers); vision tower left tiny, it never runs.
    "qwen3.6-27b": dict(
        hidden_size=5120,
        intermediate_size=17408,
        num_hidden_layers=64,
        num_attention_heads=24,
        num_key_value_heads=4,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=48,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        vocab_size=248320,
    ),
}


def build_model(shape: str, dtype: torch.dtype, device: str, seed: int = 0):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = dict(SHAPES[shape])
    n = text["num_hidden_layers"]
    text.update(
        model_type="qwen3_5_text",
        linear_conv_kernel_dim=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)],
        rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},
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
    cfg = Qwen3_5Config(text_config=text, vision_config=vision)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3_5ForConditionalGeneration(cfg).to(dtype).eval()
    model.requires_grad_(False)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu-300m")
    ap.add_argument("--layers", default="3,7,11")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batches", type=int, default=4, help="batches per timed pass")
    ap.add_argument("--unit-seqs", type=int, default=2, help="sequences per segment (harvest.segment_sequences)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved passes per arm; the median is reported")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core box two threads mostly measure the neighbours)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--codec", default="blosc-zstd1")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoTokenizer

    import cache_format as cf
    from cache_format.concurrency import QueueThread
    from harvest.capture import LayerCapture
    from harvest.config import load_config
    from harvest.model import LoadedModel, find_layers
    from harvest.tiny import assets
    from harvest.units import Unit, capture_unit

    layers = [int(x) for x in a.layers.split(",")]
    dtype = getattr(torch, a.dtype)
    model = build_model(a.shape, dtype, a.device)
    decoder, path = find_layers(model)
    n_params = sum(p.numel() for p in model.parameters())
    lm = LoadedModel(model, AutoTokenizer.from_pretrained(str(assets())), decoder, path, {})
    d = lm.d_model
    vocab = model.config.text_config.vocab_size
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (a.batch_size, a.seq_len), generator=g) for _ in range(a.batches)]
    n_tok = a.batches * a.batch_size * a.seq_len
    dev = torch.device(a.device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> float:
        with LayerCapture(decoder, [max(layers)]) as cap:
            sync()
            t = time.perf_counter()
            for b in batches:
                cap.forward(model, b.to(dev, non_blocking=True))
            sync()
            return time.perf_counter() - t

    def full() -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b.to(dev, non_blocking=True), use_cache=False)
        sync()
        return time.perf_counter() - t

    tmp = tempfile.mkdtemp(prefix="bench-harvest-")
    cfg = load_config(None, None, [f"harvest.batch_size={a.batch_size}", f'harvest.codec="{a.codec}"'])
    runs = [0]

    tails = []

    def harvest() -> float:
        runs[0] += 1
        w = cf.create_cache(
            f"{tmp}/c{runs[0]}", d_model=d, layers=layers, codec=a.codec, chunk_tokens=1024, shard_mib=64
        )
        seqs = [row.tolist() for b in batches for row in b]
        per = a.unit_seqs
        units = [
            Unit(
                key=f"bench:{i}",
                source="corpus",
                seq_ids=list(range(i, min(i + per, len(seqs)))),
                token_ids=seqs[i : i + per],
                records=[{"source": "bench"}] * len(seqs[i : i + per]),
            )
            for i in range(0, len(seqs), per)
        ]
        sync()
        t = time.perf_counter()
        # as harvest.run.run_units: one writer thread per in-flight segment, bounded queues
        wts = [QueueThread.jobs(cfg.harvest.queue_depth, "harvest-writer") for _ in range(cfg.harvest.writer_threads)]
        for i, unit in enumerate(units):
            capture_unit(lm, w, unit, cfg, wts[i % len(wts)])
        sync()
        t_queued = time.perf_counter()
        for wt in wts:
            wt.close()  # every row compressed, written and committed
        dt = time.perf_counter() - t
        tails.append(time.perf_counter() - t_queued)
        assert cf.open_cache(f"{tmp}/c{runs[0]}").n_tokens == n_tok
        return dt

    bare()  # warm-up (kernels, allocator)
    times = {"bare": [], "harvest": [], "full": [full()]}  # full: once, a side number
    for r in range(a.repeats):  # alternate the order so that drift in machine load cancels
        arms = (("bare", bare), ("harvest", harvest))
        for name, fn in arms if r % 2 == 0 else arms[::-1]:
            times[name].append(fn())
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    res = {
        "shape": a.shape,
        "params": n_params,
        "d_model": d,
        "layers": layers,
        "device": a.device,
        "dtype": a.dtype,
        "threads": a.threads,
        "batch": [a.batch_size, a.seq_len],
        "tokens_per_pass": n_tok,
        "repeats": a.repeats,
        "tok_s": {k: round(n_tok / v, 1) for k, v in med.items()},  # medians over repeats
        "harvest_overhead_vs_bare": round(med["harvest"] / med["bare"] - 1, 4),
        "harvest_overhead_vs_bare_best_of": round(best["harvest"] / best["bare"] - 1, 4),
        "harvest_tail_s_median": round(statistics.median(tails), 3),  # last batch queued -> last commit
        "early_stop_saving_vs_full": round(1 - med["bare"] / med["full"], 4),
        "bytes_written_per_pass": n_tok * len(layers) * d * 2,
        "all_times_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }
    if a.json:
        print(json.dumps(res))
    else:
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
