"""Trainer throughput against the encoder-matmul floor, on one device, per SAE kind.

The floor is the encoder matmul alone: 2·d·n FLOPs per token at the rate this device
actually reaches on a (batch, d) × (d, n) matmul in the trainer's compute dtype, measured in
the same run. A full step (forward, AuxK or the sparsity term, backward, Adam, renorm) must do
at least that much work, so `step tokens/s ÷ floor tokens/s` says how close the trainer gets to
the hardware. Target on GPU: ≥ 50% at d=5120, n=65536, k=128 (DESIGN.md). The AuxK kinds run
with `--dead-frac` of the latents held dead; jumprelu and relu at a trained-like sparsity (each
latent's threshold or bias set so it fires on k/d_sae of the rows: L0 = k), where they train most.

    python bench/bench_trainer_floor.py --device cuda --architectures topk,batchtopk,matryoshka,jumprelu,relu
    python bench/bench_trainer_floor.py --device cpu --shape 512x8192x32    # a smoke run here
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from train.sae import BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE, TopKSAE
from train.trainer import SAETrainer


def timed(fn, device: str, warmup: int, steps: int) -> float:
    """Median seconds of `fn` after warmup, synchronizing the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="5120x65536x128", help="d_in x d_sae x k")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    ap.add_argument("--dead-frac", type=float, default=0.1, help="latents held dead so AuxK runs every step")
    ap.add_argument("--architectures", default="topk", help="SAE kinds, comma-separated")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    d, n, k = (int(v) for v in a.shape.split("x"))
    dev = a.device

    x = torch.randn(a.batch, d, device=dev)
    dead = torch.randperm(n, device=dev)[: int(n * a.dead_frac)]
    floor = None
    for arch in [v.strip() for v in a.architectures.split(",") if v.strip()]:
        torch.manual_seed(0)
        sae = {
            "topk": lambda: TopKSAE(d, n, k),
            "batchtopk": lambda: BatchTopKSAE(d, n, k),
            "matryoshka": lambda: MatryoshkaSAE(d, n, k, [n // 8, n // 4, n // 2, n]),
            "jumprelu": lambda: JumpReLUSAE(d, n),
            "relu": lambda: ReLUSAE(d, n),
        }[arch]().to(dev)
        trainer = SAETrainer(sae, lr=2e-4, k_aux=d // 2, dead_tokens=10**12, total_steps=10**6)
        if not sae.revives_dead:  # L0 = k: each latent fires on k/n of the rows
            with torch.no_grad():
                pre = sae.pre_acts(x)
                cut = pre.kthvalue(a.batch - max(1, round(a.batch * k / n)), dim=0).values
                del pre
                if arch == "jumprelu":
                    sae.threshold.copy_(cut.clamp_min(0.0))
                else:
                    sae.b_enc.sub_(cut)

        def step():
            if sae.revives_dead:
                trainer.since_fired[dead] = trainer.dead_tokens
            return trainer.step(x)

        compute_dtype = torch.bfloat16 if trainer.low_precision else torch.float32
        if floor is None:
            xa, wa = x.to(compute_dtype), sae.W_enc.detach().to(compute_dtype)
            floor = timed(lambda: xa @ wa, dev, a.warmup, a.steps)
            del xa, wa
        t_step = timed(step, dev, a.warmup, a.steps)
        flops = 2 * a.batch * d * n
        out = {
            "architecture": arch,
            "device": torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({a.threads} threads)",
            "shape": {"d_in": d, "d_sae": n, "k": k, "batch": a.batch},
            "dead_frac": a.dead_frac if sae.revives_dead else None,
            "l0": step()["l0"],
            "compute_dtype": str(compute_dtype).removeprefix("torch."),
            "matmul_tflops": flops / floor / 1e12,
            "floor_tokens_per_s": a.batch / floor,
            "step_tokens_per_s": a.batch / t_step,
            "fraction_of_floor": floor / t_step,
        }
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
