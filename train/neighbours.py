"""Decoder-cosine neighbours: for each feature, the features whose decoder rows point the most
the same way, in its own SAE and in each other SAE of the run (the best matches across layers).

Model-free and exact: unit-normalized decoder rows multiplied block by block (torch, on the
GPU when there is one), keeping a running top-k, so memory stays at one block of cosines.
Rows of SAEs with another d_in (another model) are not compared.
"""

from __future__ import annotations

import numpy as np
import torch

SAME_SAE = 10  # neighbours kept in the feature's own SAE
OTHER_SAE = 5  # best matches kept in each other SAE
BLOCK = 4096


def _unit(w: torch.Tensor, device) -> torch.Tensor:
    w = w.detach().to(device=device, dtype=torch.float32)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def top_cosines(a: torch.Tensor, b: torch.Tensor, k: int, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosines), each (len(a), k): the k rows of `b` most aligned with each row of `a`."""
    k = min(k, b.shape[0] - (1 if exclude_self else 0))
    idx = np.zeros((a.shape[0], max(k, 0)), np.int32)
    cos = np.zeros((a.shape[0], max(k, 0)), np.float32)
    if k <= 0:
        return idx, cos
    for s in range(0, a.shape[0], BLOCK):
        c = a[s : s + BLOCK] @ b.T
        if exclude_self:
            r = torch.arange(c.shape[0], device=c.device)
            c[r, r + s] = -float("inf")
        v, i = c.topk(k, dim=1)
        idx[s : s + BLOCK] = i.cpu().numpy()
        cos[s : s + BLOCK] = v.cpu().numpy()
    return idx, cos


def decoder_neighbours(decoders: dict[str, torch.Tensor], device: str = "cpu") -> dict[str, dict[str, np.ndarray]]:
    """Per SAE name, the columns of its `feature_neighbours.parquet`: `feature`, `rank` (0 =
    closest, within each SAE compared), `sae` (the neighbour's SAE), `neighbour`, `cosine`.

    `decoders` maps each SAE's name to its decoder, (d_sae, d_in): one row per feature.
    """
    unit = {name: _unit(w, device) for name, w in decoders.items()}
    out = {}
    for name, a in unit.items():
        parts = []
        for other, b in unit.items():
            if b.shape[1] != a.shape[1]:
                continue
            same = other == name
            idx, cos = top_cosines(a, b, SAME_SAE if same else OTHER_SAE, exclude_self=same)
            n, k = idx.shape
            parts.append(
                {
                    "feature": np.repeat(np.arange(n, dtype=np.int32), k),
                    "rank": np.tile(np.arange(k, dtype=np.int32), n),
                    "sae": np.full(n * k, other, dtype=object),
                    "neighbour": idx.reshape(-1),
                    "cosine": cos.reshape(-1),
                }
            )
        cols = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        sae_code = np.unique(cols["sae"], return_inverse=True)[1]
        # by feature, its own SAE first, then the others by name, each by rank
        order = np.lexsort((cols["rank"], sae_code, cols["sae"] != name, cols["feature"]))
        out[name] = {key: v[order] for key, v in cols.items()}
    return out
