"""Atomic checkpoints: the last K plus the best K by held-out variance explained.

Each checkpoint is one torch file `OUT/checkpoints/tokens_<N>.pt` written to a temporary name
and renamed into place (a crash leaves either the old set or the new file, never half of one),
with a small JSON sidecar holding its token count and score so pruning never loads weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .out_files import write_out


class Checkpoints:
    def __init__(self, root: Path, keep_last: int = 2, keep_best: int = 2):
        self.root = Path(root)
        self.keep_last, self.keep_best = max(1, keep_last), max(0, keep_best)

    def _entries(self) -> list[dict]:
        out = []
        if not self.root.is_dir():
            return out
        for side in self.root.glob("tokens_*.json"):
            pt = side.with_suffix(".pt")
            if pt.is_file():  # a sidecar without its weights is a crashed save: ignore it
                info = json.loads(side.read_text())
                info["path"] = pt
                out.append(info)
        return sorted(out, key=lambda e: e["tokens"])

    def latest(self) -> Path | None:
        entries = self._entries()
        return entries[-1]["path"] if entries else None

    def save(self, state: dict, tokens: int, score: float | None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".*.tmp-*"):  # leftovers of a killed save
            stale.unlink(missing_ok=True)
        pt = self.root / f"tokens_{tokens:015d}.pt"
        write_out(pt.with_suffix(".json"), json.dumps({"tokens": tokens, "score": score}))
        write_out(pt, lambda f: torch.save(state, f))
        self.prune()
        return pt

    def prune(self) -> None:
        entries = self._entries()
        keep = {e["path"] for e in entries[-self.keep_last :]}
        scored = [e for e in entries if e.get("score") is not None]
        keep |= {e["path"] for e in sorted(scored, key=lambda e: -e["score"])[: self.keep_best]}
        for e in entries:
            if e["path"] not in keep:
                e["path"].unlink(missing_ok=True)
                e["path"].with_suffix(".json").unlink(missing_ok=True)

    @staticmethod
    def load(path: Path) -> dict:
        return torch.load(path, map_location="cpu", weights_only=False)
