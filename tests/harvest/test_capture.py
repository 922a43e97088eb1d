"""Capture: what the cache holds is what an independent forward pass computes.

The reference is a plain forward over each sampled sequence alone (no padding, no batch,
no early stop) with its own hooks; rows must match to bf16 precision for both sources,
for a layer added later, and with write-time mixing on.
"""

import numpy as np
import pytest
import torch

import cache_format as cf
from harvest import run as hr
from harvest.capture import LayerCapture
from harvest.config import load_config
from harvest.model import load_model


def tiny_cfg(cache, **flags):
    overrides = [
        "corpus.tokens=2048",
        "corpus.seq_len=128",
        "supergpqa.questions=6",
        "supergpqa.max_new_tokens=12",
        "harvest.segment_sequences=4",
        "harvest.batch_size=4",
        "harvest.chunk_tokens=256",
    ]
    return load_config(None, "tiny", overrides, **{"harvest.cache": str(cache), **flags})


@pytest.fixture(scope="module")
def lm():
    return load_model(load_config(None, "tiny").model)


def reference(lm, token_ids, layers):
    """Plain forward over one whole sequence with independent hooks."""
    got = {}
    hs = [
        lm.layers[L].register_forward_hook(lambda m, a, o, L=L: got.__setitem__(L, o[0] if isinstance(o, tuple) else o))
        for L in layers
    ]
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([token_ids]))
    finally:
        for h in hs:
            h.remove()
    return {L: got[L][0].float() for L in layers}


def assert_matches(lm, url, layers, n_sample=64, seed=0):
    c = cf.open_cache(url)
    seqs = c.sequences()
    tok_of = dict(zip(seqs.column("seq_id").to_pylist(), seqs.column("token_ids").to_pylist()))
    rows = np.random.default_rng(seed).choice(c.n_tokens, size=min(n_sample, c.n_tokens), replace=False)
    sid, pos, toks = np.asarray(c.seq_ids[:]), np.asarray(c.positions[:]), np.asarray(c.tokens[:])
    refs = {}
    for r in rows:
        s = int(sid[r])
        if s not in refs:
            refs[s] = reference(lm, tok_of[s], layers)
        assert toks[r] == tok_of[s][pos[r]]
        for L in layers:
            got = c.residuals(L)[int(r) : int(r) + 1][0].float()
            want = refs[s][L][pos[r]]
            cos = torch.nn.functional.cosine_similarity(got, want, dim=0).item()
            rel = ((got - want).norm() / want.norm()).item()
            assert cos >= 0.999 and rel <= 0.02, (L, r, cos, rel)
    return c


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


def test_rollout_rows_match_and_carry_roles_and_labels(tmp_path, lm):
    url = tmp_path / "gpqa"
    hr.run(tiny_cfg(url, **{"harvest.layers": [2, 4]}), progress=False)
    c = assert_matches(lm, url, [2, 4])
    seqs = c.sequences().to_pylist()
    assert len(seqs) == 6 and all(s["source"] == "supergpqa" for s in seqs)
    roles, labels, sid = np.asarray(c.roles[:]), np.asarray(c.labels[:]), np.asarray(c.seq_ids[:])
    pos = np.asarray(c.positions[:])
    for s in seqs:
        m = sid == s["seq_id"]
        order = np.argsort(pos[m], kind="stable")  # rows may be written permuted (mix_window)
        r, lab = roles[m][order], labels[m][order]
        assert (r[: s["prompt_len"]] == cf.ROLE_PROMPT).all() and (lab[: s["prompt_len"]] == cf.LABEL_NONE).all()
        resp = r[s["prompt_len"] :]
        assert set(resp.tolist()) <= {cf.ROLE_THINKING, cf.ROLE_ANSWER}
        assert (lab[s["prompt_len"] :] == (cf.LABEL_CORRECT if s["correct"] else cf.LABEL_WRONG)).all()
        assert s["forced"] == s["truncated"]  # the tiny profile forces exactly the rollouts that did not answer
        assert s["parsed"] in "ABCDEFGHIJ"[: s["n_options"]] and s["correct"] == (s["parsed"] == s["gold"])
        assert (resp[-1] == cf.ROLE_ANSWER) and np.all(np.diff(resp) >= 0)  # thinking, then answer
    # adding a layer later reuses the stored rollouts: nothing is generated again
    import shutil

    shutil.rmtree(str(url) + ".rollouts")
    s2 = hr.run(tiny_cfg(url, **{"harvest.layers": [6]}), progress=False)
    assert s2["units"] == 0
    assert_matches(lm, url, [2, 4, 6], seed=2)


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


def test_generated_rollouts_are_never_generated_again(tmp_path, lm):
    import shutil

    url = tmp_path / "gen"
    flags = {"harvest.layers": [1], "supergpqa.questions": 4}
    hr.run(tiny_cfg(url, **flags), progress=False)
    first = cf.open_cache(url).sequences().to_pylist()
    shutil.rmtree(url)  # as if the process died after generating, before any commit
    # a backend that cannot run: any generation attempt would fail with a UserError
    cfg = tiny_cfg(url, **flags, **{"supergpqa.backend": "vllm", "supergpqa.vllm.python": str(tmp_path / "none")})
    hr.run(cfg, progress=False)
    again = cf.open_cache(url).sequences().to_pylist()
    assert [s["token_ids"] for s in again] == [s["token_ids"] for s in first]
    # changed generation settings do not reuse them
    cfg = tiny_cfg(
        tmp_path / "other",
        **flags,
        **{"supergpqa.backend": "vllm", "supergpqa.max_new_tokens": 5, "supergpqa.vllm.python": str(tmp_path / "none")},
    )
    with pytest.raises(cf.UserError, match="make vllm-env"):
        hr.run(cfg, progress=False)


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
