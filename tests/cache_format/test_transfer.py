"""Objects copied in bounded memory, checked as they pass, resumed mid-object (cache_format/transfer.py)."""

from __future__ import annotations

import glob
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import s3fs
from support import everything, s3_options, same_cache, write_big_cache

import cache_format as cf
from cache_format import ops
from cache_format.atomic import PIECE
from cache_format.stores import Location
from cache_format.sync import sync
from cache_format.transfer import BLOCK

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sync_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "cache_format", "sync", *map(str, args)]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT)


def _wait_for(pred, proc, timeout=120):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "the copy never got there"
        time.sleep(0.05)


def _big_objects(c) -> dict[str, int]:
    return {k: v["size"] for s in c.log.segments for e in s.layers.values() for k, v in _objs(e).items()}


def _objs(e):
    return {f"{e['array']}/{k}": v for k, v in e["objects"].items() if v["size"] > BLOCK}


def test_a_killed_copy_to_disk_resumes_at_the_byte_where_it_stopped(tmp_path, http_serve):
    src = tmp_path / "srv" / "c"
    write_big_cache(str(src), shard_mib=24, layers=(1, 2))
    ops.publish(Location(str(src)))
    big = _big_objects(cf.open_cache(src))
    assert len(big) == 2
    dst = tmp_path / "copy"
    stalled = http_serve(tmp_path / "srv", stall_from=BLOCK)  # serves each object's first block, then hangs
    p = subprocess.Popen(_sync_cmd(f"{stalled}/c", dst), env=_env(), stderr=subprocess.DEVNULL)
    partials = lambda: glob.glob(f"{dst}/segments/**/.*.partial-*", recursive=True)  # noqa: E731
    try:
        _wait_for(lambda: len(partials()) == 2 and all(os.path.getsize(f) == BLOCK for f in partials()), p)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not cf.open_cache(dst).segments  # nothing committed: the kill left no visible trace
    base = http_serve(tmp_path / "srv")
    sync(f"{base}/c", str(dst))
    served = {k.split("/c/", 1)[1]: v for k, v in http_serve.served.items() if k.startswith("/c/")}
    for key, size in big.items():
        assert served[key] == size - BLOCK, (key, served[key])  # only the bytes after the partial file's
    assert not partials()
    same_cache(everything(cf.open_cache(src)), everything(cf.open_cache(dst)))
    assert ops.verify(cf.open_cache(dst))[1] == []


def test_an_object_that_landed_before_a_kill_is_not_copied_again(tmp_path):
    src, dst = tmp_path / "c", tmp_path / "copy"
    write_big_cache(str(src), shard_mib=24, layers=(1, 2))
    (key,) = [k for k in _big_objects(cf.open_cache(src)) if "/resid_post/1/" in k]
    env = dict(_env(), ACTCACHE_FAULT=f"kill:after:{key}")  # kill -9 once layer 1's shard is in place
    p = subprocess.run(_sync_cmd(src, dst), env=env, capture_output=True, timeout=300)
    assert p.returncode == -signal.SIGKILL and not cf.open_cache(dst).segments
    landed = os.stat(dst / key)
    sync(str(src), str(dst))
    again = os.stat(dst / key)
    assert (again.st_ino, again.st_mtime_ns) == (landed.st_ino, landed.st_mtime_ns)  # re-hashed, not re-copied
    assert ops.verify(cf.open_cache(dst))[1] == [] and cf.open_cache(dst).layers == [1, 2]


def test_a_killed_upload_to_s3_resumes_its_multipart_upload(tmp_path, s3, s3_bucket, fault_proxy):
    url, opts = s3_bucket
    src = tmp_path / "c"
    write_big_cache(str(src), shard_mib=20, layers=(1,))
    (size,) = _big_objects(cf.open_cache(src)).values()
    stalled = s3_options(fault_proxy(s3, stall_part=2))  # part 1 of each upload lands, part 2 hangs
    cmd = _sync_cmd(src, f"{url}/c", "--dst-options", json.dumps(stalled))
    p = subprocess.Popen(cmd, env=_env(), stderr=subprocess.DEVNULL)
    fs = s3fs.S3FileSystem(**opts)
    bucket = url.split("://")[1]

    def one_part_landed():
        ups = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
        return any(
            fs.call_s3("list_parts", Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts") for u in ups
        )

    try:
        _wait_for(one_part_landed, p)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    counted = s3_options(fault_proxy(s3))
    sync(str(src), f"{url}/c", None, counted)
    assert fault_proxy.state["part_bytes"] == size - BLOCK  # parts 2.. only: part 1 was kept
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
    dst = cf.open_cache(f"{url}/c", storage_options=opts)
    same_cache(everything(cf.open_cache(src)), everything(dst))
    assert ops.verify(dst)[1] == []


def test_a_byte_flipped_in_transit_mid_object_is_copied_again(tmp_path, http_serve):
    src = tmp_path / "srv" / "c"
    write_big_cache(str(src), shard_mib=20, layers=(1,))
    ops.publish(Location(str(src)))
    (key, size), *_ = _big_objects(cf.open_cache(src)).items()
    base = http_serve(tmp_path / "srv", faults=("flip",))  # the first answer to every request has a byte flipped
    sync(f"{base}/c", str(tmp_path / "copy"))
    assert http_serve.served[f"/c/{key}"] == 2 * size  # the checksum failed as the bytes passed: copied again
    same_cache(everything(cf.open_cache(src)), everything(cf.open_cache(tmp_path / "copy")))


@pytest.mark.parametrize("fault", ["500", "drop", "truncate", "short"])
def test_a_stream_that_breaks_mid_object_is_reopened_where_it_broke(tmp_path, http_serve, fault):
    src = tmp_path / "srv" / "c"
    write_big_cache(str(src), shard_mib=40, layers=(1,))
    ops.publish(Location(str(src)))
    (key, size), *_ = _big_objects(cf.open_cache(src)).items()
    base = http_serve(tmp_path / "srv", faults=(fault,))  # the first answer to every request fails so
    sync(f"{base}/c", str(tmp_path / "copy"))
    assert http_serve.injected[fault] >= 2
    # re-opened at the last whole block, never from the start: under 2 × the object's bytes
    assert http_serve.served[f"/c/{key}"] < 2 * size
    same_cache(everything(cf.open_cache(src)), everything(cf.open_cache(tmp_path / "copy")))


def test_a_copy_reaches_the_disk_in_pieces_of_at_most_a_write_piece(tmp_path, monkeypatch):
    # Larger writes land in 2 MiB page-cache folios, which a VM handing free memory back to its
    # host must fault in afresh: 5-10x the system time per byte there (cache_format/atomic.py).
    src = tmp_path / "c"
    write_big_cache(str(src), shard_mib=20, layers=(1,))
    big = _big_objects(cf.open_cache(src))
    assert big  # an object copied block by block through a partial file
    sizes = []
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: sizes.append(len(data)) or real(fd, data, offset))
    sync(str(src), str(tmp_path / "copy"))
    assert sum(sizes) >= sum(big.values()) and max(sizes) <= PIECE
    same_cache(everything(cf.open_cache(src)), everything(cf.open_cache(tmp_path / "copy")))


@pytest.mark.slow
def test_peak_memory_stays_bounded_with_64_mib_shards(tmp_path):
    src = tmp_path / "c"
    write_big_cache(
        str(src), shard_mib=64, layers=(1, 2, 3, 4)
    )  # four 64 MiB shards in one segment (whole-object copies peaked at 311 MiB)
    # The process's own high-water mark (VmHWM), printed as it exits: a child's ru_maxrss would
    # also count the pages it shared with this (large) test process between fork and exec.
    report = "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)"
    launcher = (
        f"import atexit, runpy, sys; atexit.register(lambda: {report}); "
        "runpy.run_module('cache_format', run_name='__main__')"
    )
    args = ["sync", src, tmp_path / "copy", "--threads", "8"]
    p = subprocess.run([sys.executable, "-c", launcher, *map(str, args)], env=_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    peak_mib = int(p.stderr.split()[-1]) / 1024  # kB
    assert peak_mib < 300, peak_mib
    assert ops.verify(cf.open_cache(tmp_path / "copy"))[1] == []


def _limited(max_bytes):
    def pre():  # writes past this size fail with EFBIG, like a full disk (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return pre


def test_a_full_disk_mid_object_is_one_line_and_the_next_sync_resumes(tmp_path):
    src = tmp_path / "c"
    write_big_cache(str(src), shard_mib=20, layers=(1, 2))
    dst = tmp_path / "copy"
    sync(str(src), str(dst), layers=[1])
    before = cf.open_cache(dst)
    p = subprocess.run(
        _sync_cmd(src, dst, "--layers", "2"),
        env=_env(),
        capture_output=True,
        text=True,
        preexec_fn=_limited(12 << 20),
        timeout=300,
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and lines[-1].startswith("error: cannot write ") and "Traceback" not in p.stderr
    assert "File too large" in lines[-1] and "re-run" in lines[-1]
    after = cf.open_cache(dst)  # what was there is intact
    assert after.layers == [1] and after.layer_fingerprint(1) == before.layer_fingerprint(1)
    assert ops.verify(after)[1] == []
    (partial,) = glob.glob(f"{dst}/segments/**/.*.partial-*", recursive=True)
    assert os.path.getsize(partial) == 12 << 20  # up to the byte where the disk filled
    sync(str(src), str(dst), layers=[2])
    done = cf.open_cache(dst)
    assert done.layers == [1, 2] and done.layer_fingerprint(2) == cf.open_cache(src).layer_fingerprint(2)
    assert ops.verify(done)[1] == []
