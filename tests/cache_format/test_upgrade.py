"""Format 1 caches open, say so, and `upgrade` adds digests (cache_format/upgrade.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from support import edit_file, flip, shard_path

import cache_format as cf
from cache_format import integrity, log


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
