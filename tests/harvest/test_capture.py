"""The capture hook: what the cache holds is what an independent forward pass computes
(`capture_reference`), for a layer added later and with write-time mixing on; the forward
stops after the deepest layer; CUDA's asynchronous copies give the CPU capture's rows.
(The rollout source's rows, roles and labels: test_rollouts.py.)
"""

import numpy as np
import pytest
import torch
from capture_reference import assert_matches, tiny_cfg

import cache_format as cf
from harvest import run as hr
from harvest.capture import LayerCapture
from harvest.config import load_config
from harvest.model import load_model


@pytest.fixture(scope="module")
def lm():
    return load_model(load_config(None, "tiny").model)


def test_corpus_rows_match_an_independent_forward_including_a_layer_added_later(tmp_path, lm):
    url = tmp_path / "corpus"
    summary = hr.run(tiny_cfg(url, **{"harvest.source": "corpus", "harvest.layers": [1, 3]}), progress=False)
    assert summary["n_tokens"] == 2048 and summary["layers"] == [1, 3]
    c = assert_matches(lm, url, [1, 3])
    assert set(np.asarray(c.roles[:]).tolist()) == {cf.ROLE_TEXT}
    assert set(np.asarray(c.labels[:]).tolist()) == {cf.LABEL_NONE}
    fp1 = c.layer_fingerprint(1)
    # add layer 5 later: same rows, no new sequences, layer 1's fingerprint unchanged
    s2 = hr.run(tiny_cfg(url, **{"harvest.source": "corpus", "harvest.layers": [5]}), progress=False)
    assert s2["added_layers"] == [5] and s2["units"] == 0 and s2["n_tokens"] == 2048
    c = assert_matches(lm, url, [1, 3, 5], seed=1)
    assert c.layers == [1, 3, 5] and c.layer_fingerprint(1) == fp1


def test_write_time_mixing_keeps_every_row_locatable(tmp_path, lm):
    url = tmp_path / "mixed"
    cfg = tiny_cfg(
        url, **{"harvest.source": "corpus", "harvest.layers": [1], "harvest.mix_window": 4, "harvest.mix_seed": 7}
    )
    hr.run(cfg, progress=False)
    c = assert_matches(lm, url, [1])
    sid = np.asarray(c.seq_ids[: c.chunk_tokens])
    assert len(np.unique(sid)) == 4  # one chunk already holds rows of every sequence in its window
    assert not np.all(np.diff(np.asarray(c.positions[:128])) == 1)
    assert c.segments[0].meta["mix"]["window"] == 4
    hr.run(
        tiny_cfg(
            url, **{"harvest.source": "corpus", "harvest.layers": [3], "harvest.mix_window": 4, "harvest.mix_seed": 7}
        ),
        progress=False,
    )
    assert_matches(lm, url, [1, 3], seed=3)


def test_capture_stops_after_the_deepest_layer(lm):
    ran = []
    hs = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(lm.layers)]
    try:
        with LayerCapture(lm.layers, [3, 1]) as cap:
            out = cap.forward(lm.model, torch.tensor([[5, 6, 7, 8]]))
    finally:
        for h in hs:
            h.remove()
    assert sorted(out) == [1, 3] and ran == [0, 1, 2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on GPU machines)")
def test_cuda_async_copies_match_the_cpu_capture(lm):
    import copy

    from harvest.capture import PinnedPool, capture_batch

    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    with LayerCapture(lm.layers, [1, 3]) as cap:
        want = capture_batch(cap, lm.model, seqs, [0, 1], 0, torch.device("cpu")).ready()
    gpu = copy.deepcopy(lm.model).cuda()
    layers = gpu.model.language_model.layers
    pool = PinnedPool()
    with LayerCapture(layers, [1, 3]) as cap:
        got = capture_batch(cap, gpu, seqs, [0, 1], 0, torch.device("cuda"), pool)
        assert got.event is not None and all(t.is_pinned() for t in got.residuals.values())
        got.ready()
    assert len(pool.free) == 2  # staging buffers came back for reuse
    for L in (1, 3):
        cos = torch.nn.functional.cosine_similarity(got.residuals[L].float(), want.residuals[L].float(), dim=1)
        assert cos.min() > 0.999
