"""Adding a layer to committed rows (cache_format/backfill.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cache_format as cf
from cache_format.layout import BF16


def test_add_layer_backfill(make_cache):
    url, data = make_cache(segments=(20, 12))
    w = cf.open_cache(url, mode="a")
    before = cf.open_cache(url)
    fp1 = before.layer_fingerprint(1)
    bf = w.add_layer(7)
    pend = bf.pending()
    assert [p.n_rows for p in pend] == [20, 12]
    new = (data["residuals"][1].astype(np.float32) * 5).astype(BF16)
    info = pend[0]
    rows = slice(info.row_start, info.row_start + info.n_rows)
    bad_tokens = data["rows"]["tokens"][rows].copy()
    bad_tokens[3] += 1
    with pytest.raises(cf.UserError, match="misaligned"):
        bf.write(
            info.id,
            residuals=new[rows],
            tokens=bad_tokens,
            seq_ids=data["rows"]["seq_ids"][rows],
            positions=data["rows"]["positions"][rows],
        )
    with pytest.raises(cf.UserError, match="got 10 rows"):
        bf.write(
            info.id,
            residuals=new[:10],
            tokens=data["rows"]["tokens"][:10],
            seq_ids=data["rows"]["seq_ids"][:10],
            positions=data["rows"]["positions"][:10],
        )
    bf.write(
        info.id,
        residuals=new[rows],
        tokens=data["rows"]["tokens"][rows],
        seq_ids=data["rows"]["seq_ids"][rows],
        positions=data["rows"]["positions"][rows],
    )
    c = cf.open_cache(url)
    assert c.layers == [1, 3] and c.layer_coverage()[7] == 1
    with pytest.raises(cf.CacheError, match="backfill pending"):
        c.residuals(7)
    with pytest.raises(cf.UserError, match="missing \\[7\\]"):  # new segments must carry the new layer
        with w.segment() as seg:
            seg.append(
                residuals={1: new[:2], 3: new[:2]}, tokens=np.arange(2), seq_ids=np.arange(2), positions=np.arange(2)
            )
    (info,) = bf.pending()
    rows = slice(info.row_start, info.row_start + info.n_rows)
    bf.write(
        info.id,
        residuals=torch.from_numpy(new[rows].view(np.int16)).view(torch.bfloat16),
        tokens=data["rows"]["tokens"][rows],
        seq_ids=data["rows"]["seq_ids"][rows],
        positions=data["rows"]["positions"][rows],
    )
    c.refresh()
    assert c.layers == [1, 3, 7] and bf.pending() == []
    assert np.array_equal(c.residuals(7).numpy().view(np.uint16), new.view(np.uint16))
    assert c.layer_fingerprint(1) == fp1 and c.fingerprint != before.fingerprint
    assert c.stats(7)["count"] == 32
