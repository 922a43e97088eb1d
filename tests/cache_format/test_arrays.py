"""The chunk reader refuses an index that contradicts the commit (cache_format/arrays.py)."""

from __future__ import annotations

import numpy as np
import pytest
from support import shard_path

import cache_format as cf
from cache_format import integrity


def test_an_index_that_marks_a_written_chunk_absent_is_refused_not_read_as_zeros(make_cache):
    import google_crc32c

    url, data = make_cache(segments=(40, 25), chunk_tokens=8)
    c = cf.open_cache(url)
    obj = c.log.segments[0].layers[1]["objects"]["c/0/0"]
    m = len(obj["chunks"])
    path = shard_path(url, c)
    raw = bytearray(open(path, "rb").read())
    tail = len(raw) - (16 * m + 4)
    raw[tail + 16 : tail + 32] = b"\xff" * 16  # inner chunk 1: "absent", with a valid CRC32C over the edit
    raw[-4:] = google_crc32c.value(bytes(raw[tail : tail + 16 * m])).to_bytes(4, "little")
    open(path, "wb").write(bytes(raw))
    fresh = cf.open_cache(url)
    with pytest.raises(integrity.IntegrityError, match="marks inner chunk 1 absent"):
        fresh.residuals(1)[8:16]
    import torch

    got = fresh.residuals(1)[0:8].view(torch.int16).numpy()
    assert np.array_equal(got, data["residuals"][1][0:8].view(np.int16))  # the other chunks still read
