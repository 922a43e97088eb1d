"""Published caches over HTTP, including a faulty server (cache_format/stores/http.py)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file
from support import FAULTS, everything, same_cache, write_cache

import cache_format as cf
from cache_format import ops
from cache_format.stores import Location
from cache_format.sync import sync


def test_http_read_of_published_cache_matches_local(tmp_path, http_serve, make_cache):
    url, data = make_cache(str(tmp_path / "srv" / "c"), segments=(30, 17))
    local = cf.open_cache(url)
    with pytest.raises(cf.CacheError, match="publish"):
        cf.open_cache(http_serve(tmp_path / "srv") + "/c")
    ops.publish(Location(url))
    base = http_serve(tmp_path / "srv")
    c = cf.open_cache(f"{base}/c")
    assert c.fingerprint == local.fingerprint and c.n_tokens == 47 and c.layers == [1, 3]
    for L in c.layers:
        assert np.array_equal(c.residuals(L).numpy().view(np.uint16), local.residuals(L).numpy().view(np.uint16))
        assert np.array_equal(c.read_chunk(L, 4).view(np.uint16), local.read_chunk(L, 4).view(np.uint16))
    assert np.array_equal(c.seq_ids[:], data["rows"]["seq_ids"])
    assert c.sequences().equals(local.sequences())
    assert c.stats(1)["count"] == 47
    n, bad = ops.verify(c)
    assert bad == [] and n > 0
    with pytest.raises(cf.UserError, match="read-only"):
        cf.open_cache(f"{base}/c", mode="a")
    # An HTTP mirror can be pulled with sync.
    sync(f"{base}/c", str(tmp_path / "copy"))
    assert cf.open_cache(tmp_path / "copy").fingerprint == local.fingerprint


def test_http_transient_errors_are_retried(tmp_path, http_serve, make_cache):
    url, data = make_cache(str(tmp_path / "srv" / "c"))
    ops.publish(Location(url))
    c = cf.open_cache(http_serve(tmp_path / "srv", fail_first=2) + "/c")  # ACTCACHE_RETRIES=2 in conftest
    assert np.array_equal(c.tokens[:], data["rows"]["tokens"])


def test_every_read_over_a_faulty_server_matches_local(tmp_path, http_serve):
    url = str(tmp_path / "c")
    write_cache(url, segments=(40, 25, 9), chunk_tokens=8, tokenizer_files={"tokenizer.json": b'{"x": 1}'})
    ops.publish(Location(url))
    base = http_serve(tmp_path, faults=FAULTS)
    remote = cf.open_cache(f"{base}/c")
    same_cache(everything(cf.open_cache(url)), everything(remote))
    assert all(http_serve.injected.get(k, 0) >= 3 for k in FAULTS), http_serve.injected
    assert ops.verify(remote)[1] == []


@pytest.mark.slow
def test_train_run_over_a_faulty_server_gives_the_local_weights(tmp_path, http_serve):
    from planted_data import write_planted

    from train.cli import cli

    url = str(tmp_path / "c")
    write_planted(url, layers=(2,))
    ops.publish(Location(url))
    base = http_serve(tmp_path, faults=FAULTS)
    fast = [
        "--profile",
        "tiny",
        "--no-progress",
        "--set",
        "train.d_sae=64",
        "--set",
        "train.k=4",
        "--set",
        "train.batch_size=256",
        "--set",
        "train.training_tokens=4096",
        "--set",
        "train.eval_tokens=1024",
        "--set",
        "train.geometric_median_samples=512",
        "--set",
        "train.shuffle_buffer_tokens=4096",
        "--set",
        "train.checkpoint_every_tokens=2048",
        "--set",
        "train.eval_every_tokens=2048",
    ]
    weights = []
    for src, out in ((url, tmp_path / "local"), (f"{base}/c", tmp_path / "http")):
        r = CliRunner().invoke(cli, ["run", *fast, "--cache", src, "--out", str(out)], catch_exceptions=True)
        assert r.exit_code == 0, r.output + repr(r.exception)
        (sae,) = [p for p in out.iterdir() if (p / "sae_weights.safetensors").exists()]
        weights.append(load_file(str(sae / "sae_weights.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
    assert sum(http_serve.injected.values()) > 10
