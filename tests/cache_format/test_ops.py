"""Whole-cache operations (cache_format/ops.py): info, verify (a flipped byte; rows held twice,
found cheaply from the log by `train run`'s check), stats on a dask cluster, gc's races and grace period."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading

import numpy as np
import pytest
from support import plain_rows

import cache_format as cf
from cache_format import ops
from cache_format.layout import BF16
from cache_format.stores import Location


def test_info_json_and_text(run, make_cache):
    url, _ = make_cache(segments=(40, 25))
    code, out, err = run("info", url, "--json")
    d = json.loads(out)
    c = cf.open_cache(url)
    assert code == 0 and d["fingerprint"] == c.fingerprint and d["n_tokens"] == 65 and d["layers"] == [1, 3]
    assert d["layer_fingerprints"]["1"] == c.layer_fingerprint(1) and len(d["segments"]) == 2
    assert d["declared_layers"]["3"]["complete"] and d["meta"]["model"]["name_or_path"] == "test/model"
    code, out, _ = run("info", url)
    assert code == 0 and c.fingerprint in out and "layer    3   complete" in out
    cf.open_cache(url, mode="a").add_layer(7)  # declared, nothing backfilled yet
    code, out, _ = run("info", url)
    assert "layer    7   backfill pending: 0/2 segments" in out
    assert json.loads(run("info", url, "--json")[1])["declared_layers"]["7"] == {
        "segments": 0,
        "complete": False,
        "stored_bytes": 0,
        "ratio_vs_raw_bf16": None,
    }


def test_verify_catches_a_flipped_byte(run, make_cache):
    url, _ = make_cache(segments=(40, 25))
    assert run("verify", url)[0] == 0
    c = cf.open_cache(url)
    e = c.log.segments[1].layers[3]
    shard = next(k for k in e["objects"] if k.startswith("c/"))
    path = f"{url}/{e['array']}/{shard}"
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 3] ^= 0x01
    open(path, "wb").write(bytes(raw))
    code, out, err = run("verify", url)
    assert code == 2
    assert f"BAD {e['array']}/{shard}: checksum mismatch" in out
    assert err.count("\n") == 1 and err.startswith("error: verify: 1 of") and "Traceback" not in err


def test_stats_on_a_dask_cluster(run, make_cache):
    distributed = pytest.importorskip("distributed")
    url, data = make_cache(segments=(40, 25), chunk_tokens=8)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl:
        code, out, err = run("stats", url, "--scheduler", cl.scheduler_address, "--json")
    assert code == 0, err
    d = json.loads(out)
    for L in (1, 3):
        x = data["residuals"][L].astype(np.float64)
        assert d[str(L)]["count"] == 65
        assert d[str(L)]["mean_norm"] == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-6)
        assert d[str(L)]["mean_std"] == pytest.approx(x.std(0).mean(), rel=1e-6)
        assert d[str(L)]["max_abs_diff_vs_committed_mean"] < 1e-12
    code, out, _ = run("stats", url, "--layers", "3")  # local threads
    assert code == 0 and "layer    3  rows 65" in out


def _append(url, seq_ids, positions, records=None):
    w = cf.open_cache(url, mode="a")
    n = len(seq_ids)
    with w.segment() as seg:
        res = {L: np.ones((n, w.d_model), BF16) for L in w.layers}
        seg.append(res, tokens=np.zeros(n, np.int32), seq_ids=seq_ids, positions=positions)
        if records:
            seg.add_sequences(records)
    return seg.id


def test_verify_names_both_segments_of_duplicated_rows_and_the_fix(make_cache, run):
    url, data = make_cache(segments=(40, 25))  # sequences 0..3 and 4..6, 10 rows each
    first = cf.open_cache(url).segments[0].id
    dup = _append(url, np.repeat([2, 3], 10), np.tile(np.arange(10), 2))  # sequences 2 and 3 again
    code, out, err = run("verify", url)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"BAD segments {first} and {dup}: both hold 20 rows (first: seq_id 2, position 0)" in out
    assert f"retract {url} {dup}" in err  # the later copy is the one to retract
    found = ops.quick_duplicates(cf.open_cache(url))
    assert len(found) == 1 and first in found[0][0] and dup in found[0][0]
    run("retract", url, dup)
    assert run("verify", url)[0] == 0


def test_verify_names_a_sequence_recorded_twice(make_cache, run):
    url, _ = make_cache(segments=(40,))
    seg = _append(url, np.full(5, 99), np.arange(5), [{"seq_id": 1, "token_ids": [1, 2]}])  # rows are new
    code, out, err = run("verify", url)
    assert code == 2 and "sequence 1 is recorded more than once" in out and seg in out
    assert ops.quick_duplicates(cf.open_cache(url)) == []  # the quick check looks at rows only


def test_a_sequence_split_across_segments_is_not_a_duplicate(make_cache):
    url, _ = make_cache(segments=(40,))
    _append(url, np.full(5, 7), np.arange(5))
    _append(url, np.full(5, 7), np.arange(5, 10))  # the same sequence, later positions
    c = cf.open_cache(url)
    assert ops.quick_duplicates(c) == [] and ops.verify(c)[1] == []


def test_the_quick_check_reads_no_row_when_no_sequences_overlap(make_cache):
    url, _ = make_cache(segments=(40, 25, 30))
    c = cf.open_cache(url)
    for s in c.log.segments:  # without its row columns, any read of them would fail
        shutil.rmtree(os.path.join(url, s.record["rows"]["path"]))
    assert ops.quick_duplicates(c) == []
    ops.refuse_duplicates(c)
    with pytest.raises(FileNotFoundError):
        ops.all_duplicates(c)  # verify's check reads them


def _forged(url, seq_ranges):
    """A real segment holding sequences 0..3 again (positions 0..9), committed with a record whose
    seq_ranges say `seq_ranges` (prepared, edited, then committed: what a crafted cache can hold)."""
    w = cf.open_cache(url, mode="a")
    with w.segment(defer=True) as seg:
        seg.append(
            {L: np.ones((40, w.d_model), BF16) for L in w.layers},
            tokens=np.zeros(40, np.int32),
            seq_ids=np.arange(40) // 10,
            positions=np.arange(40) % 10,
        )
    w.adopt(seg.prepared)
    w.commit_prepared({**seg.prepared, "seq_ranges": seq_ranges})
    return seg.id


def test_verify_catches_a_record_whose_runs_lie_about_its_rows(make_cache):
    """`quick` trusts the runs each record states; verify checks them against the rows."""
    url, _ = make_cache(segments=(40,))
    forged = _forged(url, [[1000, 1004]])
    assert ops.quick_duplicates(cf.open_cache(url)) == []  # the log alone cannot tell
    problems = ops.verify(cf.open_cache(url))[1]
    assert any(forged in where and "seq_ranges differ from its rows" in why for where, why in problems)
    assert any(forged in where and "both hold 40 rows" in why for where, why in problems)


def test_a_record_whose_seq_ranges_are_not_runs_is_refused_in_one_line(make_cache):
    url, _ = make_cache(segments=(40,))
    _forged(url, [[5, 2]])
    with pytest.raises(cf.CacheError, match="seq_ranges is not a sorted list") as e:
        cf.open_cache(url)
    assert "\n" not in str(e.value)


def test_gc_racing_a_commit_never_deletes_what_just_committed(tmp_path, monkeypatch):
    from cache_format import log

    url = str(tmp_path / "c")
    w = cf.create_cache(url, d_model=8, layers=[1], chunk_tokens=4, shard_mib=1 / 2**15)
    loc = Location(url)
    read_log, committed, doomed = threading.Event(), threading.Event(), []
    real = log.load_records

    def load_then_wait(*a, **kw):  # the writer commits (and drops its lease) right after gc read the log
        out = real(*a, **kw)
        if threading.current_thread() is gc:  # the writer's own commit reads the log too
            read_log.set()
            committed.wait(10)
        return out

    monkeypatch.setattr(log, "load_records", load_then_wait)
    gc = threading.Thread(target=lambda: doomed.extend(ops.gc(loc, older_than_s=0, force=True)))
    with w.segment() as seg:
        seg.append({1: np.ones((12, 8), BF16)}, **plain_rows(12, 0))
        seg.buffers[1].wait()
        gc.start()
        read_log.wait(10)
    committed.set()
    gc.join(10)
    monkeypatch.setattr(log, "load_records", real)
    c = cf.open_cache(url)
    assert doomed == [] and c.n_tokens == 12 and ops.verify(c)[1] == []


@pytest.mark.parametrize(
    "args, needle", [(["--older-than", "10m"], "under an hour"), (["--older-than", "0s"], "add --force")]
)
def test_gc_below_an_hour_needs_force(tmp_path, args, needle, monkeypatch, capsys):

    from cache_format.cli import main

    url = str(tmp_path / "c")
    cf.create_cache(url, d_model=8, layers=[1])
    monkeypatch.setattr(sys, "argv", ["python -m cache_format", "gc", url, *args])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err
