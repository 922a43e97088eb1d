"""A kill at any step of creating a cache (or a sync destination) leaves nothing, or a cache the
same command finishes (cache_format/creation.py). Killed at each store write by the fault hook
(cache_format/stores/faults.py), not by timing."""

from __future__ import annotations

import os

import numpy as np
import pytest
from support import plain_rows

import cache_format as cf
from cache_format import ops
from cache_format.layout import BF16
from cache_format.stores import Location, faults
from cache_format.sync import sync
from cache_format.write import CacheExistsError

TOKENIZER = {"tokenizer.json": b'{"model": {}}', "tokenizer_config.json": b"{}"}
CREATE_WRITES = 1 + len(TOKENIZER) + 1  # zarr.json, the tokenizer files, the root commit record


def _create(url):
    return cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4, meta={"run": 1}, tokenizer_files=TOKENIZER)


def _usable(url):
    """A finished cache: it opens, takes a segment, verifies, serves its tokenizer."""
    w = cf.open_cache(url, mode="a")
    with w.segment() as seg:
        seg.append({1: np.ones((4, 8), BF16)}, **plain_rows(4, 0))
    c = cf.open_cache(url)
    assert c.n_tokens == 4 and ops.verify(c)[1] == [] and c.tokenizer_files == TOKENIZER
    return c


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("n", range(1, CREATE_WRITES + 1))
def test_create_killed_at_any_write_is_finished_by_the_same_call(tmp_path, run, n, when):
    url = str(tmp_path / "c")
    with faults.armed(faults.Fault(n=n, when=when)) as f, pytest.raises(faults.Killed):
        _create(url)
    assert f.fired
    if not os.path.exists(os.path.join(url, "zarr.json")):  # killed before the point of no return
        assert not Location(url).is_nonempty_dir()  # nothing (a temporary at most)
    elif n == CREATE_WRITES and when == "after":  # the last write landed: a finished cache
        with pytest.raises(CacheExistsError):
            _create(url)
        _usable(url)
        return
    else:  # unfinished: every reader says how to finish it, in one line
        with pytest.raises(cf.CacheError, match="creation was interrupted.*re-run the command"):
            cf.open_cache(url)
        with pytest.raises(cf.CacheError, match="creation was interrupted"):
            cf.open_cache(url, mode="a")
        for cmd in ("info", "verify"):
            code, out, err = run(cmd, url)
            assert code == 2 and err.count("\n") == 1 and "re-run the command that created it" in err
    _create(url)  # the same call again finishes it
    _usable(url)


def test_an_unfinished_cache_with_other_settings_is_finished_but_not_taken(tmp_path):
    url = str(tmp_path / "c")
    with faults.armed(faults.Fault(n=2, when="before")), pytest.raises(faults.Killed):
        _create(url)  # killed after zarr.json
    with pytest.raises(CacheExistsError):  # another command's cache: finished, then refused as existing
        cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4, meta={"run": 2}, tokenizer_files=TOKENIZER)
    assert cf.open_cache(url).meta["run"] == 1
    url2 = str(tmp_path / "d")
    with faults.armed(faults.Fault(n=2, when="before")), pytest.raises(faults.Killed):
        _create(url2)
    with pytest.raises(cf.UserError, match="tokenizer file tokenizer.json was written"):
        cf.create_cache(url2, d_model=8, layers=[1], chunk_tokens=4, tokenizer_files={"tokenizer.json": b"{}"})
    _create(url2)  # the command that began it still can
    _usable(url2)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("n", range(1, CREATE_WRITES + 1))
def test_sync_killed_while_creating_its_destination_is_finished_by_the_same_sync(tmp_path, make_cache, n, when):
    src, _ = make_cache(segments=(40, 25), tokenizer_files=TOKENIZER)
    dst = str(tmp_path / "dst")
    with faults.armed(faults.Fault(n=n, when=when)) as f, pytest.raises(faults.Killed):
        sync(src, dst)
    assert f.fired
    if not os.path.exists(os.path.join(dst, "zarr.json")):
        assert not Location(dst).is_nonempty_dir()
    elif not (n == CREATE_WRITES and when == "after"):
        with pytest.raises(cf.CacheError, match="creation was interrupted"):
            cf.open_cache(dst)
    sync(src, dst)  # the same sync again
    a, b = cf.open_cache(src), cf.open_cache(dst)
    assert b.fingerprint == a.fingerprint and b.log.root == a.log.root and ops.verify(b)[1] == []


def test_a_kill_between_zarr_json_and_the_first_record_no_longer_strands_harvest_sync_info_verify(tmp_path, make_cache):
    """The issue's case: zarr.json landed, commits/0 did not. `sync` into it finishes it."""
    src, _ = make_cache(segments=(40,), tokenizer_files=TOKENIZER)
    dst = str(tmp_path / "dst")
    with faults.armed(faults.Fault(key="commits/0000000000.json", when="before")), pytest.raises(faults.Killed):
        sync(src, dst)
    assert os.path.exists(os.path.join(dst, "zarr.json")) and not os.listdir(os.path.join(dst, "commits"))
    sync(src, dst)
    assert cf.open_cache(dst).fingerprint == cf.open_cache(src).fingerprint
