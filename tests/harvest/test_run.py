"""Resume after kill -9, and scale-out over a real dask LocalCluster."""

import dataclasses
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import cache_format as cf
from cache_format.stores.base import Fault, armed
from harvest import run as hr
from harvest.config import load_config

OVERRIDES = ["corpus.seq_len=64", "harvest.segment_sequences=4", "harvest.batch_size=4", "harvest.chunk_tokens=128"]


def cfg_for(url, tokens, **flags):
    return load_config(
        None,
        "tiny",
        OVERRIDES,
        **{
            "harvest.cache": str(url),
            "harvest.source": "corpus",
            "harvest.layers": [1, 4],
            "corpus.tokens": tokens,
            **flags,
        },
    )


def rows(url):
    """{(seq_id, position): (token, residual rows)} of a cache, checking there are no duplicates."""
    c = cf.open_cache(url)
    sid, pos, tok = (np.asarray(x[:]) for x in (c.seq_ids, c.positions, c.tokens))
    keys = list(zip(sid.tolist(), pos.tolist()))
    assert len(set(keys)) == len(keys), "duplicate rows"
    res = {L: c.residuals(L)[:].float() for L in c.layers}
    return c, {k: (int(tok[i]), i) for i, k in enumerate(keys)}, res


def assert_same_rows(url_a, url_b):
    ca, a, ra = rows(url_a)
    cb, b, rb = rows(url_b)
    assert set(a) == set(b) and ca.layers == cb.layers
    ia = np.array([a[k][1] for k in sorted(a)])
    ib = np.array([b[k][1] for k in sorted(a)])
    assert [a[k][0] for k in sorted(a)] == [b[k][0] for k in sorted(a)]
    for L in ca.layers:
        x, y = ra[L][torch.from_numpy(ia)], rb[L][torch.from_numpy(ib)]
        rel = (x - y).norm(dim=1) / x.norm(dim=1)
        assert rel.max() < 0.02, (L, rel.max())


@pytest.mark.slow
def test_resume_after_kill_9_gives_the_rows_of_an_uninterrupted_run(tmp_path):
    tokens = 64 * 80  # 80 sequences, 20 units
    whole = tmp_path / "whole"
    hr.run(cfg_for(whole, tokens), progress=False)

    url = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "harvest",
        "run",
        "--profile",
        "tiny",
        "--cache",
        str(url),
        "--source",
        "corpus",
        "--layers",
        "1,4",
        "--tokens",
        str(tokens),
        "--quiet",
        *sum((["--set", o] for o in OVERRIDES), []),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rng = random.Random()
    target, delay = rng.randint(1, 15), rng.uniform(0.0, 0.1)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for a random number of commits, then a random moment more
        try:
            if len(cf.open_cache(str(url)).segments) >= target:
                break
        except cf.CacheError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    time.sleep(delay)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = cf.open_cache(str(url))
    assert 0 < len(partial.segments) < 20 and partial.n_tokens % (4 * 64) == 0  # only whole committed units

    summary = hr.run(cfg_for(url, tokens), progress=False)  # the same command again
    assert summary["sequences_done_before"] == 4 * len(partial.segments)
    assert_same_rows(whole, url)
    resumed, uninterrupted = cf.open_cache(str(url)), cf.open_cache(str(whole))
    assert resumed.n_tokens == tokens
    # commits land in plan order, so the killed run committed a prefix and the resumed one the rest
    assert [s.meta["unit"] for s in resumed.segments] == [s.meta["unit"] for s in uninterrupted.segments]
    assert resumed.fingerprint == uninterrupted.fingerprint


@pytest.mark.slow
def test_two_dask_workers_each_write_their_own_segments(tmp_path):
    tokens = 64 * 16  # 4 units
    local = tmp_path / "local"
    hr.run(cfg_for(local, tokens), progress=False)
    url = tmp_path / "dask"
    summary = hr.run(cfg_for(url, tokens, **{"harvest.workers": 2}), progress=False)
    assert summary["units"] == 4 and summary["n_tokens"] == tokens
    c = cf.open_cache(str(url))
    pids = {s.meta["writer"]["pid"] for s in c.segments}
    assert len(c.segments) == 4 and len(pids) == 2 and os.getpid() not in pids
    assert_same_rows(local, url)
    # the workers write; this process commits in plan order, whichever worker finished first
    assert [s.meta["unit"] for s in c.segments] == [s.meta["unit"] for s in cf.open_cache(str(local)).segments]
    again = tmp_path / "dask2"
    hr.run(cfg_for(again, tokens, **{"harvest.workers": 2}), progress=False)
    assert cf.open_cache(str(again)).fingerprint == c.fingerprint


def test_two_writer_threads_commit_in_plan_order_and_give_identical_caches(tmp_path):
    tokens = 64 * 24  # 6 units over 2 writer threads
    caches = []
    for name in ("a", "b"):
        hr.run(cfg_for(tmp_path / name, tokens, **{"harvest.writer_threads": 2}), progress=False)
        caches.append(cf.open_cache(str(tmp_path / name)))
    a, b = caches
    units = [s.meta["unit"] for s in a.segments]
    assert (
        units == sorted(units, key=lambda u: int(u.split(":")[1].split("-")[0])) == [s.meta["unit"] for s in b.segments]
    )
    assert a.fingerprint == b.fingerprint and np.array_equal(a.tokens[:], b.tokens[:])


def test_an_existing_scheduler_runs_the_units(tmp_path):
    from dask.distributed import LocalCluster

    tokens = 64 * 8  # 2 units
    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, dashboard_address=None) as cluster:
        summary = hr.run(
            cfg_for(tmp_path / "sched", tokens, **{"harvest.scheduler": cluster.scheduler_address}), progress=False
        )
    assert summary["units"] == 2 and summary["n_tokens"] == tokens
    local = tmp_path / "local"
    hr.run(cfg_for(local, tokens), progress=False)
    assert_same_rows(local, tmp_path / "sched")


def test_a_later_unit_that_finishes_first_still_commits_after_the_earlier_one(tmp_path, monkeypatch):
    """Force the race: unit 0's commit is held until unit 1 is ready to commit, so without the
    plan-order turn unit 1 would take the first commit number."""
    from cache_format.write import SegmentWriter

    first_unit: list[str] = []
    second_ready = threading.Event()
    original = SegmentWriter.commit

    def commit(self):
        unit = self.meta.get("unit")
        if not first_unit:
            first_unit.append(unit)
        if unit == first_unit[0]:
            assert second_ready.wait(60), "the second unit never reached its commit"
            time.sleep(0.3)  # ample time for an unordered commit of the second unit to land first
        else:
            second_ready.set()
        return original(self)

    monkeypatch.setattr(SegmentWriter, "commit", commit)
    url = tmp_path / "raced"
    hr.run(cfg_for(url, 64 * 8, **{"harvest.writer_threads": 2}), progress=False)  # 2 units, one per thread
    units = [s.meta["unit"] for s in cf.open_cache(str(url)).segments]
    assert units[0] == first_unit[0] and len(units) == 2
    assert units == sorted(units, key=lambda u: int(u.split(":")[1].split("-")[0]))


@dataclasses.dataclass
class HoldFirstUnit(Fault):
    """A store hook that never fires: it holds the first unit's segment (seq_id 0) after writing its
    sequences until the second unit's are written, so the coordinator sees the second result first."""

    root: str = ""
    second_written: threading.Event = dataclasses.field(default_factory=threading.Event)

    def hit(self, key: str, when: str) -> bool:
        if when == "after" and key.endswith("/sequences.parquet"):
            seq_ids = pq.read_table(os.path.join(self.root, key), columns=["seq_id"]).column(0).to_pylist()
            if 0 in seq_ids:
                assert self.second_written.wait(60), "the second unit never wrote its sequences"
                time.sleep(0.3)  # ample time for the second unit's result to reach the coordinator first
            else:
                self.second_written.set()
        return False


def test_dask_units_that_finish_out_of_order_still_commit_in_plan_order(tmp_path):
    """The same race on the dask path: the coordinator sees the second unit's result first."""
    from dask.distributed import LocalCluster

    url = tmp_path / "raced"
    with (
        LocalCluster(n_workers=2, processes=False, threads_per_worker=1, dashboard_address=None) as cluster,
        armed(HoldFirstUnit(root=str(url))),
    ):
        hr.run(cfg_for(url, 64 * 8, **{"harvest.scheduler": cluster.scheduler_address}), progress=False)
    units = [s.meta["unit"] for s in cf.open_cache(str(url)).segments]
    assert len(units) == 2 and units == sorted(units, key=lambda u: int(u.split(":")[1].split("-")[0]))
    # two workers in one process share one hooked model: captures take turns, rows are not mixed
    hr.run(cfg_for(tmp_path / "local", 64 * 8), progress=False)
    assert_same_rows(tmp_path / "local", url)
