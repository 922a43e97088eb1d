"""Sharing a cache (cache_format/sync.py, ops.publish, ops.card): `sync` between local,
S3 and a faulty HTTP server keeps the fingerprint; partial copies; objects copied in bounded memory,
checked as they pass and resumed mid-object; publishing for HTTP; a Hub dataset card."""

from __future__ import annotations

import glob
import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import s3fs
from huggingface_hub import DatasetCard
from support import FAULTS, everything, s3_options, same_cache, write_big_cache, write_cache

import cache_format as cf
from cache_format import log, ops
from cache_format.layout import BF16
from cache_format.stores import Location
from cache_format.stores.local import PIECE
from cache_format.sync import BLOCK, sync


def test_sync_local_s3_local_keeps_the_fingerprint(tmp_path, s3_bucket):
    url, opts = s3_bucket
    write_cache(str(tmp_path / "a"), segments=(30, 20, 9))
    src = cf.open_cache(tmp_path / "a")
    w = cf.open_cache(tmp_path / "a", mode="a")
    w.retract(src.segments[1].id)
    bf = w.add_layer(5)
    info = bf.pending()[0]
    s = slice(info.row_start, info.row_start + info.n_rows)
    src.refresh()
    bf.write(
        info.id,
        residuals=np.full((info.n_rows, 16), 2, BF16),
        tokens=src.tokens[s],
        seq_ids=src.seq_ids[s],
        positions=src.positions[s],
    )
    src.refresh()
    r = sync(str(tmp_path / "a"), f"{url}/c", None, opts)
    assert r["segments"] == 2 and r["layers"] == 0
    mid = cf.open_cache(f"{url}/c", storage_options=opts)
    assert mid.fingerprint == src.fingerprint and mid.layer_coverage()[5] == 1
    sync(f"{url}/c", str(tmp_path / "b"), opts, None)
    back = cf.open_cache(tmp_path / "b")
    assert back.fingerprint == src.fingerprint
    assert all(back.layer_fingerprint(L) == src.layer_fingerprint(L) for L in src.layers)
    assert np.array_equal(back.residuals(3).numpy().view(np.uint16), src.residuals(3).numpy().view(np.uint16))
    assert sync(str(tmp_path / "a"), f"{url}/c", None, opts)["segments"] == 0  # idempotent
    # A backfill that lands later in SRC travels as a layer commit.
    info = bf.pending()[0]
    s = slice(info.row_start, info.row_start + info.n_rows)
    bf.write(
        info.id,
        residuals=np.full((info.n_rows, 16), 3, BF16),
        tokens=src.tokens[s],
        seq_ids=src.seq_ids[s],
        positions=src.positions[s],
    )
    assert sync(str(tmp_path / "a"), f"{url}/c", None, opts)["layers"] == 1
    assert cf.open_cache(f"{url}/c", storage_options=opts).fingerprint == src.refresh().fingerprint
    assert 5 in src.layers


def test_sync_from_a_faulty_server_retries_and_copies_exactly(tmp_path, http_serve):
    url = str(tmp_path / "c")
    write_cache(url, segments=(40, 25), chunk_tokens=8, tokenizer_files={"tokenizer.json": b'{"x": 1}'})
    ops.publish(Location(url))
    base = http_serve(tmp_path, faults=FAULTS)
    dst = str(tmp_path / "copy")
    got = sync(f"{base}/c", dst)
    assert got["segments"] == 2 and http_serve.injected
    same_cache(everything(cf.open_cache(url)), everything(cf.open_cache(dst)))
    assert not [p for p in Location(dst).walk("segments") if p.key.endswith("/.lease")]  # released after each copy


def _files(url) -> dict:
    """Every file under a local cache with its size and modification time (to show nothing changed)."""
    out = {}
    for d, _, names in os.walk(url):
        for n in names:
            st = os.stat(os.path.join(d, n))
            out[os.path.relpath(os.path.join(d, n), url)] = (st.st_size, st.st_mtime_ns)
    return out


def _bits(c, layer):
    return c.residuals(layer).numpy().view(np.uint16)


def test_a_partial_copy_holds_the_chosen_layers_with_the_sources_fingerprints(tmp_path, run):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_cache(a, layers=(1, 3, 5), segments=(30, 20, 9), tokenizer_files={"tokenizer.json": b'{"x": 1}'})
    src = cf.open_cache(a)
    code, out, _ = run("sync", a, b, "--layers", "3", "--dry-run")
    assert code == 0 and "layer 3" in out and "layer 1" not in out and "nothing was copied" in out
    assert not os.path.exists(b)  # a dry run moves nothing
    plan = sync(a, b, layers=[3], dry_run=True)["plan"]
    layer3 = [{**s.layers[3]["objects"], "stats": s.layers[3]["stats"]} for s in src.log.segments]
    assert plan["3"] == {"objects": sum(map(len, layer3)), "bytes": sum(v["size"] for o in layer3 for v in o.values())}
    assert list(plan) == ["3", "rows", "tokenizer"]

    r = sync(a, b, layers=[3])
    assert r["bytes"] == sum(v["bytes"] for v in plan.values())  # what the dry run said is what moved
    c = cf.open_cache(b)
    assert c.layers == [3] and c.n_tokens == src.n_tokens
    assert np.array_equal(_bits(c, 3), _bits(src, 3))
    assert c.layer_fingerprint(3) == src.layer_fingerprint(3)
    for col in ("tokens", "seq_ids", "positions", "labels", "roles"):
        assert np.array_equal(getattr(c, col)[:], getattr(src, col)[:])
    assert c.sequences().equals(src.sequences()) and c.tokenizer_files == src.tokenizer_files
    assert np.array_equal(c.stats(3)["mean"], src.stats(3)["mean"])
    assert ops.verify(c)[1] == []
    assert c.copy_of == {"url": a, "root": log.root_digest(src.log.root), "layers": [3], "segments": None}
    assert c.log.root["copy_of"] == c.copy_of  # the root says so

    before = _files(b)
    code, out, _ = run("sync", a, b, "--layers", "5", "--dry-run")
    assert code == 0 and "layer 5" in out and _files(b) == before
    sync(a, b, layers=[5])  # a later sync adds a layer
    c = cf.open_cache(b)
    assert c.layers == [3, 5] and c.copy_of["layers"] == [3, 5]
    assert all(c.layer_fingerprint(L) == src.layer_fingerprint(L) for L in (3, 5))
    assert np.array_equal(_bits(c, 5), _bits(src, 5)) and ops.verify(c)[1] == []

    write_cache(a + "-more", layers=(1, 3, 5), segments=(7,), seed=4)  # SRC grows: a plain sync catches up
    w = cf.open_cache(a, mode="a")
    with w.segment() as seg:
        more = cf.open_cache(a + "-more")
        seg.append(
            residuals={L: more.residuals(L).numpy() for L in (1, 3, 5)},
            **{k: getattr(more, k)[:] + (1000 if k == "seq_ids" else 0) for k in ("tokens", "seq_ids", "positions")},
        )
    assert sync(a, b)["segments"] == 1
    c, src = cf.open_cache(b), src.refresh()
    assert c.layers == [3, 5] and c.n_tokens == src.n_tokens == 66
    assert all(c.layer_fingerprint(L) == src.layer_fingerprint(L) for L in (3, 5))


def test_a_segment_range_or_a_token_count_copies_those_segments_and_widens_later(tmp_path):
    a = str(tmp_path / "a")
    write_cache(a, layers=(1, 3), segments=(30, 20, 9))
    src = cf.open_cache(a)
    segs = src.log.segments
    sync(a, str(tmp_path / "b"), segments="1:3")
    c = cf.open_cache(tmp_path / "b")
    assert c.layers == [1, 3] and c.n_tokens == 29 and c.copy_of["segments"] == [s.id for s in segs[1:3]]
    assert np.array_equal(c.seq_ids[:], src.seq_ids[30:59]) and np.array_equal(_bits(c, 1), _bits(src, 1)[30:59])
    assert c.layer_fingerprint(1) == log.layer_fingerprint(src.log.root, segs[1:3], 1)  # SRC's, over those segments
    assert ops.verify(c)[1] == []
    sync(a, str(tmp_path / "b"), segments="0:1")  # widened to every segment: SRC's fingerprints
    c = cf.open_cache(tmp_path / "b")
    assert c.n_tokens == 59 and c.fingerprint == src.fingerprint and c.layer_fingerprint(3) == src.layer_fingerprint(3)
    sync(a, str(tmp_path / "t"), layers=[3], tokens=31)  # the first segments until 31 rows: 30 + 20
    t = cf.open_cache(tmp_path / "t")
    assert t.layers == [3] and t.n_tokens == 50 and [s.id for s in t.segments] == [s.id for s in segs[:2]]


def test_bad_partial_syncs_are_one_line_and_leave_dst_as_it_was(tmp_path, run):
    a, other = str(tmp_path / "a"), str(tmp_path / "o")
    write_cache(a, layers=(1, 3), segments=(30, 20))
    write_cache(other, layers=(1, 3), segments=(30, 20), seed=9)
    b, ob = str(tmp_path / "b"), str(tmp_path / "ob")
    sync(a, b, layers=[1])
    sync(other, ob, layers=[1])
    before = {u: _files(u) for u in (b, ob, other)}
    cases = [
        (["sync", a, b, "--layers", "7"], "layer 7 is not in"),
        (["sync", a, b, "--segments", "1:5"], "outside"),
        (["sync", a, b, "--segments", "2:1"], "outside"),
        (["sync", a, b, "--segments", "x"], "expected A:B"),
        (["sync", a, b, "--tokens", "1000"], "holds 50 rows"),
        (["sync", a, ob, "--layers", "3"], "is a partial copy of"),  # DST is a copy of another cache
        (["sync", a, ob], "is a partial copy of"),
        (["sync", a, other, "--layers", "1"], "not a partial copy"),  # DST holds another cache
        (["sync", a, str(tmp_path / "new"), "--layers", "9"], "layer 9 is not in"),
    ]
    for args, phrase in cases:
        code, out, err = run(*args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], (args, err)
    assert {u: _files(u) for u in (b, ob, other)} == before and not os.path.exists(tmp_path / "new")


def test_a_copy_record_of_the_wrong_shape_is_refused_in_one_line(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_cache(a, layers=(1, 3), segments=(30, 20))
    sync(a, b, layers=[1])
    log.commit(Location(b), {"kind": "copy", "layers": [1], "segments": ["../../elsewhere"]})
    with pytest.raises(cf.CacheError, match=r"is refused: segment '\.\./\.\./elsewhere'") as e:
        cf.open_cache(b)
    assert "\n" not in str(e.value)


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
    # host must fault in afresh: 5-10x the system time per byte there (cache_format/stores/local.py).
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


META = {
    "model": {"name_or_path": "Qwen/Qwen3.6-27B", "revision": "v1", "commit": "abc123", "dtype": "bfloat16"},
    "hook": {"site": "resid_post", "meaning": "output of decoder layer N (0-based)", "module_path": "model.layers.N"},
    "source": {"name": "supergpqa", "dataset": "m-a-p/SuperGPQA", "revision": "", "split": "train", "seed": 100},
}


def test_the_card_carries_the_provenance_and_the_hub_reads_its_front_matter(tmp_path, run):
    url = str(tmp_path / "c")
    write_cache(url, layers=(11, 31), segments=(40, 25), meta=META)
    c = cf.open_cache(url)
    out = tmp_path / "README.md"
    code, _, err = run("card", url, "--repo", "org/acts", "--path", "cache", "--license", "apache-2.0", "--out", out)
    assert code == 0, err
    card = DatasetCard.load(out)  # huggingface_hub's own parser
    assert card.data.license == "apache-2.0" and card.data.viewer is False
    assert card.data.size_categories == ["n<1K"] and card.data.source_datasets == ["m-a-p/SuperGPQA"]
    assert "sparse-autoencoders" in card.data.tags
    text = card.text
    for want in (
        "`Qwen/Qwen3.6-27B` @ `v1`, commit `abc123`",
        "`resid_post`: output of decoder layer N (0-based) (`model.layers.N`)",
        "| layers | 11, 31 (d_model 16) |",
        "| tokens | 65 rows in 2 segments |",
        "| sequences | 7 |",
        "`m-a-p/SuperGPQA`",
        "codec `blosc-zstd1`",
        f"| cache | `{c.fingerprint}` |",
        f"| layer 11 | `{c.layer_fingerprint(11)}` |",
        f"| layer 31 | `{c.layer_fingerprint(31)}` |",
        'cf.open_cache("hf://datasets/org/acts/cache")',
        "https://huggingface.co/datasets/org/acts/resolve/main/cache",
    ):
        assert want in text, want


def test_a_card_needs_its_repo_unless_read_from_the_hub(tmp_path, run, hub_serve, monkeypatch):
    url = str(tmp_path / "repo" / "c")
    write_cache(url, meta=META)
    code, out, err = run("card", url)
    assert code == 2 and err.startswith("error: card: name the Hub dataset repo") and not out
    ops.publish(Location(url))
    endpoint, hub = hub_serve()
    hub.push("org/acts", tmp_path / "repo")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    code, out, err = run("card", "hf://datasets/org/acts/c")
    assert code == 0 and 'cf.open_cache("hf://datasets/org/acts/c")' in out, err
