"""One forward pass, every requested layer, nothing past the deepest.

Forward hooks on the decoder layers keep each requested layer's output (resid_post); the
hook on the deepest one raises `_StopForward`, so the remaining layers and the LM head never
run. Residuals go to the host as bf16 through pinned buffers with non_blocking copies and a
CUDA event per batch, so the GPU never waits for the host; `HostBatch.ready()` waits on the
event only when a writer thread is about to use the rows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


class _StopForward(Exception):
    """Raised from the deepest hook: the rest of the model is wasted compute."""


@dataclass
class HostBatch:
    """Captured rows of one batch, on the host (possibly still in flight from the GPU)."""

    residuals: dict[int, torch.Tensor]  # layer -> (rows, d_model) bf16
    tokens: np.ndarray
    seq_ids: np.ndarray
    positions: np.ndarray
    event: object = None
    pool: PinnedPool | None = None

    def ready(self) -> HostBatch:
        """Wait for the copies (in the writer thread), then free the pinned staging buffers.

        The rows are copied once more into pageable memory so that the pinned buffers can be
        reused at once; the writer may hold rows until a whole shard is full.
        """
        if self.event is not None:
            self.event.synchronize()
            self.event = None
            if self.pool is not None:
                staged, self.residuals = self.residuals, {L: t.clone() for L, t in self.residuals.items()}
                for t in staged.values():
                    self.pool.put(t)
        return self


class PinnedPool:
    """Reusable page-locked staging buffers: cudaHostAlloc per batch costs more than the copy."""

    def __init__(self):
        self.free: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def get(self, rows: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        need = rows * d
        with self.lock:
            for i, buf in enumerate(self.free):
                if buf.dtype == dtype and buf.numel() >= need:
                    base = self.free.pop(i)
                    break
            else:
                base = torch.empty(max(need, 1), dtype=dtype, pin_memory=True)
        return base[:need].view(rows, d)

    def put(self, t: torch.Tensor) -> None:
        base = t._base if t._base is not None else t
        with self.lock:
            self.free.append(base)


class LayerCapture:
    """Hooks that capture resid_post of `layers` and stop after the deepest."""

    def __init__(self, decoder_layers: torch.nn.ModuleList, layers: list[int]):
        self.decoder_layers = decoder_layers
        self.layers = sorted(set(layers))
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> LayerCapture:
        deepest = self.layers[-1]
        for layer in self.layers:
            self._handles.append(self.decoder_layers[layer].register_forward_hook(self._hook(layer, layer == deepest)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, layer: int, last: bool) -> Callable:
        def hook(module, args, output):
            self.outputs[layer] = output[0] if isinstance(output, tuple) else output
            if last:
                raise _StopForward

        return hook

    def forward(self, model: torch.nn.Module, input_ids: torch.Tensor, **kw) -> dict[int, torch.Tensor]:
        self.outputs = {}
        try:
            with torch.inference_mode():
                model(input_ids=input_ids, use_cache=False, **kw)
        except _StopForward:
            pass
        out, self.outputs = self.outputs, {}
        return out


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad: causal layers (attention and the Gated DeltaNet recurrence) never look
    ahead, so real tokens are computed exactly as unpadded and no mask is needed."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        valid[i, : len(s)] = True
    return ids, valid


DEFAULT_POOL = PinnedPool()  # per process; grows to the buffers in flight (bounded by the queue)


def to_host(
    outputs: dict[int, torch.Tensor], valid: torch.Tensor, pool: PinnedPool | None = None
) -> tuple[dict[int, torch.Tensor], object]:
    """Valid rows of every layer as bf16 on the host; asynchronous on CUDA.

    The row index comes from the host-side mask, so selecting rows never makes the GPU
    report a size back (boolean indexing on the device would sync the stream every batch).
    """
    res, event = {}, None
    idx = valid.reshape(-1).nonzero().squeeze(1)
    cuda = any(h.device.type == "cuda" for h in outputs.values())
    if cuda:
        dev = next(iter(outputs.values())).device
        idx_dev = idx.pin_memory().to(dev, non_blocking=True)
        pool = pool or DEFAULT_POOL
    for layer, h in outputs.items():
        flat = h.reshape(-1, h.shape[-1])
        if cuda:
            rows = flat.index_select(0, idx_dev.to(h.device, non_blocking=True)).to(torch.bfloat16)
            buf = pool.get(rows.shape[0], rows.shape[1], torch.bfloat16)
            buf.copy_(rows, non_blocking=True)
            res[layer] = buf
        else:
            res[layer] = flat.index_select(0, idx).to(torch.bfloat16).contiguous()
    if cuda:
        event = torch.cuda.Event()
        event.record()
    return res, event


def capture_batch(
    cap: LayerCapture,
    model,
    seqs: list[list[int]],
    seq_ids: list[int],
    pad_id: int,
    device: torch.device,
    pool: PinnedPool | None = None,
) -> HostBatch:
    ids, valid = pad_batch(seqs, pad_id)
    if device.type == "cuda":
        ids = ids.pin_memory()
    outputs = cap.forward(model, ids.to(device, non_blocking=True))
    pool = pool or DEFAULT_POOL
    residuals, event = to_host(outputs, valid, pool)
    positions = np.concatenate([np.arange(len(s), dtype=np.int32) for s in seqs])
    sids = np.concatenate([np.full(len(s), sid, dtype=np.int64) for s, sid in zip(seqs, seq_ids)])
    tokens = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
    return HostBatch(residuals, tokens, sids, positions, event, pool if event is not None else None)
