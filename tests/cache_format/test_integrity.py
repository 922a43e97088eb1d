"""Every read is checked: chunk digests, shard-index CRC32C, small objects (cache_format/integrity.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from support import flip, shard_path, write_cache

import cache_format as cf
from cache_format import integrity, ops
from cache_format.stores import Location


def test_every_chunk_has_a_digest_and_a_flip_anywhere_in_a_shard_is_caught(make_cache):
    url, data = make_cache(segments=(40, 25), chunk_tokens=8)
    c = cf.open_cache(url)
    obj = c.log.segments[0].layers[1]["objects"]["c/0/0"]
    assert len(obj["chunks"]) == 5 and all(isinstance(d, str) and len(d) == 16 for d in obj["chunks"])
    path, size = shard_path(url, c), obj["size"]
    caught = 0
    for off in np.linspace(0, size - 1, 12).astype(int):  # chunk bytes and the index alike
        flip(path, int(off))
        fresh = cf.open_cache(url)
        with pytest.raises(integrity.IntegrityError, match="c/0/0.*corrupt"):
            for i in range(5):
                fresh.read_chunk(1, i)
        caught += 1
        flip(path, int(off))  # restore
    assert caught == 12
    assert np.array_equal(cf.open_cache(url).residuals(1).numpy(), data["residuals"][1])


def test_flips_in_rows_stats_sequences_and_array_metadata_are_caught(make_cache, run):
    url, _ = make_cache(segments=(40,), chunk_tokens=8)
    c = cf.open_cache(url)
    s = c.log.segments[0]
    rows = s.record["rows"]["path"]
    cases = [
        (os.path.join(url, rows, "tokens", "c", "0"), lambda c: c.tokens[:]),
        (os.path.join(url, s.layers[3]["stats"]["path"]), lambda c: c.stats(3)),
        (os.path.join(url, s.record["sequences"]["path"]), lambda c: c.sequences()),
        (os.path.join(url, s.layers[1]["array"], "zarr.json"), lambda c: c.residuals(1)[0:3]),
    ]
    for path, read in cases:
        flip(path, 10)
        with pytest.raises(integrity.IntegrityError, match="corrupt"):
            read(cf.open_cache(url))
        code, out, err = run("verify", url)
        assert code == 2 and "checksum mismatch" in out and err.startswith("error: verify: 1 of")
        flip(path, 10)
    assert run("verify", url)[0] == 0


def test_a_byte_flipped_on_the_server_fails_in_one_line_after_one_re_read(tmp_path, http_serve):
    url = str(tmp_path / "c")
    write_cache(url, segments=(40,), chunk_tokens=8)
    ops.publish(Location(url))
    c = cf.open_cache(url)
    e = c.log.segments[0].layers[3]
    path = os.path.join(url, e["array"], "c", "0", "0")
    raw = bytearray(open(path, "rb").read())
    raw[20] ^= 1
    open(path, "wb").write(bytes(raw))
    remote = cf.open_cache(f"{http_serve(tmp_path)}/c")
    with pytest.raises(integrity.IntegrityError) as err:
        remote.residuals(3)[:]
    assert f"{e['array']}/c/0/0: inner chunk 0 does not match its digest after re-reading it" in str(err.value)
    assert "\n" not in str(err.value)
