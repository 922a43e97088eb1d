"""`import` is idempotent: the same import again is a no-op that says so, even after a crash just
after its commit; `--again` appends a second copy on purpose (cache_format/importer.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

import cache_format as cf
from cache_format import ops

ROOT = Path(__file__).resolve().parents[2]


def _dump(tmp_path, rows=48):
    np.save(tmp_path / "resid.npy", np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32))
    return tmp_path / "resid.npy"


def test_the_same_import_twice_is_a_no_op_that_says_so(run, tmp_path):
    dump, url = _dump(tmp_path), tmp_path / "c"
    code, out, err = run("import", dump, "--layer", "3", "--to", url, "--seq-len", "16")
    assert code == 0, err
    fp = cf.open_cache(url).fingerprint
    code, out, err = run("import", dump, "--layer", "3", "--to", url, "--seq-len", "16")
    assert code == 0 and out.startswith("already imported") and "--again" in out
    c = cf.open_cache(url)
    assert c.n_tokens == 48 and c.fingerprint == fp
    code, out, err = run(
        "import", dump, "--layer", "3", "--to", url, "--seq-len", "12"
    )  # other options: another import
    assert code == 0 and "imported 48 rows" in out and cf.open_cache(url).n_tokens == 96


def test_again_appends_a_second_copy_numbered_after_the_first(run, tmp_path):
    dump, url = _dump(tmp_path), tmp_path / "c"
    run("import", dump, "--layer", "3", "--to", url, "--seq-len", "16")
    code, out, err = run("import", dump, "--layer", "3", "--to", url, "--seq-len", "16", "--again")
    assert code == 0 and "imported 48 rows" in out, err
    c = cf.open_cache(url)
    assert c.n_tokens == 96 and [s.seq_ranges for s in c.segments] == [[[0, 3]], [[3, 6]]]
    assert ops.verify(c)[1] == []  # two copies of the data, no (seq_id, position) twice
    assert c.residuals(3)[:48].equal(c.residuals(3)[48:])


def test_again_with_given_seq_ids_is_refused_in_one_line(run, tmp_path):
    dump, url = _dump(tmp_path), tmp_path / "c"
    np.save(tmp_path / "sid.npy", np.arange(48) // 8)
    run("import", dump, "--layer", "3", "--to", url, "--seq-ids", tmp_path / "sid.npy")
    code, out, err = run("import", dump, "--layer", "3", "--to", url, "--seq-ids", tmp_path / "sid.npy", "--again")
    assert code == 2 and err.count("\n") == 1 and "already in segment" in err and "Leave out --seq-ids" in err
    assert cf.open_cache(url).n_tokens == 48


def test_a_rerun_after_a_crash_just_after_the_commit_does_not_duplicate(tmp_path):
    dump, url = _dump(tmp_path), tmp_path / "c"
    cmd = [sys.executable, "-m", "cache_format", "import", str(dump), "--layer", "3", "--to", str(url)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    killed = subprocess.run(  # SIGKILL the moment its commit record has landed
        cmd, env=dict(env, ACTCACHE_FAULT="kill:after:commits/0000000001.json"), capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL and not killed.stdout
    assert cf.open_cache(url).n_tokens == 48
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.startswith("already imported"), again.stderr
    assert cf.open_cache(url).n_tokens == 48
