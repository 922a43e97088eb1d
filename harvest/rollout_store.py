"""Rollout sidecars beside the cache (`<cache>.rollouts/<tag>/...jsonl`), so a crash after
generation never regenerates: each file is one atomic write through the store interface.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict

from cache_format.stores import Location

from .rollouts import Rollout


def rollouts_dir(cache_url: str) -> str:
    return cache_url.rstrip("/") + ".rollouts"


def _location(cache_url: str) -> Location:
    return Location(rollouts_dir(cache_url))


def save_rollouts(cache_url: str, key: str, rollouts: list[Rollout]) -> None:
    """Write one sidecar file `key`.jsonl atomically (temp + rename locally; one PUT remotely)."""
    body = "".join(json.dumps(asdict(r)) + "\n" for r in rollouts).encode()
    _location(cache_url).write(f"{key}.jsonl", body)


def save_generated(cache_url: str, tag: str, rollouts: list[Rollout]) -> None:
    """One file per finished group, named uniquely: groups from several workers never collide."""
    first = min(r.seq_id for r in rollouts)
    save_rollouts(cache_url, f"{tag}/generated/{first:08d}-{uuid.uuid4().hex[:8]}", rollouts)


def load_all_rollouts(cache_url: str, tag: str) -> dict[int, Rollout]:
    """Every stored rollout under `tag`, by seq_id: graded ones win over bare generations."""
    loc = _location(cache_url)
    out: dict[int, Rollout] = {}
    if not loc.exists(tag):
        return out
    for key in sorted(o.key for o in loc.walk(tag) if o.key.endswith(".jsonl")):
        for line in loc.read(key).decode().splitlines():
            if line.strip():
                r = Rollout(**json.loads(line))
                if r.graded or r.seq_id not in out:
                    out[r.seq_id] = r
    return out
