"""Per-layer running statistics: count, mean, M2 (Welford/Chan) and mean L2 norm.

Computed at append time in float64 over the exact bf16 values, stored per segment, and
merged across segments with Chan's parallel formula (`merge_moments`, which train's metrics
use too), so that `Cache.stats` costs no data pass. `python -m cache_format stats` recomputes
them from the shards with dask.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from .layout import bits_to_float32


def merge_moments(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's parallel merge of two sets' moments: (count, mean, M2 = sum of squared deviations).

    Written with operators only, so the means and M2s may be numpy arrays, torch tensors or
    floats (per dimension or summed): `n = na+nb`, `δ = μb−μa`, `μ = μa + δ·nb/n`,
    `M2 = M2a + M2b + δ²·na·nb/n`. An empty side returns the other as it is."""
    if n_b == 0:
        return n_a, mean_a, m2_a
    if n_a == 0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


@dataclass
class RunningStats:
    d: int
    count: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    norm_sum: float = 0.0

    def __post_init__(self):
        if self.mean is None:
            self.mean = np.zeros(self.d, np.float64)
        if self.m2 is None:
            self.m2 = np.zeros(self.d, np.float64)

    def update_bits(self, bits: np.ndarray, block: int = 4096) -> None:
        for s in range(0, len(bits), block):
            with np.errstate(all="ignore"):  # NaN/inf rows are legal data; their stats become NaN/inf
                x = bits_to_float32(bits[s : s + block])  # exact
                n = len(x)
                if n == 0:
                    continue
                # float64 accumulators over exact float32 values; deviations in float32
                mean = np.add.reduce(x, axis=0, dtype=np.float64) / n
                dev = x - mean.astype(np.float32)
                m2 = np.add.reduce(dev * dev, axis=0, dtype=np.float64)
                norm = float(np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32)).sum(dtype=np.float64))
            self.merge(RunningStats(self.d, n, mean, m2, norm))

    def merge(self, other: RunningStats) -> RunningStats:
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.norm_sum = other.count, other.norm_sum
            self.mean, self.m2 = other.mean.copy(), other.m2.copy()
            return self
        with np.errstate(all="ignore"):
            self.count, self.mean, self.m2 = merge_moments(
                self.count, self.mean, self.m2, other.count, other.mean, other.m2
            )
        self.norm_sum += other.norm_sum
        return self

    def to_json(self) -> dict:
        """Vectors as base64 of little-endian float64: compact, exact, and NaN/inf-safe."""
        return {
            "encoding": "float64-le-base64",
            "count": self.count,
            "mean": _b64(self.mean),
            "m2": _b64(self.m2),
            "norm_sum": _b64(np.array([self.norm_sum])),
        }

    @classmethod
    def from_json(cls, j: dict) -> RunningStats:
        mean = _unb64(j["mean"])
        return cls(len(mean), int(j["count"]), mean, _unb64(j["m2"]), float(_unb64(j["norm_sum"])[0]))

    def summary(self) -> dict:
        c = max(self.count, 1)
        with np.errstate(all="ignore"):
            var = self.m2 / c
            std = np.sqrt(var)
        return {"count": self.count, "mean": self.mean, "var": var, "std": std, "mean_norm": self.norm_sum / c}


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, "<f8").tobytes()).decode()


def _unb64(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), "<f8").astype(np.float64)
