"""Progress bars on stderr for the long whole-cache operations (verify, sync, stats)."""

from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, unit: str = "B", disable: bool | None = None):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        unit_divisor=1024 if unit == "B" else 1000,
        file=sys.stderr,
        leave=False,
        disable=disable,
    )
