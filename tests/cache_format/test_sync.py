"""`sync` between local, S3 and a faulty HTTP server keeps the fingerprint (cache_format/sync.py)."""

from __future__ import annotations

import numpy as np
from support import FAULTS, _everything, _same, write_cache

import cache_format as cf
from cache_format import ops
from cache_format.bf16 import BF16
from cache_format.stores import Location


def test_sync_local_s3_local_keeps_the_fingerprint(tmp_path, s3_bucket):
    url, opts = s3_bucket
    write_cache(str(tmp_path / "a"), segments=(30, 20, 9))
    src = cf.open_cache(tmp_path / "a")
    w = cf.open_cache(tmp_path / "a", mode="a")
    w.retract(src.segments[1].id)
    bf = w.add_layer(5)
    info = bf.pending()[0]
    s = slice(info.row_start, info.row_start + info.n_rows)
    src.refresh()
    bf.write(
        info.id,
        residuals=np.full((info.n_rows, 16), 2, BF16),
        tokens=src.tokens[s],
        seq_ids=src.seq_ids[s],
        positions=src.positions[s],
    )
    src.refresh()
    r = ops.sync(str(tmp_path / "a"), f"{url}/c", None, opts)
    assert r["segments"] == 2 and r["layers"] == 0
    mid = cf.open_cache(f"{url}/c", storage_options=opts)
    assert mid.fingerprint == src.fingerprint and mid.layer_coverage()[5] == 1
    ops.sync(f"{url}/c", str(tmp_path / "b"), opts, None)
    back = cf.open_cache(tmp_path / "b")
    assert back.fingerprint == src.fingerprint
    assert all(back.layer_fingerprint(L) == src.layer_fingerprint(L) for L in src.layers)
    assert np.array_equal(back.residuals(3).numpy().view(np.uint16), src.residuals(3).numpy().view(np.uint16))
    assert ops.sync(str(tmp_path / "a"), f"{url}/c", None, opts)["segments"] == 0  # idempotent
    # A backfill that lands later in SRC travels as a layer commit.
    info = bf.pending()[0]
    s = slice(info.row_start, info.row_start + info.n_rows)
    bf.write(
        info.id,
        residuals=np.full((info.n_rows, 16), 3, BF16),
        tokens=src.tokens[s],
        seq_ids=src.seq_ids[s],
        positions=src.positions[s],
    )
    assert ops.sync(str(tmp_path / "a"), f"{url}/c", None, opts)["layers"] == 1
    assert cf.open_cache(f"{url}/c", storage_options=opts).fingerprint == src.refresh().fingerprint
    assert 5 in src.layers


def test_sync_from_a_faulty_server_retries_and_copies_exactly(tmp_path, http_serve):
    url = str(tmp_path / "c")
    write_cache(url, segments=(40, 25), chunk_tokens=8, tokenizer_files={"tokenizer.json": b'{"x": 1}'})
    ops.publish(Location(url))
    base = http_serve(tmp_path, faults=FAULTS)
    dst = str(tmp_path / "copy")
    got = ops.sync(f"{base}/c", dst)
    assert got["segments"] == 2 and http_serve.injected
    _same(_everything(cf.open_cache(url)), _everything(cf.open_cache(dst)))
    assert not [p for p in Location(dst).walk("segments") if p.key.endswith("/.lease")]  # released after each copy
