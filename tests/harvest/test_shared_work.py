"""Several `harvest run` processes on one cache share the work and commit each unit once
(harvest/run.py, cache_format/concurrency.py): no (seq_id, position) twice, no rollout
generated twice, no layer backfilled twice, and the rows and fingerprint of one uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import cache_format as cf
from cache_format import concurrency, log, ops
from cache_format.stores import Location
from harvest import run as hr
from harvest.config import load_config
from harvest.rollouts import load_all_rollouts, rollout_tag, rollouts_dir

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ["corpus.seq_len=64", "harvest.segment_sequences=4", "harvest.batch_size=4", "harvest.chunk_tokens=128"]
ROLLOUTS = ["supergpqa.questions_per_unit=2", "supergpqa.max_new_tokens=12", "supergpqa.generate_batch_size=2"]
SAME = ("n_tokens", "layers", "segments", "fingerprint", "outcomes")  # what every process reports alike


def _cfg(url, source, layers, n, overrides):
    amount = {"corpus.tokens": n} if source == "corpus" else {"supergpqa.questions": n}
    return load_config(
        None,
        "tiny",
        overrides,
        **{"harvest.cache": str(url), "harvest.source": source, "harvest.layers": layers, **amount},
    )


def _at_once(url, source, layers, n, overrides, processes):
    """`processes` identical `harvest run` commands started together; their JSON summaries."""
    amount = ["--tokens", str(n)] if source == "corpus" else ["--questions", str(n)]
    cmd = [sys.executable, "-m", "harvest", "run", "--profile", "tiny", "--source", source, "--cache", str(url)]
    cmd += ["--layers", ",".join(map(str, layers)), *amount, "--quiet", "--json"]
    cmd += sum((["--set", o] for o in overrides), [])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    return [json.loads(out) for out, _ in outs]


def _assert_one_run(url, ref, summaries):
    """No duplicates, and the rows and fingerprint of the uninterrupted reference run."""
    c, r = cf.open_cache(str(url)), cf.open_cache(str(ref))
    assert ops.verify(c)[1] == []  # checksums, and no (seq_id, position) or sequence record twice
    keys = lambda x: sorted(zip(np.asarray(x.seq_ids[:]).tolist(), np.asarray(x.positions[:]).tolist()))  # noqa: E731
    assert keys(c) == keys(r) and c.fingerprint == r.fingerprint
    first = {k: summaries[0].get(k) for k in SAME}
    assert all({k: s.get(k) for k in SAME} == first for s in summaries)  # one outcome, told alike
    assert first["fingerprint"] == r.fingerprint
    assert not [o.key for o in Location(str(url)).walk(concurrency.CLAIMS)]  # every claim released


def test_two_harvests_at_once_on_a_new_cache(tmp_path):
    tokens = 64 * 32  # 8 units
    ref = tmp_path / "ref"
    hr.run(_cfg(ref, "corpus", [1], tokens, CORPUS), progress=False)
    url = tmp_path / "shared"
    summaries = _at_once(url, "corpus", [1], tokens, CORPUS, 2)
    _assert_one_run(url, ref, summaries)
    assert sum(s["units_run_here"] for s in summaries) == 8  # each unit computed once
    assert any(s["created"] for s in summaries)  # one created it (the other may have finished creating it)


@pytest.mark.slow
def test_three_harvests_at_once_on_a_seeded_cache_add_a_layer_and_rows_once(tmp_path):
    seed = tmp_path / "seed"
    hr.run(_cfg(seed, "corpus", [1], 64 * 16, CORPUS), progress=False)  # 4 units, layer 1 only
    ref, url = tmp_path / "ref", tmp_path / "shared"
    shutil.copytree(seed, ref)
    shutil.copytree(seed, url)
    hr.run(_cfg(ref, "corpus", [1, 4], 64 * 40, CORPUS), progress=False)  # backfill layer 4, then 6 more units
    summaries = _at_once(url, "corpus", [1, 4], 64 * 40, CORPUS, 3)
    _assert_one_run(url, ref, summaries)
    assert sum(s["units_run_here"] for s in summaries) == 6
    records = log.load_records(Location(str(url)), {}).values()
    backfills = Counter((r["segment"], r["layer"]) for r in records if r["kind"] == "layer")
    assert len(backfills) == 4 and set(backfills.values()) == {1}  # each seeded segment got layer 4 once
    assert sum(r["kind"] == "add_layer" for r in records) == 1


def _generated(url, cfg) -> Counter:
    """How often each seq_id was generated (the sidecars keep every generation, graded ones aside)."""
    loc = Location(rollouts_dir(str(url)))
    tag = rollout_tag(cfg)
    out = Counter()
    for o in loc.walk(f"{tag}/generated"):
        out.update(json.loads(line)["seq_id"] for line in loc.read(o.key).decode().splitlines() if line.strip())
    return out


@pytest.mark.slow
def test_three_rollout_harvests_at_once_on_a_new_cache_generate_each_rollout_once(tmp_path):
    questions = 12  # 6 units
    ref, url = tmp_path / "ref", tmp_path / "shared"
    cfg = _cfg(ref, "supergpqa", [1], questions, ROLLOUTS)
    hr.run(cfg, progress=False)
    summaries = _at_once(url, "supergpqa", [1], questions, ROLLOUTS, 3)
    _assert_one_run(url, ref, summaries)
    assert summaries[0]["outcomes"]["rollouts"] == questions
    assert _generated(url, cfg) == Counter(range(questions))  # every rollout generated exactly once
    assert len(load_all_rollouts(str(url), rollout_tag(cfg))) == questions


@pytest.mark.slow
def test_two_rollout_harvests_at_once_on_a_seeded_cache(tmp_path):
    seed, ref, url = tmp_path / "seed", tmp_path / "ref", tmp_path / "shared"
    cfg = _cfg(seed, "supergpqa", [1], 4, ROLLOUTS)
    hr.run(cfg, progress=False)
    for d in (ref, url):
        shutil.copytree(seed, d)
        shutil.copytree(rollouts_dir(str(seed)), rollouts_dir(str(d)))
    hr.run(_cfg(ref, "supergpqa", [1], 10, ROLLOUTS), progress=False)
    summaries = _at_once(url, "supergpqa", [1], 10, ROLLOUTS, 2)
    _assert_one_run(url, ref, summaries)
    assert _generated(url, cfg) == Counter(range(10))
    assert sum(s["units_run_here"] for s in summaries) == 3


def _hold(loc, scope, name):
    """A claim held by "another process" (this test), renewed until released."""
    c = concurrency.Claims(loc, scope).take(name)
    assert c is not None
    return c


def test_a_unit_whose_claimant_died_is_taken_over(tmp_path):
    tokens = 64 * 16  # 4 units
    ref, url = tmp_path / "ref", tmp_path / "shared"
    hr.run(_cfg(ref, "corpus", [1], tokens, CORPUS), progress=False)
    hr.run(_cfg(url, "corpus", [1], 64 * 8, CORPUS), progress=False)  # units 0 and 1
    loc = Location(str(url))
    dead = _hold(loc, "harvest", "corpus:8-11")
    concurrency.KEEPER.release_key(loc, dead.key, delete=False)  # its process dies: the claim goes stale
    old = time.time() - concurrency.STALE_S - 5
    os.utime(loc.path(dead.key), (old, old))
    summary = hr.run(_cfg(url, "corpus", [1], tokens, CORPUS), progress=False)
    assert summary["units_run_here"] == 2 and cf.open_cache(str(url)).fingerprint == cf.open_cache(str(ref)).fingerprint


def test_a_unit_held_elsewhere_is_waited_for_and_taken_over_if_its_holder_gives_it_up(tmp_path):
    tokens = 64 * 16
    ref, url = tmp_path / "ref", tmp_path / "shared"
    hr.run(_cfg(ref, "corpus", [1], tokens, CORPUS), progress=False)
    hr.run(_cfg(url, "corpus", [1], 64 * 4, CORPUS), progress=False)  # unit 0 only: the cache exists
    held = _hold(Location(str(url)), "harvest", "corpus:4-7")  # a live "process" holds unit 1
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(hr.run(_cfg(url, "corpus", [1], tokens, CORPUS), progress=False)))
    t.start()
    deadline = time.time() + 120
    while len(cf.open_cache(str(url)).segments) < 3 and time.time() < deadline:  # units 0, 2, 3 committed
        time.sleep(0.1)
    time.sleep(0.5)
    assert t.is_alive()  # it waits for unit 1 rather than ending without it, or computing it twice
    held.release()  # its holder gives up without committing: the waiting run takes it over
    t.join(120)
    assert result["units_run_here"] == 3
    assert cf.open_cache(str(url)).fingerprint == cf.open_cache(str(ref)).fingerprint
