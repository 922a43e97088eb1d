"""What a harvested cache must hold: the rows an independent forward computes.

The reference is a plain forward over each sampled sequence alone (no padding, no batch,
no early stop) with its own hooks; a cache's rows must match it to bf16 precision. Used by
the capture and rollout tests (tests/harvest/test_capture.py, test_rollouts.py).
"""

import numpy as np
import torch

import cache_format as cf
from harvest.config import load_config


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
