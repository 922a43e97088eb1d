"""The arrays a writer makes are standard sharded zarr v3 (cache_format/array_writer.py)."""

from __future__ import annotations

import json

import numpy as np
import zarr

import cache_format as cf


def test_arrays_are_standard_zarr(make_cache):
    url, data = make_cache()
    c = cf.open_cache(url)
    seg = c.segments[0]
    arr = zarr.open_array(f"{url}/segments/{seg.id}/resid_post/3", mode="r")
    assert arr.dtype == np.uint16 and arr.attrs["actcache_dtype"] == "bfloat16"
    assert np.array_equal(arr[:], data["residuals"][3][:40].view(np.uint16))
    meta = json.load(open(f"{url}/segments/{seg.id}/resid_post/3/zarr.json"))
    (shard,) = meta["codecs"]
    blosc = shard["configuration"]["codecs"][1]["configuration"]
    assert shard["name"] == "sharding_indexed" and blosc == {
        "typesize": 2,
        "cname": "zstd",
        "clevel": 1,
        "shuffle": "shuffle",
        "blocksize": 1 << 20,
    }
