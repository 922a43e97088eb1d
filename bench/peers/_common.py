"""Shared plumbing of the peer step scripts: the same arguments, data, dead set and clock.

These scripts run inside `.venv-peers` (sae-lens, eai-sparsify), never in the project's venv,
so they import nothing from this repository. The driver (bench/bench_trainer.py) writes the
batches to one .npy file; each side reads the same file, marks the same latents dead before
every step (so AuxK really runs at steady state on every side), and prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np
import torch


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", required=True, help=".npy of shape (n_batches, batch, d_in), float32")
    p.add_argument("--arch", default="topk", help="topk | batchtopk | matryoshka | jumprelu | relu")
    p.add_argument("--coefficient", type=float, default=1.0, help="jumprelu, relu: the sparsity coefficient")
    p.add_argument(
        "--l0", type=float, default=0.0, help="jumprelu, relu: set each latent to fire at rate l0/d_sae (0 = at init)"
    )
    p.add_argument("--d-sae", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--aux-alpha", type=float, default=1 / 32)
    p.add_argument("--dead-frac", type=float, default=0.1, help="fraction of latents held dead")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def setup(args: argparse.Namespace) -> tuple[np.ndarray, torch.Tensor]:
    """Pin threads and seeds; return the batches (memory-mapped) and the dead latent ids."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = np.load(args.data, mmap_mode="r")
    return data, dead_ids(args.d_sae, args.dead_frac, args.seed)


def dead_ids(d_sae: int, frac: float, seed: int) -> torch.Tensor:
    """The latents every side treats as dead: a fixed random subset (same on every side)."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(d_sae, generator=g)[: round(frac * d_sae)].sort().values


AUXK_KINDS = ("topk", "batchtopk", "matryoshka")


def matryoshka_sizes(d_sae: int) -> list[int]:
    """The nested prefix sizes every side uses: d_sae/8, /4, /2, d_sae."""
    return [d_sae // 8, d_sae // 4, d_sae // 2, d_sae]


def firing_cut(pre: torch.Tensor, l0: float) -> torch.Tensor:
    """Per latent, the pre-activation above which it fires on a share l0/d_sae of these rows.

    Every side sets its threshold (JumpReLU) or shifts its encoder bias (ReLU) by this, computed
    on its own encoder, so all sides time a step at the same trained-like sparsity.
    """
    n, d_sae = pre.shape
    m = max(1, round(n * l0 / d_sae))
    return pre.kthvalue(n - m, dim=0).values


def batch(data: np.ndarray, i: int) -> torch.Tensor:
    return torch.from_numpy(np.array(data[i % data.shape[0]], dtype=np.float32))


def run(name: str, args, data, prepare, step, require_aux: bool = True) -> None:
    """Warm up, then time `step(x)` over several steps; `prepare()` runs untimed before each.

    Wall time is the measure; process CPU time is recorded beside it because the benchmark
    box is shared, and CPU seconds per step are far less disturbed by other processes.

    `step` returns a dict of floats (losses) from its last call; for the kinds with AuxK,
    aux_loss must be > 0 or the comparison would not include AuxK, so that is checked, not
    assumed. `l0` (the last step's active codes per row) is recorded for the others.
    """
    tokens = data.shape[1]
    times, cpu, out = [], [], {}
    for i in range(args.warmup + args.steps):
        x = batch(data, i)
        prepare()
        c0, t0 = time.process_time(), time.perf_counter()
        out = step(x)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i >= args.warmup:
            times.append(dt)
            cpu.append(dc)
    aux_ran = out.get("aux_loss", 0.0) > 0
    if require_aux and args.arch in AUXK_KINDS and args.dead_frac > 0 and not aux_ran:
        sys.exit(f"{name}: the aux loss is {out.get('aux_loss')}: AuxK did not run")
    med = statistics.median(times)
    print(
        json.dumps(
            {
                "side": name,
                "arch": args.arch,
                "d_in": int(data.shape[2]),
                "d_sae": args.d_sae,
                "k": args.k,
                "batch": tokens,
                "threads": torch.get_num_threads(),
                "dead_latents": round(args.dead_frac * args.d_sae),
                "step_s": times,
                "median_step_s": med,
                "tokens_per_s": tokens / med,
                # CPU seconds of this process per step: less sensitive to other work on a shared box
                "cpu_s": cpu,
                "tokens_per_cpu_s": tokens / statistics.median(cpu),
                "last": out,
                "aux_ran": aux_ran,
                "torch": torch.__version__,
                "python": platform.python_version(),
                **versions(),
            }
        )
    )


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("sae-lens", "eai-sparsify", "dictionary-learning"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
