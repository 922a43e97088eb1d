"""What cache_format records about itself: format and code version, packages, hardware."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata

FORMAT_NAME = "actcache"
FORMAT_VERSION = 3  # 2: chunk digests, a hash-chained commit log; 3: BLAKE3 object digests


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@functools.cache
def code_version() -> dict:
    out = {"package": "actcache"}
    try:
        out["version"] = metadata.version("actcache")
    except metadata.PackageNotFoundError:
        out["version"] = "unknown"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            out["git_commit"] = rev.stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", here, "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=5
            )
            out["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


@functools.cache
def packages() -> dict:
    names = ["zarr", "numcodecs", "numpy", "ml_dtypes", "fsspec", "pyarrow", "torch", "transformers", "s3fs"]
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def hardware() -> dict:
    out = {
        "machine": platform.machine(),
        "system": platform.system(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or "",
        "hostname": platform.node(),
    }
    torch = sys.modules.get("torch")  # only if the caller already imported it
    if torch is not None:
        try:
            if torch.cuda.is_available():
                out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:
            pass
    return out


def record() -> dict:
    return {
        "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
        "code": code_version(),
        "packages": packages(),
        "hardware": hardware(),
        "written_at": now_iso(),
    }
