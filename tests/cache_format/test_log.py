"""The commit log (cache_format/log.py): chained records, any edit refused in one line, racing
commits, content fingerprints, retraction; format-1 caches open, say so, and `upgrade` adds digests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from support import edit_file, flip, shard_path

import cache_format as cf
from cache_format import integrity, log
from cache_format.layout import BF16
from cache_format.stores import Location


def test_fingerprints_are_content_derived(tmp_path):
    from support import write_cache

    write_cache(str(tmp_path / "a"), seed=1)
    write_cache(str(tmp_path / "b"), seed=1)
    write_cache(str(tmp_path / "c"), seed=2)
    a, b, c = (cf.open_cache(tmp_path / n) for n in "abc")
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.layer_fingerprint(1) == b.layer_fingerprint(1) != a.layer_fingerprint(3)


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
        os.unlink(os.path.join(commits_dir, log.ROOT_RECORD))
    with pytest.raises(cf.CacheError, match="commit log is damaged") as e:
        cf.open_cache(url)
    assert "\n" not in str(e.value)
    with pytest.raises(cf.CacheError, match="damaged"):
        cf.open_cache(url, mode="a").segment()
    code, out, err = run("verify", url)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "commit log is damaged" in err


def test_a_racing_commit_chains_to_the_winner(make_cache):
    url, _ = make_cache(segments=(10,))
    loc = Location(url)
    names, _ = log.list_commits(loc)
    a = log.commit(loc, {"kind": "add_layer", "layer": 7})
    b = log.commit(loc, {"kind": "add_layer", "layer": 8})
    recs = log.load_records(loc, {})
    assert list(recs)[-2:] == [a, b] and recs[b]["prev"] == recs[a]["digest"]


def test_fingerprints_do_not_depend_on_commit_order(tmp_path):

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


def test_verify_and_the_cli_refuse_a_damaged_log_without_a_traceback(make_cache, tmp_path):

    url, _ = make_cache(segments=(10,))
    rec = os.path.join(url, "commits", "0000000001.json")
    raw = open(rec, "rb").read()
    open(rec, "wb").write(raw[:20] + b"\xfe" + raw[21:])
    p = subprocess.run([sys.executable, "-m", "cache_format", "verify", url], capture_output=True, text=True)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "0000000001.json" in lines[0]
    assert "Traceback" not in p.stderr


def test_retract_hides_segment_and_changes_fingerprint(make_cache):
    url, data = make_cache(segments=(10, 20, 30))
    c = cf.open_cache(url)
    w = cf.open_cache(url, mode="a")
    w.retract(c.segments[1].id, reason="bad prompts")
    c2 = cf.open_cache(url)
    assert c2.n_tokens == 40 and c2.fingerprint != c.fingerprint
    assert np.array_equal(c2.tokens[:], np.concatenate([data["rows"]["tokens"][:10], data["rows"]["tokens"][30:]]))
    assert c2.retracted == [c.segments[1].id]


def downgrade_to_v2(url) -> None:
    """Make a cache look exactly like format 2 wrote it: BLAKE2b object digests, no `object_digest`,
    the chain sealed again over the rewritten records."""

    def rehash(entry: dict, key: str) -> None:
        entry.pop("blake3")
        entry["blake2b"] = log.digest(open(os.path.join(url, key), "rb").read(), "blake2b")

    def walk(node) -> None:
        if isinstance(node, dict):
            if "blake3" in node and "path" in node:
                rehash(node, node["path"])
            base = node.get("path") or node.get("array")
            for k, v in (node.get("objects") or {}).items():
                rehash(v, f"{base}/{k}")
            for v in node.values():
                if isinstance(v, (dict, list)) and v is not node.get("objects"):
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    zj = os.path.join(url, "zarr.json")
    doc = json.load(open(zj))
    root = doc["attributes"]["actcache"]
    root["format_version"] = 2
    root.pop("object_digest")
    for name, want in root["tokenizer"].items():
        rehash(want, f"tokenizer/{name}")
    open(zj, "wb").write(log.dumps(doc))
    prev = None
    for name in sorted(os.listdir(os.path.join(url, "commits"))):
        p = os.path.join(url, "commits", name)
        r = json.load(open(p))
        if r["kind"] == "root":
            r = log.root_record(root)
        else:
            walk(r)
            r = log.seal(r, prev)
        open(p, "wb").write(log.dumps(r))
        prev = log.record_digest(r)


def test_a_format_2_cache_is_read_verified_synced_and_appended_to_with_blake2b(make_cache, run, tmp_path):
    url, data = make_cache(segments=(40, 25), chunk_tokens=8, tokenizer_files={"tokenizer.json": b'{"v": 1}'})
    assert json.load(open(os.path.join(url, "zarr.json")))["attributes"]["actcache"]["object_digest"] == "blake3"
    downgrade_to_v2(url)
    c = cf.open_cache(url)
    assert np.array_equal(c.residuals(3).numpy(), data["residuals"][3])
    assert run("verify", url)[0] == 0
    dst = str(tmp_path / "copy")
    assert run("sync", url, dst)[0] == 0
    d = cf.open_cache(dst)
    assert d.layer_fingerprint(3) == c.layer_fingerprint(3) and run("verify", dst)[0] == 0
    w = cf.open_cache(dst, mode="a")
    with w.segment() as seg:
        n = 10
        seg.append(
            residuals={L: np.ones((n, 16), BF16) for L in (1, 3)},
            tokens=np.zeros(n, np.int32),
            seq_ids=np.full(n, 1000, np.int64),
            positions=np.arange(n, dtype=np.int32),
        )
    assert run("verify", dst)[0] == 0 and cf.open_cache(dst).n_tokens == 75
    newest = os.path.join(dst, "commits", sorted(os.listdir(os.path.join(dst, "commits")))[-1])
    text = open(newest).read()
    assert '"blake2b"' in text and '"blake3"' not in text  # the cache's own digest: old readers still read it
    root = json.load(open(os.path.join(dst, "zarr.json")))["attributes"]["actcache"]
    assert root["format_version"] == 2 and "object_digest" not in root
    flip(shard_path(dst, cf.open_cache(dst), 3, 0), 5)
    assert run("verify", dst)[0] != 0


def downgrade_to_v1(url) -> None:
    """Make a cache look exactly like format 1 wrote it: no chunk digests, no chain, no root record."""
    zj = os.path.join(url, "zarr.json")
    doc = json.load(open(zj))
    doc["attributes"]["actcache"]["format_version"] = 1
    open(zj, "wb").write(log.dumps(doc))
    os.unlink(os.path.join(url, "commits", log.ROOT_RECORD))
    for name in sorted(os.listdir(os.path.join(url, "commits"))):
        p = os.path.join(url, "commits", name)
        r = json.load(open(p))
        r.pop("digest"), r.pop("prev")
        for part in [r.get("rows")] + list(r.get("layers", {}).values()) + [r.get("entry")]:
            for v in (part or {}).get("objects", {}).values():
                v.pop("chunks", None)
        open(p, "wb").write(log.dumps(r))


def _alias(url: str, name: str) -> str:
    """The same cache at another URL: the note is printed once per process and URL."""
    alias = f"{url}-{name}"
    os.symlink(url, alias)
    return alias


def test_a_format_1_cache_opens_says_so_in_one_line_and_upgrade_adds_digests(make_cache, run, capsys):
    url, data = make_cache(segments=(40, 25), chunk_tokens=8)
    fp = cf.open_cache(url).fingerprint
    downgrade_to_v1(url)
    c = cf.open_cache(url)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no chunk digests" in err[0] and "upgrade" in err[0]
    assert np.array_equal(c.residuals(3).numpy(), data["residuals"][3]) and c.fingerprint == fp
    code, out, err = run("verify", _alias(url, "verify"))
    assert code == 0 and "no chunk digests" in err
    code, out, err = run("upgrade", url)
    assert code == 0 and "chunk digests for" in out and "2 format-1 records pinned" in out
    assert (
        run("upgrade", url)[1].strip().endswith("is up to date: every chunk has a digest and every record is chained")
    )
    c = cf.open_cache(_alias(url, "upgraded"))  # not noted before in this process: silent only if upgraded
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
    open(upgrade, "wb").write(log.dumps(doc))
    with pytest.raises(cf.CacheError, match="damaged at commits/.*pinned records"):
        cf.open_cache(url)
