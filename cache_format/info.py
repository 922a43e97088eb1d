"""`info`: what a cache holds, as one dict (the CLI prints it or dumps it as JSON)."""

from __future__ import annotations

from .reader import Cache


def rows_by_source(cache: Cache) -> dict[str, int]:
    """Rows per corpus source, summed from the segments' `rows_by_source` meta (a mixture's measured shares)."""
    out: dict[str, int] = {}
    for s in cache.segments:
        for name, n in (s.meta.get("rows_by_source") or {}).items():
            out[name] = out.get(name, 0) + int(n)
    return out


def info(cache: Cache) -> dict:
    stored = {}
    for L in cache.declared_layers:
        stored[L] = sum(
            v["size"] for s in cache.committed_segments if L in s.layers for v in s.layers[L]["objects"].values()
        )
    cov = cache.layer_coverage()
    n_segs = len(cache.committed_segments)
    raw = cache.n_tokens * cache.d_model * 2
    return {
        "url": cache.url,
        "fingerprint": cache.fingerprint,
        "d_model": cache.d_model,
        "hook": cache.hook,
        "layers": cache.layers,
        "n_tokens": cache.n_tokens,
        "n_segments": n_segs,
        "codec": cache.codec,
        "chunk_tokens": cache.chunk_tokens,
        "shard_rows": cache.shard_rows,
        "layer_fingerprints": {str(L): cache.layer_fingerprint(L) for L in cache.layers},
        "declared_layers": {
            str(L): {
                "segments": cov[L],
                "complete": cov[L] == n_segs,
                "stored_bytes": stored[L],
                "ratio_vs_raw_bf16": (stored[L] / raw) if raw and cov[L] == n_segs else None,
            }
            for L in cache.declared_layers
        },
        "retracted": cache.retracted,
        "copy_of": cache.copy_of,
        "rows_by_source": rows_by_source(cache),
        "meta": cache.meta,
        "segments": [
            {
                "id": s.id,
                "row_start": s.row_start,
                "n_rows": s.n_rows,
                "layers": s.layers,
                "commit": s.commit,
                "meta": s.meta,
            }
            for s in cache.segments
        ],
    }
