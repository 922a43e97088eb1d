"""Data parallel over torch.distributed: every rank trains the same SAEs on its own share of the
data (the loader divides each window's chunks among ranks), and gradients are summed so that N
ranks take one step on the global batch of their N slices.

Launch with `torchrun --nproc-per-node N -m train run ...` (gloo on CPU, nccl on GPUs).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes; (rank, world_size), (0, 1) when alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank(), world_size()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def resolve_device(name: str | None) -> str:
    """ "auto" (or unset) → cuda when available (at d_sae 65536 the encoder is the cost, not the
    I/O); "cuda" in a process group → this rank's GPU."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world_size() > 1:
        return f"cuda:{torch.cuda.current_device()}"
    return name


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum tensors across ranks in place, as one flat message."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    at = 0
    for t in tensors:
        t.copy_(flat[at : at + t.numel()].view_as(t))
        at += t.numel()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
