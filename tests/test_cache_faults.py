"""Short reads, truncated bodies, dropped connections, 500s and flipped bytes over HTTP: retried
with backoff (or re-read once after a failed check), so reads and `train run` give what local does."""

from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

import cache_format as cf
from cache_format import integrity, ops
from cache_format.stores import Location
from support import s3_options, write_cache

FAULTS = ("500", "drop", "truncate", "short", "flip")


def _everything(c):
    out = {"tokens": c.tokens[:], "seq_ids": c.seq_ids[:], "labels": c.labels[:], "roles": c.roles[:],
           "positions": c.positions[:], "fp": c.fingerprint, "seqs": c.sequences().to_pylist(),
           "tok": c.tokenizer_files}
    for L in c.layers:
        out[f"res{L}"] = c.residuals(L).numpy().view(np.uint16)
        out[f"chunks{L}"] = [c.read_chunk(L, i).view(np.uint16) for i in range(c.n_chunks)]
        out[f"stats{L}"] = c.stats(L)["mean"]
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], list) and a[k] and isinstance(a[k][0], np.ndarray):
            assert all(np.array_equal(x, y) for x, y in zip(a[k], b[k])), k
        elif isinstance(a[k], np.ndarray):
            assert np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_every_read_over_a_faulty_server_matches_local(tmp_path, http_serve):
    url = str(tmp_path / "c")
    write_cache(url, segments=(40, 25, 9), chunk_tokens=8, tokenizer_files={"tokenizer.json": b'{"x": 1}'})
    ops.publish(Location(url))
    base = http_serve(tmp_path, faults=FAULTS)
    remote = cf.open_cache(f"{base}/c")
    _same(_everything(cf.open_cache(url)), _everything(remote))
    assert all(http_serve.injected.get(k, 0) >= 3 for k in FAULTS), http_serve.injected
    assert ops.verify(remote)[1] == []


def test_a_byte_flipped_on_the_server_fails_in_one_line_after_one_re_read(tmp_path, http_serve):
    url = str(tmp_path / "c")
    write_cache(url, segments=(40,), chunk_tokens=8)
    ops.publish(Location(url))
    c = cf.open_cache(url)
    e = c._segs[0].layers[3]
    path = os.path.join(url, e["array"], "c", "0", "0")
    raw = bytearray(open(path, "rb").read())
    raw[20] ^= 1
    open(path, "wb").write(bytes(raw))
    remote = cf.open_cache(f"{http_serve(tmp_path)}/c")
    with pytest.raises(integrity.IntegrityError) as err:
        remote.residuals(3)[:]
    assert f"{e['array']}/c/0/0: inner chunk 0 does not match its digest after re-reading it" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_train_run_over_a_faulty_server_gives_the_local_weights(tmp_path, http_serve):
    from test_train_data import write_planted
    from train.cli import cli

    url = str(tmp_path / "c")
    write_planted(url, layers=(2,))
    ops.publish(Location(url))
    base = http_serve(tmp_path, faults=FAULTS)
    fast = ["--profile", "tiny", "--no-progress", "--set", "train.d_sae=64", "--set", "train.k=4",
            "--set", "train.batch_size=256", "--set", "train.training_tokens=4096", "--set", "train.eval_tokens=1024",
            "--set", "train.geometric_median_samples=512", "--set", "train.shuffle_buffer_tokens=4096",
            "--set", "train.checkpoint_every_tokens=2048", "--set", "train.eval_every_tokens=2048"]
    weights = []
    for src, out in ((url, tmp_path / "local"), (f"{base}/c", tmp_path / "http")):
        r = CliRunner().invoke(cli, ["run", *fast, "--cache", src, "--out", str(out)], catch_exceptions=True)
        assert r.exit_code == 0, r.output + repr(r.exception)
        (sae,) = [p for p in out.iterdir() if (p / "sae_weights.safetensors").exists()]
        weights.append(load_file(str(sae / "sae_weights.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
    assert sum(http_serve.injected.values()) > 10


def test_every_read_over_a_faulty_s3_matches_local(tmp_path, s3_bucket, s3, fault_proxy):
    url, opts = s3_bucket
    local = str(tmp_path / "c")
    write_cache(local, segments=(40, 25), chunk_tokens=8)
    ops.sync(local, f"{url}/c", None, opts)
    flaky = s3_options(fault_proxy(s3, FAULTS))
    remote = cf.open_cache(f"{url}/c", storage_options=flaky)
    _same(_everything(cf.open_cache(local)), _everything(remote))
    assert ops.verify(remote)[1] == [] and sum(fault_proxy.injected.values()) >= 20, fault_proxy.injected


def test_sync_from_a_faulty_server_retries_and_copies_exactly(tmp_path, http_serve):
    url = str(tmp_path / "c")
    write_cache(url, segments=(40, 25), chunk_tokens=8, tokenizer_files={"tokenizer.json": b'{"x": 1}'})
    ops.publish(Location(url))
    base = http_serve(tmp_path, faults=FAULTS)
    dst = str(tmp_path / "copy")
    got = ops.sync(f"{base}/c", dst)
    assert got["segments"] == 2 and http_serve.injected
    _same(_everything(cf.open_cache(url)), _everything(cf.open_cache(dst)))
    assert not [p for p in Location(dst).walk("segments") if p.key.endswith("/.lease")]  # released after each copy
