"""Per-layer running statistics: count, mean, M2 (Welford/Chan) and mean L2 norm.

Computed at append time in float64 over the exact bf16 values, stored per segment, and
merged across segments with Chan's parallel formula, so that `Cache.stats` costs no data
pass. `python -m cache_format stats` recomputes them from the shards with dask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bf16 import bits_to_float32


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

    def update_bits(self, bits: np.ndarray, block: int = 2048) -> None:
        for s in range(0, len(bits), block):
            x = bits_to_float32(bits[s:s + block]).astype(np.float64)
            n = len(x)
            if n == 0:
                continue
            mean = x.mean(0)
            m2 = ((x - mean) ** 2).sum(0)
            norm = float(np.sqrt((x * x).sum(1)).sum())
            self.merge(RunningStats(self.d, n, mean, m2, norm))

    def merge(self, other: "RunningStats") -> "RunningStats":
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.m2, self.norm_sum = other.count, other.mean.copy(), other.m2.copy(), other.norm_sum
            return self
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        self.norm_sum += other.norm_sum
        self.count = n
        return self

    def to_json(self) -> dict:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist(), "norm_sum": self.norm_sum}

    @classmethod
    def from_json(cls, j: dict) -> "RunningStats":
        mean = np.asarray(j["mean"], np.float64)
        return cls(len(mean), int(j["count"]), mean, np.asarray(j["m2"], np.float64), float(j["norm_sum"]))

    def summary(self) -> dict:
        c = max(self.count, 1)
        var = self.m2 / c
        return {"count": self.count, "mean": self.mean, "var": var, "std": np.sqrt(var),
                "mean_norm": self.norm_sum / c}
