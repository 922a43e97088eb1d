"""`import` (cache_format/importer.py): an activation dump becomes a cache; the same import again is
a no-op that says so, even after a crash just after its commit; `--again` appends a second copy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import cache_format as cf
from cache_format import ops


def test_import_safetensors_with_labels(run, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    acts = {"acts_L11": torch.randn(50, 8, generator=g).half(), "acts_L31": torch.randn(50, 8, generator=g).half()}
    save_file(acts, tmp_path / "activations.safetensors")
    labels = np.arange(50) % 3 == 0
    np.save(tmp_path / "labels.npy", labels)
    code, out, err = run(
        "import",
        tmp_path / "activations.safetensors",
        "--to",
        tmp_path / "c",
        "--labels",
        tmp_path / "labels.npy",
        "--seq-len",
        "20",
        "--model",
        "Qwen/Qwen3.6-27B",
    )
    assert code == 0, err
    assert "float16 → bfloat16" in out and "made up" in out
    c = cf.open_cache(tmp_path / "c")
    assert c.layers == [11, 31] and c.n_tokens == 50
    assert torch.equal(c.residuals(11)[:], acts["acts_L11"].to(torch.bfloat16))
    assert np.array_equal(c.labels[:], labels.astype(np.int8))
    assert np.array_equal(c.seq_ids[:], np.arange(50) // 20) and np.array_equal(c.positions[:25], np.r_[0:20, 0:5])
    assert c.segments[0].meta["import"]["lossless"] is False and c.meta["model"]["name_or_path"] == "Qwen/Qwen3.6-27B"
    np.save(tmp_path / "resid.npy", np.ones((7, 8), np.float32))
    code, out, err = run("import", tmp_path / "resid.npy", "--layer", "11", "--to", tmp_path / "c")
    assert code == 2 and "residuals must cover exactly layers [11, 31]" in err


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
