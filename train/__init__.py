"""The model-free stage: a shuffled loader over the cache and a TopK+AuxK trainer.

Imports stay lazy so that `import train.sae` (used by harvest for splicing) pulls in only
torch, and `import train` never pulls in transformers or harvest.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "TopKSAE": "train.sae",
    "ShuffledLoader": "train.loader",
    "Batch": "train.loader",
    "ReconstructionMetrics": "train.metrics",
    "SAETrainer": "train.trainer",
    "Run": "train.run",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'train' has no attribute {name!r}")
