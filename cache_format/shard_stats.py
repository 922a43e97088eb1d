"""`stats`: per-layer statistics recomputed from the shards with dask, one task per shard."""

from __future__ import annotations

import sys

from .arrays import _ArrayReader
from .commandline import dask_client, progress_bar
from .reader import Cache
from .stats import RunningStats
from .stores import Location


def _shard_stats(url: str, storage_options: dict | None, path: str, objects: dict, shard: int) -> dict:
    """Decode one shard and return its RunningStats as JSON (runs on a dask worker)."""
    r = _ArrayReader(Location(url, storage_options), path, objects)
    st = RunningStats(r.shape[1])
    k0 = shard * r.per_shard
    for k in range(k0, min(k0 + r.per_shard, r.n_chunks)):
        st.update_bits(r.chunk(k))
    return st.to_json()


def dask_stats(
    cache: Cache, layers: list[int] | None = None, scheduler: str | None = None, storage_options: dict | None = None
) -> dict[int, dict]:
    """Recompute per-layer statistics from the shards: one dask task per shard, merged in order."""
    import dask

    layers = layers or cache.layers
    for L in layers:
        cache.check_layer(L)
    tasks, owners = [], []
    for L in layers:
        for si in range(len(cache.committed_segments)):
            r = cache.layer_reader(si, L)
            n_shards = -(-r.shape[0] // r.shard_rows)
            for sh in range(n_shards):
                tasks.append(dask.delayed(_shard_stats, pure=True)(cache.url, storage_options, r.path, r.objects, sh))
                owners.append(L)
    if scheduler:
        from distributed import as_completed

        with dask_client(scheduler, fix="check the address") as client:
            futures = client.compute(tasks)
            index = {f.key: i for i, f in enumerate(futures)}
            results = [None] * len(futures)
            with progress_bar(len(futures), "stats", unit="shard") as bar:
                for f in as_completed(futures):
                    results[index[f.key]] = f.result()
                    bar.update(1)
    else:
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=sys.stderr, minimum=2):
            results = list(dask.compute(*tasks, scheduler="threads"))
    out = {L: RunningStats(cache.d_model) for L in layers}
    for L, j in zip(owners, results, strict=True):
        out[L].merge(RunningStats.from_json(j))
    return {L: st.summary() for L, st in out.items()}
