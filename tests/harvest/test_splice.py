"""Loss recovered on the tiny real-architecture model: exact SAE ≈ 1, zero SAE ≈ 0, and a
partial SAE matches the value computed by hand from direct hooks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harvest import tiny
from harvest.config import ModelConfig
from harvest.model import load_model
from harvest.splice import loss_recovered
from train.sae import JumpReLUSAE, ReLUSAE, TopKSAE

LAYER = 3


@pytest.fixture(scope="module")
def lm():
    return load_model(ModelConfig(name_or_path="builtin:tiny", dtype="float32", device_map="cpu"))


@pytest.fixture(scope="module")
def sequences(lm):
    ids = np.asarray(lm.tokenizer((tiny.assets() / "corpus.txt").read_text())["input_ids"])
    # Two lengths, so that batching by length is exercised too.
    return [ids[i : i + 48] for i in range(0, 48 * 5, 48)] + [ids[1000:1033], ids[2000:2033]]


def signed_basis(sae, d: int):
    """±basis directions in W_enc and W_dec, zero biases: relu(±x) keeps |x_i| on the right
    sign, so the decoder returns x exactly (for any kind that keeps those codes)."""
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def identity_sae(d: int, keep: int | None = None) -> TopKSAE:
    """The signed basis as a TopK with k = d. With `keep`, only the first `keep` dimensions are decoded."""
    sae = signed_basis(TopKSAE(d, 2 * d, d), d)
    if keep is not None:
        with torch.no_grad():
            sae.W_dec[:, keep:] = 0
    return sae


def _direct_ce(lm, sequences, hook_fn=None):
    """Mean next-token CE computed independently of harvest.splice (own hook, own loop)."""
    handle = None
    if hook_fn is not None:

        def hook(_m, _a, out):
            return (hook_fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else hook_fn(out)

        handle = lm.layers[LAYER].register_forward_hook(hook)
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for s in sequences:
                ids = torch.as_tensor(np.asarray(s, dtype=np.int64))[None]
                logits = lm.model(input_ids=ids).logits[0, :-1]
                total += float(F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum"))
                n += ids.shape[1] - 1
    finally:
        if handle is not None:
            handle.remove()
    return total / n


def test_exact_reconstruction_recovers_everything(lm, sequences):
    out = loss_recovered(lm.model, lm.layers[LAYER], identity_sae(lm.d_model), sequences, batch_size=3, progress=False)
    assert out["ce_zero"] - out["ce_clean"] > 1.0  # the tiny model has a real gap, the natural way round
    assert out["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert out["kl_sae"] == pytest.approx(0.0, abs=1e-5)
    assert out["kl_zero"] > 0.1
    assert out["tokens"] == sum(len(s) - 1 for s in sequences)


def test_zero_output_recovers_nothing(lm, sequences):
    sae = identity_sae(lm.d_model, keep=0)
    out = loss_recovered(lm.model, lm.layers[LAYER], sae, sequences, progress=False)
    assert out["loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert out["kl_sae"] == pytest.approx(out["kl_zero"], rel=1e-4)


def test_partial_sae_matches_hand_computed(lm, sequences, monkeypatch):
    from harvest import splice

    # the decoder stack and the LM head run apart, so logits exist only a chunk of positions at a time
    monkeypatch.setattr(splice, "POSITION_CHUNK", 4)
    positions = []  # per call of the LM head
    head = lm.model.get_output_embeddings().register_forward_hook(lambda m, a, o: positions.append(a[0].shape[1]))
    d, keep = lm.d_model, lm.d_model // 2  # decode only the first half of the dimensions (≈0.48 here)
    try:
        out = loss_recovered(lm.model, lm.layers[LAYER], identity_sae(d, keep=keep), sequences, progress=False)
    finally:
        head.remove()
    assert positions and max(positions) <= 4

    def keep_first(h):
        h = h.clone()
        h[..., keep:] = 0
        return h

    ce_clean = _direct_ce(lm, sequences)
    ce_zero = _direct_ce(lm, sequences, torch.zeros_like)
    ce_part = _direct_ce(lm, sequences, keep_first)
    want = (ce_zero - ce_part) / (ce_zero - ce_clean)
    assert out["ce_clean"] == pytest.approx(ce_clean, rel=1e-5)
    assert out["ce_zero"] == pytest.approx(ce_zero, rel=1e-5)
    assert out["ce_sae"] == pytest.approx(ce_part, rel=1e-5)
    assert out["loss_recovered"] == pytest.approx(want, abs=1e-4)
    # genuinely partial, and in the natural order clean < partial < zero-ablated
    assert ce_clean < ce_part < ce_zero and 0.05 < want < 0.95, (ce_clean, ce_part, ce_zero)


def test_every_kind_splices_by_its_own_inference_form(lm, sequences):
    """ReLU on the ±basis is exact; a JumpReLU with threshold t drops every |h_i| <= t, which the
    reference applies to the hidden states by hand."""
    d = lm.d_model
    out = loss_recovered(lm.model, lm.layers[LAYER], signed_basis(ReLUSAE(d, 2 * d), d), sequences, progress=False)
    assert out["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    t = 0.3
    sae = signed_basis(JumpReLUSAE(d, 2 * d, init_threshold=t), d)
    out = loss_recovered(lm.model, lm.layers[LAYER], sae, sequences, progress=False)
    want = _direct_ce(lm, sequences, lambda h: (h.float() * (h.float().abs() > t)).to(h.dtype))
    assert out["ce_sae"] == pytest.approx(want, rel=1e-4)
    assert 0.0 < out["loss_recovered"] < 1.0
