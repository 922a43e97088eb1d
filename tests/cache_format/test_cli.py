"""`python -m cache_format ...`: in-process through run_cli, plus one real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import cache_format as cf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def test_gc_retract_publish_sync(run, make_cache, tmp_path):
    url, data = make_cache(segments=(10, 20, 30))
    c = cf.open_cache(url)
    os.makedirs(f"{url}/segments/20200101T000000-deadbeef0000/resid_post/1/c/0")
    open(f"{url}/segments/20200101T000000-deadbeef0000/resid_post/1/c/0/0", "wb").write(b"x" * 100)
    code, out, _ = run("gc", url, "--older-than", "1h", "--dry-run")
    assert code == 0 and "would remove 0 objects" in out  # just written: inside the grace period
    code, out, _ = run("gc", url, "--older-than", "0s", "--force")
    assert (
        code == 0 and "removed 1 objects" in out and not os.path.exists(f"{url}/segments/20200101T000000-deadbeef0000")
    )
    code, out, _ = run("retract", url, c.segments[1].id, "--reason", "bad")
    c2 = cf.open_cache(url)
    assert code == 0 and c2.n_tokens == 40 and c2.fingerprint in out
    code, out, _ = run("gc", url, "--older-than", "24h", "--retracted")
    assert code == 0 and not os.path.exists(f"{url}/segments/{c.segments[1].id}/resid_post")
    assert run("verify", url)[0] == 0
    code, out, _ = run("publish", url)
    assert code == 0 and json.load(open(f"{url}/index.json"))["commits"][-1]["record"]["kind"] == "retract"
    code, out, _ = run("sync", url, tmp_path / "copy")
    assert code == 0 and "copied 2 segments" in out and cf.open_cache(tmp_path / "copy").fingerprint == c2.fingerprint


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


@pytest.mark.parametrize(
    "args,needle",
    [
        (["info", "{tmp}"], "is not a cache"),
        (["verify", "{tmp}/nothing"], "is not a cache"),
        (["gc", "{cache}", "--older-than", "soon"], "--older-than 'soon'"),
        (["retract", "{cache}", "nope"], "is not a live segment"),
        (["stats", "{cache}", "--layers", "9"], "layer 9 is not in the cache"),
        (["info", "{cache}", "-o", "{{bad"], "not valid JSON"),
    ],
)
def test_one_line_errors(run, make_cache, tmp_path, args, needle):
    url, _ = make_cache(segments=(5,))
    code, out, err = run(*[a.format(tmp=tmp_path, cache=url) for a in args])
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_subprocess_error_is_one_line_and_debug_shows_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run(
        [sys.executable, "-m", "cache_format", "info", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "is not a cache" in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "cache_format", "info", str(tmp_path), "--debug"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode != 0 and "Traceback" in p.stderr
