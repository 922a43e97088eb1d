"""The layout (cache_format/layout.py, codecs.py): bf16 in and out bit for bit, codec names, and a
cache's keys that stay inside its root and its layout (docs/cache-format.md, *Keys*).

The hash chain has no secret, so these caches are crafted as an attacker would: records and
root attributes rewritten, then re-sealed from the documented record format (sha256 of the
canonical JSON, `prev` chaining) so that the chain is valid. Every crafted key points at a
sibling directory of the cache, which holds data that matches the crafted manifests (so
without the checks, reads would be served from there and `verify` would pass). Reads,
`verify`, `sync`, `gc` and `publish` must refuse each in one line, and nothing outside the
root or the destination is read, written or deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from support import write_cache

import cache_format as cf
from cache_format.errors import CacheError
from cache_format.layout import BF16
from cache_format.stores import Location, key_problem


def test_every_bf16_bit_pattern_round_trips(tmp_path):
    bits = np.arange(65536, dtype=np.uint16).reshape(-1, 64)  # NaNs, ±inf, -0.0, subnormals included
    w = cf.create_cache(tmp_path / "c", d_model=64, layers=[0], chunk_tokens=100, shard_mib=1)
    with w.segment() as seg:
        n = len(bits)
        seg.append(
            residuals={0: torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)},
            tokens=np.zeros(n, np.int32),
            seq_ids=np.zeros(n, np.int64),
            positions=np.arange(n),
        )
    with w.segment() as seg:  # the numpy ml_dtypes path too
        seg.append(
            residuals={0: bits.view(BF16)},
            tokens=np.zeros(n, np.int32),
            seq_ids=np.ones(n, np.int64),
            positions=np.arange(n),
        )
    c = cf.open_cache(tmp_path / "c")
    t = c.residuals(0)[:]
    assert t.dtype == torch.bfloat16 and t.shape == (2 * n, 64)
    got = t.view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(got[:n], bits) and np.array_equal(got[n:], bits)
    a = c.residuals(0).numpy(n, 2 * n)
    assert a.dtype == ml_dtypes.bfloat16 and np.array_equal(a.view(np.uint16), bits)
    b = c.chunk_bounds()
    chunks = np.concatenate([c.read_chunk(0, i) for i in range(len(b) - 1)])
    assert np.array_equal(chunks.view(np.uint16)[:n], bits)


def test_codecs_none_and_zstd_round_trip(make_cache):
    for codec in ("none", "zstd3", "blosc-lz4"):
        url, data = make_cache(codec=codec)
        c = cf.open_cache(url)
        assert np.array_equal(c.residuals(1).numpy().view(np.uint16), data["residuals"][1].view(np.uint16))
        assert np.array_equal(c.read_chunk(1, 1).view(np.uint16), data["residuals"][1][8:16].view(np.uint16))


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _sha256(obj) -> str:
    return hashlib.sha256(_canonical(obj)).hexdigest()


def _blake2b(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def _records(cache: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((cache / "commits").glob("*.json"))}


def reseal(cache: Path, root: dict, records: dict[str, dict]) -> None:
    """Write root attributes and records as an attacker would: record 0 pins the root's digest, every
    record chains to the one before it, and index.json (for HTTP) carries them all."""
    doc = json.loads((cache / "zarr.json").read_text())
    doc["attributes"]["actcache"] = root
    (cache / "zarr.json").write_text(json.dumps(doc))
    prev, sealed = None, {}
    for name, r in sorted(records.items()):
        body = {k: v for k, v in r.items() if k != "digest"}
        if body.get("kind") == "root":
            body["root"] = _sha256(root)
        body["prev"] = prev
        body["digest"] = prev = _sha256(body)
        sealed[name] = body
        (cache / "commits" / name).write_bytes(_canonical(body))
    index = {"format": "actcache", "version": 1, "commits": [{"name": n, "record": r} for n, r in sealed.items()]}
    (cache / "index.json").write_bytes(_canonical(index))


def _root(cache: Path) -> dict:
    return json.loads((cache / "zarr.json").read_text())["attributes"]["actcache"]


def craft(base: Path, attack: str) -> tuple[Path, str, Path]:
    """A crafted cache at base/cache whose keys reach base/outside; (cache dir, what the refusal
    names, the outside directory). `attack`: array-relative, array-absolute, tokenizer-dotdot,
    tokenizer-absolute."""
    cache, outside = base / "cache", base / "outside"
    write_cache(str(cache), d_model=8, layers=(1,), segments=(16,), tokenizer_files={"tokenizer.json": b"{}"})
    root, records = _root(cache), _records(cache)
    if attack.startswith("array"):
        # the layer array of another cache next door: its manifest is copied in, so it checks out
        write_cache(str(outside), d_model=8, layers=(1,), segments=(16,), seed=7)
        (theirs,) = [r for r in _records(outside).values() if r["kind"] == "segment"]
        entry = theirs["layers"]["1"]
        array = f"../outside/{entry['array']}" if attack == "array-relative" else str(outside / entry["array"])
        (name,) = [n for n, r in records.items() if r["kind"] == "segment"]
        records[name]["layers"]["1"] = dict(entry, array=array)
        where = f"commits/{name}"
    else:
        outside.mkdir()
        secret = b'{"canary": "a file outside the cache"}'
        (outside / "secret.json").write_bytes(secret)
        tok = "../outside/secret.json" if attack == "tokenizer-dotdot" else str(outside / "secret.json")
        root["tokenizer"][tok] = {"size": len(secret), "blake2b": _blake2b(secret)}
        where = "zarr.json"
    reseal(cache, root, records)
    return cache, where, outside


def snapshot(top: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Every file under `top` (except under `skip`) with its size, mtime and content digest."""
    out = {}
    for dirpath, _, files in os.walk(top):
        if skip is not None and Path(dirpath).is_relative_to(skip):
            continue
        for f in files:
            p = Path(dirpath) / f
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns, _blake2b(p.read_bytes()))
    return out


def one_line_refusal(code: int, err: str, where: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert f"{where} is refused" in err, err


ATTACKS = ["array-relative", "array-absolute", "tokenizer-dotdot", "tokenizer-absolute"]


def _upload(local: Path, bucket_url: str, opts: dict) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    for dirpath, _, files in os.walk(local):
        for f in files:
            p = Path(dirpath) / f
            fs.pipe_file(f"{bucket_url[5:]}/{p.relative_to(local.parent).as_posix()}", p.read_bytes())


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("store", ["local", "http", "s3"])
def test_a_resealed_cache_whose_keys_leave_it_is_refused_everywhere(tmp_path, attack, store, run, http_serve, request):
    src = tmp_path / "src"
    cache, where, outside = craft(src, attack)
    opts = {}
    url = str(cache)
    if store == "http":
        url = f"{http_serve(src)}/cache"
    elif store == "s3":
        bucket, opts = request.getfixturevalue("s3_bucket")
        _upload(cache, bucket, opts)
        _upload(outside, bucket, opts)
        url = f"{bucket}/cache"
    so = ["-o", json.dumps(opts)] if opts else []
    before = snapshot(tmp_path)

    # reads: nothing is served, from the cache or from outside it
    with pytest.raises(CacheError) as e:
        cf.open_cache(url, storage_options=opts or None)
    assert f"{where} is refused" in str(e.value) and "\n" not in str(e.value)
    one_line_refusal(*run("verify", url, *so)[::2], where)
    one_line_refusal(*run("info", url, *so)[::2], where)

    # sync: refused before anything is written, into the destination or beside it
    dst = tmp_path / "dst" / "cache"
    dst.parent.mkdir()
    one_line_refusal(*run("sync", url, str(dst), *so, "--dst-options", "{}")[::2], where)
    assert not (tmp_path / "dst" / "outside").exists()
    if store != "http":  # writes and deletes on the crafted store itself
        one_line_refusal(*run("gc", url, "--older-than", "0s", "--force", *so)[::2], where)
        one_line_refusal(*run("publish", url, *so)[::2], where)
    assert snapshot(tmp_path) == before  # nothing written or deleted anywhere under tmp_path
    if store == "http":  # nothing outside the cache was asked of the server
        assert http_serve.requested and all(p.startswith("/cache/") for p in http_serve.requested)


def test_a_crafted_record_in_sync_is_one_line_not_an_index_error(tmp_path, run):
    """A layer array one part deep used to raise IndexError in sync; the layout refuses it first."""
    cache = tmp_path / "cache"
    write_cache(str(cache), d_model=8, layers=(1,), segments=(16,))
    root, records = _root(cache), _records(cache)
    (name,) = [n for n, r in records.items() if r["kind"] == "segment"]
    records[name]["layers"]["1"]["array"] = "segments"
    reseal(cache, root, records)
    one_line_refusal(*run("sync", str(cache), str(tmp_path / "dst"))[::2], f"commits/{name}")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    "edit",
    [
        "manifest key with ..",
        "stats outside the segment",
        "rows under another segment",
        "sequences absolute",
        "segment id with ..",
        "backfilled layer under another segment",
        "retract with a path",
        "hook with ..",
        "size not an integer",
    ],
)
def test_every_key_a_record_names_is_checked_against_the_layout(tmp_path, edit):
    cache = tmp_path / "cache"
    write_cache(str(cache), d_model=8, layers=(1,), segments=(16, 8))
    root, records = _root(cache), _records(cache)
    names = [n for n, r in records.items() if r["kind"] == "segment"]
    seg, other = records[names[0]], records[names[1]]
    layer = seg["layers"]["1"]
    if edit == "manifest key with ..":
        layer["objects"]["../../../x/c/0/0"] = layer["objects"].pop("c/0/0")
    elif edit == "stats outside the segment":
        layer["stats"]["path"] = "segments/stats/1.json"
    elif edit == "rows under another segment":
        seg["rows"]["path"] = other["rows"]["path"]
    elif edit == "sequences absolute":
        seg["sequences"]["path"] = "/etc/passwd"
    elif edit == "segment id with ..":
        seg["segment"] = ".."
    elif edit == "backfilled layer under another segment":
        records["0000000099.json"] = {
            "kind": "layer",
            "segment": seg["segment"],
            "layer": 5,
            "entry": other["layers"]["1"],
        }
    elif edit == "retract with a path":
        records["0000000099.json"] = {"kind": "retract", "segment": "../x"}
    elif edit == "hook with ..":
        root["hook"] = ".."
    elif edit == "size not an integer":
        layer["objects"]["c/0/0"]["size"] = "771"
    reseal(cache, root, records)
    with pytest.raises(CacheError, match="is refused") as e:
        cf.open_cache(str(cache))
    assert "\n" not in str(e.value)


def test_the_untouched_cache_passes_the_same_checks(tmp_path, run):
    """The crafting helper itself changes nothing: re-sealing an honest cache leaves it valid."""
    cache = tmp_path / "cache"
    write_cache(str(cache), d_model=8, layers=(1,), segments=(16,), tokenizer_files={"tokenizer.json": b"{}"})
    reseal(cache, _root(cache), _records(cache))
    assert run("verify", str(cache))[0] == 0
    assert cf.open_cache(str(cache)).tokenizer_files == {"tokenizer.json": b"{}"}


BAD_KEYS = ["../x", "/etc/passwd", "a//b", "a/./b", "a/..", "", "s3://bucket/x", "C:/x", "a\\..\\b", "a\x00b"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_every_store_refuses_a_key_that_leaves_its_root(tmp_path, key, s3_bucket, http_serve):
    """The store layer's own gate, whoever built the key: no read, write, listing or delete."""
    (tmp_path / "root").mkdir()
    (tmp_path / "x").write_bytes(b"outside")
    bucket, opts = s3_bucket
    locations = [
        Location(str(tmp_path / "root")),
        Location(f"{http_serve(tmp_path)}/root"),
        Location(f"{bucket}/root", opts),
    ]
    assert key_problem(key)
    before = snapshot(tmp_path)
    for loc in locations:
        calls = [(loc.read, key), (loc.exists, key), (loc.read_range, key, 0, 4)]
        if loc.supports_writes:
            calls += [(loc.write, key, b"w"), (loc.create_exclusive, key, b"w"), (loc.delete, [key])]
            calls += [(loc.walk, key), (loc.list, key)]
        for fn, *args in calls:
            with pytest.raises(CacheError, match="refused the key"):
                fn(*args)
    assert snapshot(tmp_path) == before
    assert http_serve.requested == []


def test_plain_keys_pass():
    for key in ["zarr.json", "segments/20260101T000000-abc/resid_post/11/c/0/0", "commits/.tmp-1", "a/b:c"]:
        assert key_problem(key) is None


def test_role_names_and_codes_map_once():
    from cache_format.errors import UserError
    from cache_format.layout import role_codes

    assert role_codes(["answer", "thinking", 2]) == (cf.ROLE_THINKING, cf.ROLE_ANSWER)
    assert role_codes([]) == ()
    for bad in (["reasoning"], [7], [True]):
        with pytest.raises(UserError, match="is unknown; use text, prompt, thinking or answer"):
            role_codes(bad)
