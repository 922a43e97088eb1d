"""What a published SAE file's name says: its layout (Qwen-Scope's `layer{n}.sae.pt`), its k and
its layer, for files whose config does not record them (the seed cards name them so).
"""

from __future__ import annotations

import re
from pathlib import Path

QWEN_SCOPE_NAME = re.compile(r"layer(\d+)\.sae\.pt")
K_IN_NAME = [
    re.compile(r"(?:^|[_\-.])k(\d+)(?=[_\-.]|$)"),
    re.compile(r"topk[_\-]?(\d+)", re.I),
    re.compile(r"L0[_\-](\d+)"),
]
LAYER_IN_NAME = [re.compile(r"(?:^|[_\-.])L(\d+)(?=[_\-.])"), re.compile(r"^layer(\d+)\.")]


def k_from_name(p: Path) -> int | None:
    """`sae_L11_n4096_k32.pt` → 32; `…-W64K-L0_50/layer3.sae.pt` → 50; `…-topk64/…` → 64."""
    for part in [p.name] + [q.name for q in p.parents][:2]:
        for rx in K_IN_NAME:
            m = rx.search(part)
            if m:
                return int(m.group(1))
    return None


def layer_from_name(p: Path) -> int | None:
    for rx in LAYER_IN_NAME:
        m = rx.search(p.name)
        if m:
            return int(m.group(1))
    return None
