"""Caches on the Hugging Face Hub, read through a loopback stand-in for it (cache_format/stores/hub.py,
http.py's revision pinning, and the HTTP backend for resolve URLs; the stand-in is tests/hub_standin.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file
from support import everything, same_cache, write_cache

import cache_format as cf
from cache_format import ops
from cache_format.stores import Location
from cache_format.sync import sync


def _repo(tmp_path, name="repo", seed=0, layers=(1, 3)):
    """A published cache at `cache/` in a repo folder, as `hf upload-large-folder` would upload it."""
    url = str(tmp_path / name / "cache")
    write_cache(url, layers=layers, segments=(40, 25), seed=seed, tokenizer_files={"tokenizer.json": b'{"x": 1}'})
    ops.publish(Location(url))
    return url


def test_a_resolve_url_opens_pinned_to_a_commit_through_redirects_and_5xx(tmp_path, hub_serve):
    local = _repo(tmp_path)
    endpoint, hub = hub_serve(fail_every=5)
    first = hub.push("org/acts", tmp_path / "repo")
    remote = cf.open_cache(f"{endpoint}/datasets/org/acts/resolve/main/cache")
    assert remote.url == f"{endpoint}/datasets/org/acts/resolve/{first}/cache"  # main, pinned
    same_cache(everything(cf.open_cache(local)), everything(remote))
    assert ops.verify(remote)[1] == []
    assert hub.failed >= 3  # the occasional 503 was retried
    assert any(p.startswith("/storage/") for _, p in hub.log)  # read through the redirect
    # A push moves main; the open reader keeps its commit, a new one sees the push.
    newer = _repo(tmp_path, "repo2", seed=5)
    hub.push("org/acts", tmp_path / "repo2")
    assert np.array_equal(remote.refresh().tokens[:], cf.open_cache(local).tokens[:])
    again = cf.open_cache(f"{endpoint}/datasets/org/acts/resolve/main/cache")
    assert again.fingerprint == cf.open_cache(newer).fingerprint != remote.fingerprint
    pinned = cf.open_cache(f"{endpoint}/datasets/org/acts/resolve/{first}/cache")
    assert pinned.fingerprint == remote.fingerprint


def test_an_hf_url_opens_through_hffilesystem(tmp_path, hub_serve, monkeypatch):
    local = _repo(tmp_path)
    endpoint, hub = hub_serve(fail_every=40)
    sha = hub.push("org/acts", tmp_path / "repo")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    for url in (
        "hf://datasets/org/acts/cache",
        "hf://datasets/org/acts@main/cache",
        f"hf://datasets/org/acts@{sha}/cache",
    ):
        c = cf.open_cache(url)
        assert c.url == f"hf://datasets/org/acts@{sha}/cache"
    same_cache(everything(cf.open_cache(local)), everything(c))
    assert ops.verify(c)[1] == []
    assert set(hub.unserved) <= {"/api/agent-harnesses"}  # HfFileSystem asked for nothing the stand-in lacks
    with pytest.raises(cf.UserError, match="read-only"):
        cf.open_cache("hf://datasets/org/acts/cache", mode="a")


def test_info_verify_and_a_partial_sync_from_the_hub(tmp_path, hub_serve, monkeypatch, run):
    local = _repo(tmp_path)
    endpoint, hub = hub_serve()
    hub.push("org/acts", tmp_path / "repo")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    src = cf.open_cache(local)
    for i, url in enumerate((f"{endpoint}/datasets/org/acts/resolve/main/cache", "hf://datasets/org/acts/cache")):
        code, out, err = run("info", url)
        assert code == 0 and src.fingerprint in out, err
        code, out, err = run("verify", url)
        assert code == 0 and "ok:" in out, err
        dst = str(tmp_path / f"copy{i}")
        code, out, err = run("sync", url, dst, "--layers", "3")
        assert code == 0, err
        c = cf.open_cache(dst)
        assert c.layers == [3] and c.layer_fingerprint(3) == src.layer_fingerprint(3) and ops.verify(c)[1] == []
        assert c.copy_of["url"].endswith("/cache") and "main" not in c.copy_of["url"]  # the pinned commit


def test_a_missing_repo_or_revision_or_a_web_page_is_one_line(tmp_path, hub_serve, monkeypatch, run):
    _repo(tmp_path)
    endpoint, hub = hub_serve()
    hub.push("org/acts", tmp_path / "repo")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    html_endpoint, html_hub = hub_serve(html=True)
    html_hub.push("org/acts", tmp_path / "repo")
    dst = tmp_path / "never"
    cases = [
        (f"{endpoint}/datasets/org/nope/resolve/main/cache", "does not exist"),
        (f"{endpoint}/datasets/org/acts/resolve/v9/cache", "has no revision 'v9'"),
        ("hf://datasets/org/nope/cache", "does not exist"),
        ("hf://datasets/org/acts@v9/cache", "has no revision 'v9'"),
        (f"{html_endpoint}/datasets/org/acts/resolve/main/cache", "sent a web page"),
        ("hf://models/org/acts/cache", "hf://datasets/"),
    ]
    for url, phrase in cases:
        for args in (["info", url], ["sync", url, dst, "--layers", "1"]):
            code, out, err = run(*args)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], (args, err)
    assert not os.path.exists(dst)


@pytest.mark.slow
def test_train_run_from_a_partial_copy_on_the_hub_gives_the_sources_weights(tmp_path, hub_serve):
    from planted_data import write_planted

    from train.cli import cli

    src = str(tmp_path / "src")
    write_planted(src, layers=(2, 3))
    repo = tmp_path / "repo"
    sync(src, str(repo / "cache"), layers=[3])  # one layer of two
    ops.publish(Location(str(repo / "cache")))
    endpoint, hub = hub_serve(fail_every=50)
    hub.push("org/acts", repo)
    fast = [
        "--profile",
        "tiny",
        "--no-progress",
        *("--set", "train.d_sae=64", "--set", "train.k=4", "--set", "train.batch_size=256"),
        *("--set", "train.training_tokens=4096", "--set", "train.eval_tokens=1024"),
        *("--set", "train.geometric_median_samples=512", "--set", "train.shuffle_buffer_tokens=4096"),
        *("--set", "train.checkpoint_every_tokens=2048", "--set", "train.eval_every_tokens=2048"),
    ]
    weights = []
    for cache, layers, out in (
        (src, ["--layers", "3"], tmp_path / "local"),
        (f"{endpoint}/datasets/org/acts/resolve/main/cache", [], tmp_path / "hub"),
    ):
        r = CliRunner().invoke(cli, ["run", *fast, *layers, "--cache", cache, "--out", str(out)], catch_exceptions=True)
        assert r.exit_code == 0, r.output + repr(r.exception)
        (sae,) = [p for p in out.iterdir() if (p / "sae_weights.safetensors").exists()]
        weights.append(load_file(str(sae / "sae_weights.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
    assert hub.failed > 0
