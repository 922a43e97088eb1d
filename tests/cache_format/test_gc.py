"""`gc`: races with commits and its grace period (cache_format/gc.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from support import plain_rows

import cache_format as cf
from cache_format import ops
from cache_format.layout import BF16
from cache_format.stores import Location


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
    import sys

    from cache_format.cli import main

    url = str(tmp_path / "c")
    cf.create_cache(url, d_model=8, layers=[1])
    monkeypatch.setattr(sys, "argv", ["python -m cache_format", "gc", url, *args])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err
