"""Helpers the tests import by name (`from support import write_cache`); conftest holds the fixtures."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_options(endpoint: str) -> dict:
    return {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
    }


def write_cache(
    url,
    d_model=16,
    layers=(1, 3),
    segments=(40, 25),
    chunk_tokens=8,
    seed=0,
    storage_options=None,
    codec="blosc-zstd1",
    tokenizer_files=None,
    meta=None,
):
    """A small cache with deterministic data. Returns `data`: residuals per layer (ml bf16), rows, sequences."""
    import cache_format as cf
    from cache_format.layout import BF16

    rng = np.random.default_rng(seed)
    w = cf.create_cache(
        url,
        d_model=d_model,
        layers=list(layers),
        codec=codec,
        chunk_tokens=chunk_tokens,
        shard_mib=1,
        tokenizer_files=tokenizer_files,
        storage_options=storage_options,
        meta=meta or {"model": {"name_or_path": "test/model", "dtype": "float32"}},
    )
    data = {
        "residuals": {L: [] for L in layers},
        "rows": {k: [] for k in ("tokens", "seq_ids", "positions", "labels", "roles")},
        "sequences": [],
    }
    seq = 0
    for si, n in enumerate(segments):
        with w.segment(meta={"unit": si}) as seg:
            res = {L: (rng.standard_normal((n, d_model)) * (1 + L)).astype(BF16) for L in layers}
            seq_ids = seq + np.arange(n) // 10
            rows = {
                "tokens": rng.integers(0, 1000, n).astype(np.int32),
                "seq_ids": seq_ids.astype(np.int64),
                "positions": (np.arange(n) % 10).astype(np.int32),
                "labels": rng.integers(-1, 2, n).astype(np.int8),
                "roles": rng.integers(0, 4, n).astype(np.int8),
            }
            seg.append(residuals=res, **rows)
            recs = [
                {"seq_id": int(s), "token_ids": rows["tokens"][seq_ids == s].tolist(), "source": f"s{si}"}
                for s in np.unique(seq_ids)
            ]
            seg.add_sequences(recs)
            seq = int(seq_ids.max()) + 1
        for L in layers:
            data["residuals"][L].append(res[L])
        for k in rows:
            data["rows"][k].append(rows[k])
        data["sequences"] += recs
    data["residuals"] = {L: np.concatenate(v) for L, v in data["residuals"].items()}
    data["rows"] = {k: np.concatenate(v) for k, v in data["rows"].items()}
    return data


def write_big_cache(url, shard_mib=24, layers=(1,), segments=1, storage_options=None):
    """A cache of uncompressed shards of exactly `shard_mib` MiB (one per layer and segment):
    objects larger than a copy's 8 MiB block, written fast (d_model 1024, 2 MiB chunks)."""
    import cache_format as cf
    from cache_format.layout import BF16

    d, ct = 1024, 1024
    rows = shard_mib * 2**20 // (2 * d)
    w = cf.create_cache(
        url,
        d_model=d,
        layers=list(layers),
        codec="none",
        chunk_tokens=ct,
        shard_mib=shard_mib,
        storage_options=storage_options,
        meta={"model": {"name_or_path": "test/big", "dtype": "float32"}},
    )
    base = np.arange(rows * d, dtype=np.uint32).reshape(rows, d)
    for si in range(segments):
        with w.segment(meta={"unit": si}) as seg:
            res = {L: ((base * (L + 3) + si) & 0x7F7F).astype(np.uint16).view(BF16) for L in layers}
            ids = np.arange(rows) + si * rows
            seg.append(residuals=res, tokens=(ids % 1000).astype(np.int32), seq_ids=ids // 512, positions=ids % 512)
    return w


# -- cache_format tests: reads compared across stores, stored objects edited in place, plain rows --------------------

FAULTS = ("500", "drop", "truncate", "short", "flip")


def everything(c):
    out = {
        "tokens": c.tokens[:],
        "seq_ids": c.seq_ids[:],
        "labels": c.labels[:],
        "roles": c.roles[:],
        "positions": c.positions[:],
        "fp": c.fingerprint,
        "seqs": c.sequences().to_pylist(),
        "tok": c.tokenizer_files,
    }
    for L in c.layers:
        out[f"res{L}"] = c.residuals(L).numpy().view(np.uint16)
        out[f"chunks{L}"] = [c.read_chunk(L, i).view(np.uint16) for i in range(c.n_chunks)]
        out[f"stats{L}"] = c.stats(L)["mean"]
    return out


def same_cache(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], list) and a[k] and isinstance(a[k][0], np.ndarray):
            assert all(np.array_equal(x, y) for x, y in zip(a[k], b[k])), k
        elif isinstance(a[k], np.ndarray):
            assert np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def edit_file(path, old: bytes, new: bytes) -> None:
    raw = open(path, "rb").read()
    assert old in raw
    open(path, "wb").write(raw.replace(old, new, 1))


def shard_path(url, c, layer=1, si=0) -> str:
    """The first shard object of segment `si`'s array of `layer`, from the cache's log."""
    e = c.log.segments[si].layers[layer]
    return os.path.join(url, e["array"], "c", "0", "0")


def plain_rows(n, base):
    ids = np.arange(n) + base
    return dict(tokens=ids, seq_ids=ids, positions=np.zeros(n, np.int32))


# -- train tests: a run small enough to finish in seconds on a `write_cache` cache -----------------------------------


def quick_train_args(url, out, tokens: int = 512) -> list[str]:
    """`train run` arguments for a few seconds' run on a `write_cache(segments=(400, 400))` cache."""
    sets = {
        "d_sae": 32,
        "k": 3,
        "k_aux": 8,
        "batch_size": 128,
        "training_tokens": tokens,
        "checkpoint_every_tokens": 256,
        "eval_every_tokens": 256,
        "heldout_fraction": 0.3,
        "shuffle_buffer_tokens": 512,
        "geometric_median_samples": 256,
        "eval_tokens": 256,
    }
    args = ["--no-progress", "--profile", "tiny", "--cache", str(url), "--out", str(out), "--layers", "1"]
    for k, v in sets.items():
        args += ["--set", f"train.{k}={v}"]
    return args


# -- pages: Debian's headless Chromium -----------------------------------------------------------------------


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def chromium_binary() -> str:
    """Debian's chromium (and chromium-driver), which `make install` apt-installs; a test never
    installs anything itself."""
    import pytest

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run `make install` (it apt-installs chromium and chromium-driver)")
    return CHROMIUM


def chromium_flags(profile_dir) -> list[str]:
    """Headless on a closed network: no sandbox (root in CI), no GPU, nothing fetched in the background."""
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile_dir}",
    ]
