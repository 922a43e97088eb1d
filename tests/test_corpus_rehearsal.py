"""The 001 card's corpus scale rehearsed on the tiny profile: a 50M-token run commits its
first unit early, in bounded planning memory, and a resume restarts where the streams stood."""

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

import cache_format as cf
from harvest import run as hr
from harvest.config import load_config
from harvest.tiny import write_corpus

BIG = 50_000_000
SMALL = 1_000_000
GIB = 2**30


def settings(corpus_path) -> list[str]:
    return [
        "harvest.segment_sequences=256",
        "harvest.batch_size=64",
        f'corpus.sources=[{{name="gen", path="{corpus_path}", weight=0.9}}, '
        '{name="tiny", path="builtin:tiny", weight=0.1}]',
    ]


def command(url, tokens, sets) -> list[str]:
    return [
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
        "0",
        "--tokens",
        str(tokens),
        "--quiet",
        *sum((["--set", s] for s in sets), []),
    ]


def committed(url) -> int:
    try:
        return len(cf.open_cache(str(url)).segments)
    except cf.CacheError:
        return 0


def watch(proc, until, poll=0.1) -> int:
    """Peak RSS of `proc` (bytes) while `until()` is false and it runs."""
    p, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None and not until():
        try:
            peak = max(peak, p.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(poll)
    return peak


def sorted_rows(url):
    c = cf.open_cache(str(url))
    sid, pos, tok = (np.asarray(x[:]) for x in (c.seq_ids, c.positions, c.tokens))
    order = np.lexsort((pos, sid))
    keys = np.stack([sid[order], pos[order]], 1)
    assert not (np.diff(keys, axis=0) == 0).all(1).any(), "duplicate rows"
    return c, keys, tok[order], c.residuals(0)[:].float()[order]


@pytest.mark.slow
def test_a_50m_token_corpus_run_commits_early_in_bounded_memory_and_resumes_exactly(tmp_path):
    corpus = tmp_path / "gen.txt"
    assert write_corpus(corpus, BIG) >= BIG
    sets = settings(corpus)

    # the model alone (and its one-off build): a one-sequence run is the memory baseline
    ref = subprocess.Popen(command(tmp_path / "ref", 128, sets), stderr=subprocess.PIPE)
    base = watch(ref, lambda: False)
    assert ref.wait() == 0, ref.stderr.read().decode()

    url = tmp_path / "big"
    t0 = time.time()
    proc = subprocess.Popen(command(url, BIG, sets), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        peak = watch(proc, lambda: committed(url) > 0 or time.time() - t0 > 120, poll=0.2)
        first_commit = time.time() - t0
        assert proc.poll() is None, proc.stderr.read().decode()
        assert first_commit < 60, f"first segment committed after {first_commit:.0f} s"
        t1 = time.time()
        peak = max(peak, watch(proc, lambda: time.time() - t1 > 4))  # planning keeps going beside capture
        assert peak - base < GIB, f"planning took {(peak - base) / 2**20:.0f} MiB above the model"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    print(
        f"\n50M tokens: first commit {first_commit:.1f} s, RSS {peak / 2**20:.0f} MiB "
        f"({(peak - base) / 2**20:+.0f} MiB over the one-sequence run)"
    )
    done = cf.open_cache(str(url)).n_tokens
    assert done > 0 and done % (256 * 128) == 0  # whole units only

    target = max(SMALL, done + 256 * 128)  # a fast machine may commit past SMALL before the kill: resume further
    cfg = lambda u: load_config(
        None,
        "tiny",
        sets,
        **{
            "harvest.cache": str(u),
            "harvest.source": "corpus",  # noqa: E731
            "harvest.layers": [0],
            "corpus.tokens": target,
        },
    )
    resumed = hr.run(cfg(url), progress=False)
    assert resumed["sequences_done_before"] * 128 == done
    assert resumed["planned_from_sequence"] >= 256  # restarted from a unit's recorded state, not from 0
    hr.run(cfg(tmp_path / "whole"), progress=False)
    ca, ka, ta, ra = sorted_rows(url)
    cb, kb, tb, rb = sorted_rows(tmp_path / "whole")
    assert ca.n_tokens == cb.n_tokens == math.ceil(target / 128) * 128
    assert np.array_equal(ka, kb) and np.array_equal(ta, tb)
    rel = (ra - rb).norm(dim=1) / ra.norm(dim=1)
    assert rel.max() < 0.02
