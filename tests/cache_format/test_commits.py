"""The commit log: chained records, edits refused, races, fingerprints (cache_format/log.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from support import edit_file

import cache_format as cf
from cache_format import log
from cache_format.stores import Location


def test_fingerprints_are_content_derived(tmp_path):
    from support import write_cache

    write_cache(str(tmp_path / "a"), seed=1)
    write_cache(str(tmp_path / "b"), seed=1)
    write_cache(str(tmp_path / "c"), seed=2)
    a, b, c = (cf.open_cache(tmp_path / n) for n in "abc")
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.layer_fingerprint(1) == b.layer_fingerprint(1) != a.layer_fingerprint(3)


@pytest.mark.parametrize("edit", ["n_rows", "kind", "remove", "utf8", "root_layers", "root_record"])
def test_any_edit_to_the_log_or_the_root_is_refused_in_one_line(make_cache, run, edit):
    url, _ = make_cache(segments=(40, 25, 10))
    commits_dir = os.path.join(url, "commits")
    rec = os.path.join(commits_dir, "0000000002.json")
    if edit == "n_rows":
        edit_file(rec, b'"n_rows":25', b'"n_rows":24')
    elif edit == "kind":
        edit_file(rec, b'"kind":"segment"', b'"kind":"segmenx"')
    elif edit == "remove":
        os.unlink(rec)
    elif edit == "utf8":
        raw = open(rec, "rb").read()
        open(rec, "wb").write(raw[:30] + b"\xff" + raw[31:])
    elif edit == "root_layers":
        zj = os.path.join(url, "zarr.json")
        edit_file(zj, b'"layers":[1,3]', b'"layers":[1]')
    elif edit == "root_record":
        os.unlink(os.path.join(commits_dir, log.ROOT_RECORD))
    with pytest.raises(cf.CacheError, match="commit log is damaged") as e:
        cf.open_cache(url)
    assert "\n" not in str(e.value)
    with pytest.raises(cf.CacheError, match="damaged"):
        cf.open_cache(url, mode="a").segment()
    code, out, err = run("verify", url)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "commit log is damaged" in err


def test_a_racing_commit_chains_to_the_winner(make_cache):
    url, _ = make_cache(segments=(10,))
    loc = Location(url)
    names, _ = log.list_commits(loc)
    a = log.commit(loc, {"kind": "add_layer", "layer": 7})
    b = log.commit(loc, {"kind": "add_layer", "layer": 8})
    recs = log.load_records(loc, {})
    assert list(recs)[-2:] == [a, b] and recs[b]["prev"] == recs[a]["digest"]


def test_fingerprints_do_not_depend_on_commit_order(tmp_path):
    from cache_format.layout import BF16

    rng = np.random.default_rng(3)
    parts = [(rng.standard_normal((n, 8)).astype(BF16), np.arange(n) + 100 * i) for i, n in enumerate((9, 5, 7))]
    fps = []
    for order in ((0, 1, 2), (2, 0, 1)):
        w = cf.create_cache(tmp_path / f"c{order[0]}", d_model=8, layers=[2], chunk_tokens=4)
        for i in order:
            x, sid = parts[i]
            with w.segment(meta={"unit": i}) as seg:
                seg.append({2: x}, tokens=sid, seq_ids=sid, positions=np.zeros(len(sid), np.int32))
        c = w.snapshot()
        fps.append((c.fingerprint, c.layer_fingerprint(2)))
    assert fps[0] == fps[1]
