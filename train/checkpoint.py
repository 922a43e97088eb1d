"""Atomic checkpoints that hold no pickle: the last K plus the best K by held-out variance explained.

A checkpoint is two files in `OUT/checkpoints/`: `tokens_<N>.safetensors` holds every tensor of
the training state (weights, Adam moments and steps, dead-latent counters), and `tokens_<N>.json`
the rest (counters, loader positions, history, optimizer settings), each tensor replaced by
its name in the safetensors file, beside the token count and score that pruning reads. Loading
either runs no code, whoever wrote the directory; a pickle could, so none is ever read (an
older run's `tokens_<N>.pt` is refused in one line).

Both are written to a temporary name and renamed into place, tensors first: the JSON is the
commit, so a crash leaves the old set or a whole new checkpoint, and a safetensors file
without its JSON is a killed save's leftover.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache_format.errors import UserError

from .out_files import write_out, write_out_by_name

FORMAT = "actcache-checkpoint"
VERSION = 1
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"  # JSON has no tensors, tuples or int keys


def encode(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """`obj` as JSON, its tensors moved into `tensors` under their path in the state.

    A tensor is stored in its memory order: one laid out transposed (W_enc; Adam's moments
    follow their parameter's layout, and the fused step relies on it) is stored as the
    contiguous permutation of itself, `{"__tensor__": [name, dims]}`, and comes back with its
    own strides, so a resumed run steps exactly as an uninterrupted one."""
    if isinstance(obj, torch.Tensor):
        key, n = path.lstrip("/") or "tensor", 1
        while key in tensors:
            key, n = f"{path.lstrip('/')}#{n}", n + 1
        dims = sorted(range(obj.dim()), key=lambda d: -obj.stride(d))
        if obj.is_contiguous() or not obj.permute(dims).is_contiguous():
            tensors[key] = obj
            return {_TENSOR: key}
        tensors[key] = obj.permute(dims)
        return {_TENSOR: [key, dims]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not (
            len(obj) == 1 and next(iter(obj)) in (_TENSOR, _TUPLE, _ITEMS)
        ):
            return {k: encode(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {_ITEMS: [[encode(k, tensors), encode(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state {path or '/'}: a {type(obj).__name__} has no place in a checkpoint")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode`: only dicts, lists, tuples, plain values and the named tensors come out."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            ((tag, v),) = obj.items()
            if tag == _TENSOR and isinstance(v, list):
                name, dims = v
                return tensors[name].permute([dims.index(d) for d in range(len(dims))])
            if tag == _TENSOR:
                return tensors[v]
            if tag == _TUPLE:
                return tuple(decode(x, tensors) for x in v)
            if tag == _ITEMS:
                return {decode(k, tensors): decode(x, tensors) for k, x in v}
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous, and no two sharing memory (safetensors stores each tensor once)."""
    out, seen = {}, set()
    for k, t in tensors.items():
        t = t.detach().contiguous()
        ptr = (t.device, t.untyped_storage().data_ptr()) if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out


class Checkpoints:
    def __init__(self, root: Path, keep_last: int = 2, keep_best: int = 2):
        self.root = Path(root)
        self.keep_last, self.keep_best = max(1, keep_last), max(0, keep_best)

    def _entries(self) -> list[dict]:
        """Committed checkpoints (a JSON whose tensors are there), by token count."""
        out = []
        if not self.root.is_dir():
            return out
        for side in self.root.glob("tokens_*.json"):
            if side.with_suffix(".safetensors").is_file():
                try:
                    info = json.loads(side.read_text())
                    out.append({"path": side, "tokens": int(info["tokens"]), "score": info.get("score")})
                except (OSError, ValueError, KeyError, TypeError, RecursionError):
                    raise UserError(f"{side}: not a readable checkpoint; delete it, or pass --fresh") from None
        return sorted(out, key=lambda e: e["tokens"])

    def latest(self) -> Path | None:
        """The newest checkpoint's JSON; a directory holding only pickled (`.pt`) ones is one line."""
        entries = self._entries()
        if not entries and self.root.is_dir() and any(self.root.glob("tokens_*.pt")):
            raise UserError(
                f"{self.root} holds only pickled checkpoints (tokens_*.pt, from an older version); they are "
                "not loaded, since a pickle can run code: pass --fresh to train from the start"
            )
        return entries[-1]["path"] if entries else None

    def save(self, state: dict, tokens: int, score: float | None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".*.tmp-*"):  # leftovers of a killed save
            stale.unlink(missing_ok=True)
        for orphan in self.root.glob("tokens_*.safetensors"):  # tensors whose JSON never landed
            if not orphan.with_suffix(".json").exists():
                orphan.unlink(missing_ok=True)
        side = self.root / f"tokens_{tokens:015d}.json"
        tensors: dict[str, torch.Tensor] = {}
        body = {"format": FORMAT, "version": VERSION, "tokens": tokens, "score": score, "state": encode(state, tensors)}
        from safetensors.torch import save_file

        write_out_by_name(
            side.with_suffix(".safetensors"), lambda p: save_file(_storable(tensors), str(p), {"format": FORMAT})
        )
        write_out(side, json.dumps(body))
        self.prune()
        return side

    def prune(self) -> None:
        entries = self._entries()
        keep = {e["path"] for e in entries[-self.keep_last :]}
        scored = [e for e in entries if e.get("score") is not None]
        keep |= {e["path"] for e in sorted(scored, key=lambda e: -e["score"])[: self.keep_best]}
        for e in entries:
            if e["path"] not in keep:
                e["path"].unlink(missing_ok=True)  # the commit first: a crash leaves an orphan, not a torso
                e["path"].with_suffix(".safetensors").unlink(missing_ok=True)

    @staticmethod
    def load(path: Path) -> dict:
        """The state saved at `path` (a checkpoint's JSON, or its safetensors beside it); a damaged
        checkpoint is one line."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        side = Path(path).with_suffix(".json")
        try:
            body = json.loads(side.read_text())
            if not isinstance(body, dict) or body.get("format") != FORMAT:
                raise ValueError(f"not an {FORMAT} file")
            if body.get("version") != VERSION:
                raise ValueError(f"version {body.get('version')!r}, this code reads {VERSION}")
            return decode(body["state"], load_file(str(side.with_suffix(".safetensors")), device="cpu"))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, RecursionError, SafetensorError) as e:
            why = " ".join(str(e).split())[:120]
            raise UserError(
                f"{side}: not a readable checkpoint ({type(e).__name__}: {why}); delete it and its "
                ".safetensors to resume from the one before, or pass --fresh"
            ) from None
