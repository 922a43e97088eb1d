"""S3 (moto on loopback) and fsspec reads: retries, conditional puts, clear errors (cache_format/stores/fsspec.py)."""

from __future__ import annotations

import numpy as np
import pytest
from support import FAULTS, everything, s3_options, same_cache, write_cache

import cache_format as cf
from cache_format import ops
from cache_format.layout import BF16
from cache_format.stores import Location
from cache_format.sync import sync


def test_s3_write_read_append_and_concurrent_commit_numbers(s3_bucket):
    url, opts = s3_bucket
    data = write_cache(f"{url}/c", storage_options=opts)
    c = cf.open_cache(f"{url}/c", storage_options=opts)
    assert c.n_tokens == 65 and c.layers == [1, 3]
    assert np.array_equal(c.residuals(3).numpy().view(np.uint16), data["residuals"][3].view(np.uint16))
    assert np.array_equal(c.labels[:], data["rows"]["labels"])
    # The conditional put refuses a taken commit number; listings are never stale.
    loc = Location(f"{url}/c", opts)
    assert not loc.create_exclusive("commits/0000000001.json", b"{}")
    w = cf.open_cache(f"{url}/c", mode="a", storage_options=opts)
    with w.segment() as seg:
        seg.append(
            residuals={1: np.ones((3, 16), BF16), 3: np.ones((3, 16), BF16)},
            tokens=np.arange(3),
            seq_ids=np.arange(3) + 1000,  # new sequences: rows already held would be duplicates
            positions=np.arange(3),
        )
    assert c.refresh().n_tokens == 68 and c.segments[-1].commit == "0000000003.json"
    with pytest.raises(cf.UserError, match="already holds a cache"):
        cf.create_cache(f"{url}/c", d_model=16, layers=[1], storage_options=opts)
    n, bad = ops.verify(c)
    assert n > 10 and bad == []
    # gc on S3: an orphan of a crashed writer goes once past the grace period, committed data stays.
    loc.write("segments/20200101T000000-0123456789ab/resid_post/1/c/0/0", b"orphan")
    assert ops.gc(loc, older_than_s=3600) == []
    assert ops.gc(loc, older_than_s=0, force=True) == ["segments/20200101T000000-0123456789ab/resid_post/1/c/0/0"]
    assert ops.verify(c.refresh())[1] == [] and c.n_tokens == 68


def test_unreachable_endpoints_give_a_clear_remote_error(tmp_path, make_cache):
    from support import free_port

    port = free_port()
    with pytest.raises(cf.RemoteError, match="after 3 attempts.*reachable"):
        cf.open_cache(f"http://127.0.0.1:{port}/c")
    opts = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "x",
        "secret": "y",
        "skip_instance_cache": True,
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
    }
    with pytest.raises(cf.RemoteError, match="reachable"):
        cf.open_cache("s3://bucket/c", storage_options=opts)


def test_s3_missing_bucket_is_a_clear_error(s3):
    from support import s3_options

    with pytest.raises(cf.UserError, match="cannot write"):
        cf.create_cache("s3://no-such-bucket-here/c", d_model=4, layers=[0], storage_options=s3_options(s3))


def test_server_ignoring_range_is_reported_not_misread(tmp_path, make_cache):
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    url, _ = make_cache(str(tmp_path / "srv" / "c"))
    ops.publish(Location(url))
    srv = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(tmp_path / "srv")))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        c = cf.open_cache(f"http://127.0.0.1:{srv.server_address[1]}/c")  # whole-object reads work
        with pytest.raises(cf.RemoteError, match="honours HTTP Range"):
            c.residuals(1)[0:4]
    finally:
        srv.shutdown()
        srv.server_close()


def test_concurrent_s3_writers_get_dense_unique_commits(s3_bucket):
    from concurrent.futures import ThreadPoolExecutor

    url, opts = s3_bucket
    cf.create_cache(f"{url}/c", d_model=8, layers=[0], chunk_tokens=4, storage_options=opts)

    def writer(wid):
        w = cf.open_cache(f"{url}/c", mode="a", storage_options=opts)
        for i in range(2):
            with w.segment(meta={"w": wid, "i": i}) as seg:
                seg.append(
                    residuals={0: np.full((5, 8), wid, BF16)},
                    tokens=np.full(5, wid * 10 + i),
                    seq_ids=np.arange(5),
                    positions=np.arange(5),
                )

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(writer, range(4)))
    c = cf.open_cache(f"{url}/c", storage_options=opts)
    assert [s.commit for s in c.segments] == [f"{i:010d}.json" for i in range(1, 9)]
    assert sorted(set(c.tokens[:].tolist())) == sorted(w * 10 + i for w in range(4) for i in range(2))
    assert c.n_tokens == 40


def test_every_read_over_a_faulty_s3_matches_local(tmp_path, s3_bucket, s3, fault_proxy):
    url, opts = s3_bucket
    local = str(tmp_path / "c")
    write_cache(local, segments=(40, 25), chunk_tokens=8)
    sync(local, f"{url}/c", None, opts)
    flaky = s3_options(fault_proxy(s3, FAULTS))
    remote = cf.open_cache(f"{url}/c", storage_options=flaky)
    same_cache(everything(cf.open_cache(local)), everything(remote))
    assert ops.verify(remote)[1] == [] and sum(fault_proxy.injected.values()) >= 20, fault_proxy.injected
