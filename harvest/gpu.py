"""GPU facts harvest acts on: is CUDA here, are the fast DeltaNet kernels, which GPU a worker takes.

`python -m harvest.gpu detect` prints `cuda` or `cpu`; `make install` uses it to decide
whether to add flash-linear-attention and causal-conv1d. Two environment variables are the
seams that let CI (no GPU) test the decisions: `ACTCACHE_CUDA=1|0` overrides the detection,
`ACTCACHE_GPU_COUNT=N` the number of GPUs a dask worker divides its slot by.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections import defaultdict

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
    import torch

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


def main(argv: list[str]) -> int:
    if argv[1:] == ["detect"]:
        print("cuda" if cuda_present() else "cpu")
        return 0
    print("usage: python -m harvest.gpu detect", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
