"""Every read is checked: chunk digests, shard-index CRC32C, small objects, the chained log, v1 caches."""

from __future__ import annotations

import json
import os

import sys

import numpy as np
import pytest

import cache_format as cf
from cache_format import commits, integrity


def flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def edit_file(path, old: bytes, new: bytes) -> None:
    raw = open(path, "rb").read()
    assert old in raw
    open(path, "wb").write(raw.replace(old, new, 1))


def shard_path(url, c, layer=1, si=0) -> str:
    e = c._segs[si].layers[layer]
    return os.path.join(url, e["array"], "c", "0", "0")


def downgrade_to_v1(url) -> None:
    """Make a cache look exactly like format 1 wrote it: no chunk digests, no chain, no root record."""
    zj = os.path.join(url, "zarr.json")
    doc = json.load(open(zj))
    doc["attributes"]["actcache"]["format_version"] = 1
    open(zj, "wb").write(commits.dumps(doc))
    os.unlink(os.path.join(url, "commits", commits.ROOT_RECORD))
    for name in sorted(os.listdir(os.path.join(url, "commits"))):
        p = os.path.join(url, "commits", name)
        r = json.load(open(p))
        r.pop("digest"), r.pop("prev")
        for part in [r.get("rows")] + list(r.get("layers", {}).values()) + [r.get("entry")]:
            for v in (part or {}).get("objects", {}).values():
                v.pop("chunks", None)
        open(p, "wb").write(commits.dumps(r))


def test_every_chunk_has_a_digest_and_a_flip_anywhere_in_a_shard_is_caught(make_cache):
    url, data = make_cache(segments=(40, 25), chunk_tokens=8)
    c = cf.open_cache(url)
    obj = c._segs[0].layers[1]["objects"]["c/0/0"]
    assert len(obj["chunks"]) == 5 and all(isinstance(d, str) and len(d) == 16 for d in obj["chunks"])
    path, size = shard_path(url, c), obj["size"]
    caught = 0
    for off in np.linspace(0, size - 1, 12).astype(int):  # chunk bytes and the index alike
        flip(path, int(off))
        fresh = cf.open_cache(url)
        with pytest.raises(integrity.IntegrityError, match="c/0/0.*corrupt"):
            for i in range(5):
                fresh.read_chunk(1, i)
        caught += 1
        flip(path, int(off))  # restore
    assert caught == 12
    assert np.array_equal(cf.open_cache(url).residuals(1).numpy(), data["residuals"][1])


def test_an_index_that_marks_a_written_chunk_absent_is_refused_not_read_as_zeros(make_cache):
    import google_crc32c

    url, data = make_cache(segments=(40, 25), chunk_tokens=8)
    c = cf.open_cache(url)
    obj = c._segs[0].layers[1]["objects"]["c/0/0"]
    m = len(obj["chunks"])
    path = shard_path(url, c)
    raw = bytearray(open(path, "rb").read())
    tail = len(raw) - (16 * m + 4)
    raw[tail + 16: tail + 32] = b"\xff" * 16  # inner chunk 1: "absent", with a valid CRC32C over the edit
    raw[-4:] = google_crc32c.value(bytes(raw[tail: tail + 16 * m])).to_bytes(4, "little")
    open(path, "wb").write(bytes(raw))
    fresh = cf.open_cache(url)
    with pytest.raises(integrity.IntegrityError, match="marks inner chunk 1 absent"):
        fresh.residuals(1)[8:16]
    import torch

    got = fresh.residuals(1)[0:8].view(torch.int16).numpy()
    assert np.array_equal(got, data["residuals"][1][0:8].view(np.int16))  # the other chunks still read


def test_flips_in_rows_stats_sequences_and_array_metadata_are_caught(make_cache, run):
    url, _ = make_cache(segments=(40,), chunk_tokens=8)
    c = cf.open_cache(url)
    s = c._segs[0]
    rows = s.record["rows"]["path"]
    cases = [(os.path.join(url, rows, "tokens", "c", "0"), lambda c: c.tokens[:]),
             (os.path.join(url, s.layers[3]["stats"]["path"]), lambda c: c.stats(3)),
             (os.path.join(url, s.record["sequences"]["path"]), lambda c: c.sequences()),
             (os.path.join(url, s.layers[1]["array"], "zarr.json"), lambda c: c.residuals(1)[0:3])]
    for path, read in cases:
        flip(path, 10)
        with pytest.raises(integrity.IntegrityError, match="corrupt"):
            read(cf.open_cache(url))
        code, out, err = run("verify", url)
        assert code == 2 and "checksum mismatch" in out and err.startswith("error: verify: 1 of")
        flip(path, 10)
    assert run("verify", url)[0] == 0


@pytest.mark.parametrize("edit", ["n_rows", "kind", "remove", "utf8", "root_layers", "root_record"])
def test_any_edit_to_the_log_or_the_root_is_refused_in_one_line(make_cache, run, edit):
    url, _ = make_cache(segments=(40, 25, 10))
    commits_dir = os.path.join(url, "commits")
    rec = os.path.join(commits_dir, "0000000002.json")
    if edit == "n_rows":
        edit_file(rec, b'"n_rows":25', b'"n_rows":24')
    elif edit == "kind":
        edit_file(rec, b'"kind":"segment"', b'"kind":"segmenx"')
    elif edit == "remove":
        os.unlink(rec)
    elif edit == "utf8":
        raw = open(rec, "rb").read()
        open(rec, "wb").write(raw[:30] + b"\xff" + raw[31:])
    elif edit == "root_layers":
        zj = os.path.join(url, "zarr.json")
        edit_file(zj, b'"layers":[1,3]', b'"layers":[1]')
    elif edit == "root_record":
        os.unlink(os.path.join(commits_dir, commits.ROOT_RECORD))
    with pytest.raises(cf.CacheError, match="commit log is damaged") as e:
        cf.open_cache(url)
    assert "\n" not in str(e.value)
    with pytest.raises(cf.CacheError, match="damaged"):
        cf.open_cache(url, mode="a").segment()
    code, out, err = run("verify", url)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "commit log is damaged" in err


def test_verify_and_the_cli_refuse_a_damaged_log_without_a_traceback(make_cache, tmp_path):
    import subprocess
    import sys

    url, _ = make_cache(segments=(10,))
    rec = os.path.join(url, "commits", "0000000001.json")
    raw = open(rec, "rb").read()
    open(rec, "wb").write(raw[:20] + b"\xfe" + raw[21:])
    p = subprocess.run([sys.executable, "-m", "cache_format", "verify", url], capture_output=True, text=True)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "0000000001.json" in lines[0]
    assert "Traceback" not in p.stderr


def test_a_racing_commit_chains_to_the_winner(make_cache):
    url, _ = make_cache(segments=(10,))
    w = cf.open_cache(url, mode="a")
    names, _ = commits.list_commits(w.loc)
    a = commits.commit(w.loc, {"kind": "add_layer", "layer": 7})
    b = commits.commit(w.loc, {"kind": "add_layer", "layer": 8})
    recs = commits.load_records(w.loc, {})
    assert list(recs)[-2:] == [a, b] and recs[b]["prev"] == recs[a]["digest"]


def test_a_format_1_cache_opens_says_so_in_one_line_and_upgrade_adds_digests(make_cache, run, capsys):
    from cache_format import reader

    url, data = make_cache(segments=(40, 25), chunk_tokens=8)
    fp = cf.open_cache(url).fingerprint
    downgrade_to_v1(url)
    reader._NOTED.discard(url)
    c = cf.open_cache(url)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no chunk digests" in err[0] and "upgrade" in err[0]
    assert np.array_equal(c.residuals(3).numpy(), data["residuals"][3]) and c.fingerprint == fp
    reader._NOTED.discard(url)
    code, out, err = run("verify", url)
    assert code == 0 and "no chunk digests" in err
    code, out, err = run("upgrade", url)
    assert code == 0 and "chunk digests for" in out and "2 format-1 records pinned" in out
    assert run("upgrade", url)[1].strip().endswith("is up to date: every chunk has a digest and every record is chained")
    reader._NOTED.discard(url)
    c = cf.open_cache(url)
    assert capsys.readouterr().err == "" and c.fingerprint == fp
    flip(shard_path(url, c, 3, 1), 5)
    with pytest.raises(integrity.IntegrityError):
        cf.open_cache(url).residuals(3)[:]
    flip(shard_path(url, c, 3, 1), 5)
    rec = os.path.join(url, "commits", "0000000001.json")  # a format-1 record, pinned by the upgrade
    edit_file(rec, b'"n_rows":40', b'"n_rows":39')
    with pytest.raises(cf.CacheError, match="damaged at commits/0000000001.json"):
        cf.open_cache(url)
    edit_file(rec, b'"n_rows":39', b'"n_rows":40')
    cf.open_cache(url)
    upgrade = os.path.join(url, "commits", sorted(os.listdir(os.path.join(url, "commits")))[-1])
    raw = open(upgrade, "rb").read()
    doc = json.loads(raw)
    assert doc["kind"] == "upgrade"
    doc["pinned"] = 5  # an edit that breaks the record's shape: one line, no traceback
    open(upgrade, "wb").write(commits.dumps(doc))
    with pytest.raises(cf.CacheError, match="damaged at commits/.*pinned records"):
        cf.open_cache(url)


def test_fingerprints_do_not_depend_on_commit_order(tmp_path):
    from cache_format.bf16 import BF16

    rng = np.random.default_rng(3)
    parts = [(rng.standard_normal((n, 8)).astype(BF16), np.arange(n) + 100 * i) for i, n in enumerate((9, 5, 7))]
    fps = []
    for order in ((0, 1, 2), (2, 0, 1)):
        w = cf.create_cache(tmp_path / f"c{order[0]}", d_model=8, layers=[2], chunk_tokens=4)
        for i in order:
            x, sid = parts[i]
            with w.segment(meta={"unit": i}) as seg:
                seg.append({2: x}, tokens=sid, seq_ids=sid, positions=np.zeros(len(sid), np.int32))
        c = w.snapshot()
        fps.append((c.fingerprint, c.layer_fingerprint(2)))
    assert fps[0] == fps[1]
