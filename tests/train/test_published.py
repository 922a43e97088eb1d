"""Each seed card's layout round-trips against that card's own encode/decode, written here
from the card text; bad files get one-line errors."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from train.published import SAEFormatError, detect_layout, load_sae

D_IN, D_SAE, K = 24, 64, 6


def _rand(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*s, generator=g) * 0.3 for n, s in shapes.items()}


def _x(n=50, seed=7):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


# --- reference implementations, as the cards write them -------------------------------------


class CardTopKSAE(nn.Module):
    """The `000_*` / `001_*` cards' class: pre = (x - b_dec) @ W_enc + b_enc, relu on top-k."""

    def __init__(self, d_in, n, k):
        super().__init__()
        self.W_enc = nn.Parameter(torch.empty(d_in, n))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.empty(n, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.k = k

    def encode(self, x):
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        top_v, top_i = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre)
        z.scatter_(-1, top_i, F.relu(top_v))
        return z

    def decode(self, z):
        return z @ self.W_dec + self.b_dec


def qwen_scope_reference(sd, x, k):
    """The `003_*` card's get_feature_acts; the card has no decoder, so acts @ W_dec.T + b_dec."""
    pre_acts = x @ sd["W_enc"].T + sd["b_enc"]
    topk_vals, topk_idx = pre_acts.topk(k, dim=-1)
    acts = torch.zeros_like(pre_acts)
    acts.scatter_(-1, topk_idx, topk_vals)
    return acts, acts @ sd["W_dec"].T + sd["b_dec"]


def _check(sae, z_ref, xhat_ref, x):
    with torch.no_grad():
        torch.testing.assert_close(sae.dense(x), z_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), xhat_ref, rtol=1e-5, atol=1e-5)


# --- round trips ---------------------------------------------------------------------------


def test_000_plain_state_dict_pt(tmp_path):
    sd = _rand(0, {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)})
    path = tmp_path / f"sae_L11_n{D_SAE}_k{K}.pt"
    torch.save(sd, path)
    ref = CardTopKSAE(D_IN, D_SAE, K)
    ref.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    sae = load_sae(path)
    assert (sae.k, sae.cfg["layout"], sae.cfg["layer"]) == (K, "topk_pt", 11)
    x = _x()
    with torch.no_grad():
        z = ref.encode(x)
        _check(sae, z, ref.decode(z), x)


def test_001_sae_lens_card_files_and_directory(tmp_path):
    sd = _rand(1, {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)})
    cfg = {
        "architecture": "topk",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "k": K,
        "apply_b_dec_to_input": True,
        "hook_name": "blocks.31.hook_resid_post",
        "normalize_activations": "none",
    }
    # The 001 card's file names: sae_L31_latest.safetensors beside sae_L31_cfg.json.
    save_file(sd, tmp_path / "sae_L31_latest.safetensors")
    (tmp_path / "sae_L31_cfg.json").write_text(json.dumps(cfg))
    ref = CardTopKSAE(D_IN, D_SAE, K)
    ref.load_state_dict(sd, strict=True)
    x = _x()
    with torch.no_grad():
        z = ref.encode(x)
        xhat = ref.decode(z)
    sae = load_sae(tmp_path / "sae_L31_latest.safetensors")
    assert (sae.k, sae.cfg["layout"], sae.cfg["layer"]) == (K, "sae_lens", 31)
    _check(sae, z, xhat, x)
    # The sae_lens directory layout (also this project's export), k in activation_fn_kwargs.
    d = tmp_path / "export"
    d.mkdir()
    save_file(sd, d / "sae_weights.safetensors")
    (d / "cfg.json").write_text(
        json.dumps(
            {
                "d_in": D_IN,
                "d_sae": D_SAE,
                "activation_fn_str": "topk",
                "activation_fn_kwargs": {"k": K},
                "hook_layer": 31,
            }
        )
    )
    sae = load_sae(d)
    assert sae.k == K and sae.cfg["layer"] == 31
    _check(sae, z, xhat, x)


def test_003_qwen_scope_no_relu_no_b_dec(tmp_path):
    sd = _rand(2, {"W_enc": (D_SAE, D_IN), "W_dec": (D_IN, D_SAE), "b_enc": (D_SAE,), "b_dec": (D_IN,)})
    sd["b_dec"] += 1.0  # would change the codes if it were (wrongly) subtracted
    sd["b_enc"] -= 4.0  # pushes some kept top-k values below zero
    d = tmp_path / f"SAE-Res-Tiny-W64-L0_{K}"
    d.mkdir()
    torch.save(sd, d / "layer3.sae.pt")
    sae = load_sae(d / "layer3.sae.pt")
    assert (sae.k, sae.cfg["layout"], sae.cfg["layer"]) == (K, "qwen_scope", 3)
    assert not sae.relu and not sae.subtract_b_dec
    x = _x()
    acts, xhat = qwen_scope_reference(sd, x, K)
    assert (acts < 0).any()  # values kept without ReLU: the test would catch a ReLU
    _check(sae, acts, xhat, x)


@pytest.mark.parametrize("sae_first", [False, True])
def test_004_model_safetensors_with_normalizer(tmp_path, sae_first):
    g = torch.Generator().manual_seed(3)
    W_enc = torch.randn(D_IN, D_SAE, generator=g) * 0.3
    W_dec = torch.randn(D_SAE, D_IN, generator=g) * 0.3
    b_enc, b_dec = torch.randn(D_SAE, generator=g) * 0.1, torch.randn(D_IN, generator=g) * 0.1
    mean, std = torch.randn(D_IN, generator=g), torch.rand(D_IN, generator=g) + 0.5
    stored = {
        "W_enc": W_enc.T.contiguous() if sae_first else W_enc,
        "W_dec": W_dec.T.contiguous() if sae_first else W_dec,
        "b_enc": b_enc,
        "b_dec": b_dec,
    }
    save_file(stored, tmp_path / "model.safetensors")
    meta = {
        "architecture": {"type": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": K},
        "normalizer": {"input_mean": mean.tolist(), "input_std": std.tolist()},
        "model": {"name": "Qwen/Qwen3-8B", "hookpoint": "layers.35"},
    }
    (tmp_path / "model.metadata.json").write_text(json.dumps(meta))
    x = _x()
    # Our documented reading of the card: normalize, TopK SAE as 000, map back.
    xn = (x - mean) / std
    pre = (xn - b_dec) @ W_enc + b_enc
    v, i = pre.topk(K, dim=-1)
    z = torch.zeros_like(pre).scatter_(-1, i, F.relu(v))
    xhat = (z @ W_dec + b_dec) * std + mean
    sae = load_sae(tmp_path)
    assert (sae.k, sae.cfg["layout"]) == (K, "metadata_json")
    _check(sae, z, xhat, x)


def test_explicit_k_wins_and_missing_k_is_an_error(tmp_path):
    sd = _rand(4, {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)})
    p = tmp_path / "mysae.pt"
    torch.save(sd, p)
    with pytest.raises(SAEFormatError, match="pass --k"):
        load_sae(p)
    assert load_sae(p, k=5).k == 5


# --- refusals ------------------------------------------------------------------------------


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and len(msg) < 300
    return msg


def test_corrupt_and_ambiguous_files(tmp_path):
    sd = _rand(5, {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)})
    cases = {}
    junk = tmp_path / "sae_L1_n64_k6.pt"
    junk.write_bytes(b"\x80\x04 definitely not a torch file" * 10)
    cases["not a readable PyTorch file"] = junk

    good = tmp_path / "good_k6.safetensors"
    save_file(sd, good)
    trunc = tmp_path / "trunc_k6.safetensors"
    trunc.write_bytes(good.read_bytes()[:200])
    cases["not a readable safetensors"] = trunc

    missing = tmp_path / "missing_k6.pt"
    torch.save({k: v for k, v in sd.items() if k != "b_dec"}, missing)
    cases["missing SAE tensors b_dec"] = missing

    bad_shape = tmp_path / "shape_k6.pt"
    torch.save({**sd, "W_dec": torch.zeros(D_SAE, D_IN + 1)}, bad_shape)
    cases["shapes do not fit"] = bad_shape

    sq = {
        "W_enc": torch.randn(D_IN, D_IN),
        "W_dec": torch.randn(D_IN, D_IN),
        "b_enc": torch.zeros(D_IN),
        "b_dec": torch.zeros(D_IN),
    }
    square = tmp_path / "square.pt"
    torch.save(sq, square)
    cases["ambiguous"] = square

    wrong_name = tmp_path / "layer2.sae.pt"
    torch.save(sd, wrong_name)  # named Qwen-Scope, shaped 000
    cases["named like a Qwen-Scope"] = wrong_name

    nan = tmp_path / "nan_k6.pt"
    torch.save({**sd, "W_enc": sd["W_enc"].clone().fill_(float("nan"))}, nan)
    cases["NaN"] = nan

    two = tmp_path / "two"
    two.mkdir()
    torch.save(sd, two / "a_k6.pt")
    torch.save(sd, two / "b_k6.pt")
    cases["several SAE files"] = two

    mism = tmp_path / "mism"
    mism.mkdir()
    save_file(sd, mism / "sae_weights.safetensors")
    (mism / "cfg.json").write_text(json.dumps({"d_in": D_IN + 1, "d_sae": D_SAE, "k": K}))
    cases["mismatched"] = mism

    for arch, needle in (("jumprelu", "JumpReLU SAE without its threshold"), ("gated", "'gated' is not supported")):
        d = tmp_path / arch
        d.mkdir()
        save_file(sd, d / "sae_weights.safetensors")  # no threshold tensor
        (d / "cfg.json").write_text(json.dumps({"architecture": arch, "d_in": D_IN, "d_sae": D_SAE}))
        cases[needle] = d

    cases["no such SAE"] = tmp_path / "nope.pt"

    for needle, path in cases.items():
        with pytest.raises(SAEFormatError) as e:
            load_sae(path)
        assert needle in _one_line(e), (needle, str(e.value))


def test_detect_layout_prefers_the_sae_lens_export_in_a_run_directory(tmp_path):
    # train's export writes cfg.json + sae_weights.safetensors and the 000 .pt beside them.
    sd = _rand(6, {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)})
    save_file(sd, tmp_path / "sae_weights.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE, "k": K}))
    torch.save(sd, tmp_path / f"sae_L1_n{D_SAE}_k{K}.pt")
    assert detect_layout(tmp_path)[0] == "sae_lens"
    a, b = load_sae(tmp_path), load_sae(tmp_path / f"sae_L1_n{D_SAE}_k{K}.pt")
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_repository_directory_needs_a_layer(tmp_path):
    # Qwen-Scope ships layer0.sae.pt … layer31.sae.pt in one repository directory.
    repo = tmp_path / f"SAE-Res-Tiny-W64-L0_{K}"
    repo.mkdir()
    sds = {}
    for n in range(3):
        sds[n] = _rand(10 + n, {"W_enc": (D_SAE, D_IN), "W_dec": (D_IN, D_SAE), "b_enc": (D_SAE,), "b_dec": (D_IN,)})
        torch.save(sds[n], repo / f"layer{n}.sae.pt")
    with pytest.raises(SAEFormatError, match="pass --layer N"):
        load_sae(repo)
    sae = load_sae(repo, layer=1)
    assert sae.cfg["layer"] == 1 and sae.k == K
    x = _x()
    acts, xhat = qwen_scope_reference(sds[1], x, K)
    _check(sae, acts, xhat, x)
    with pytest.raises(SAEFormatError, match="no SAE file for layer 7"):
        load_sae(repo, layer=7)


# --- Gemma Scope and dictionary_learning, against their own encode written from their code ---


def gemma_scope_reference(p, x):
    """Gemma Scope's JumpReLU as its tutorial writes it: no b_dec on the way in."""
    pre = x @ p["W_enc"] + p["b_enc"]
    acts = (pre > p["threshold"]) * F.relu(pre)
    return acts, acts @ p["W_dec"] + p["b_dec"]


def test_gemma_scope_params_npz(tmp_path):
    import numpy as np

    p = _rand(11, {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_enc": (D_SAE,), "b_dec": (D_IN,)})
    p["b_dec"] += 1.0  # subtracting it (wrongly) would change the codes
    p["threshold"] = torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)) * 0.8
    d = tmp_path / "layer_12" / "width_16k" / "average_l0_82"
    d.mkdir(parents=True)
    np.savez(d / "params.npz", **{n: t.numpy() for n, t in p.items()})
    x = _x()
    acts, xhat = gemma_scope_reference(p, x)
    assert ((acts == 0) & (x @ p["W_enc"] + p["b_enc"] > 0)).any()  # the threshold gates some positives
    for path in (d / "params.npz", d):
        sae = load_sae(path)
        assert (sae.architecture, sae.cfg["layout"], sae.cfg["layer"]) == ("jumprelu", "gemma_scope", 12)
        _check(sae, acts, xhat, x)


def test_gemma_scope_without_thresholds_or_with_pickles_is_one_line(tmp_path):
    import numpy as np

    p = _rand(12, {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_enc": (D_SAE,), "b_dec": (D_IN,)})
    np.savez(tmp_path / "params.npz", **{n: t.numpy() for n, t in p.items()})
    with pytest.raises(SAEFormatError, match="without its threshold"):
        load_sae(tmp_path / "params.npz")
    np.savez(tmp_path / "obj.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(SAEFormatError, match="plain arrays"):
        load_sae(tmp_path / "obj.npz")


def _dictionary_learning(tmp_path, dict_class, sd, **trainer):
    d = tmp_path / dict_class
    d.mkdir()
    torch.save(sd, d / "ae.pt")
    cfg = {"trainer": {"dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE, "layer": 5, **trainer}}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _linear_sd(seed, bias_name):
    w = _rand(seed, {"enc": (D_SAE, D_IN), "dec": (D_IN, D_SAE), "b_enc": (D_SAE,), "b_dec": (D_IN,)})
    return {"encoder.weight": w["enc"], "encoder.bias": w["b_enc"], "decoder.weight": w["dec"], bias_name: w["b_dec"]}


def test_dictionary_learning_batchtopk_and_matryoshka_encode_with_their_threshold(tmp_path):
    sd = _linear_sd(21, "b_dec")
    sd.update(k=torch.tensor(K, dtype=torch.int), threshold=torch.tensor(0.35))
    x = _x()
    f = F.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])  # their encode(use_threshold)
    acts = f * (f > sd["threshold"])
    assert ((f > 0) & (acts == 0)).any()
    sae = load_sae(_dictionary_learning(tmp_path, "BatchTopKSAE", sd, k=K))
    assert (sae.architecture, sae.cfg["layout"], sae.cfg["layer"]) == ("jumprelu", "dictionary_learning", 5)
    _check(sae, acts, acts @ sd["decoder.weight"].T + sd["b_dec"], x)

    m = {"W_enc": sd["encoder.weight"].T, "b_enc": sd["encoder.bias"], "W_dec": sd["decoder.weight"].T}
    m.update(b_dec=sd["b_dec"], k=sd["k"], threshold=sd["threshold"], group_sizes=torch.tensor([16, 48]))
    sae = load_sae(_dictionary_learning(tmp_path, "MatryoshkaBatchTopKSAE", m, k=K) / "ae.pt")
    _check(sae, acts, acts @ m["W_dec"] + m["b_dec"], x)

    sd["threshold"] = torch.tensor(-1.0)  # never estimated: their encode is plain ReLU
    (tmp_path / "unset").mkdir()
    sae = load_sae(_dictionary_learning(tmp_path / "unset", "BatchTopKSAE", sd, k=K))
    _check(sae, f, f @ sd["decoder.weight"].T + sd["b_dec"], x)


def test_dictionary_learning_jumprelu_topk_and_standard(tmp_path):
    x = _x()
    j = _rand(31, {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_enc": (D_SAE,), "b_dec": (D_IN,)})
    j["threshold"] = torch.rand(D_SAE, generator=torch.Generator().manual_seed(4)) * 0.5
    pre = x @ j["W_enc"] + j["b_enc"]  # apply_b_dec_to_input is False in what it trains
    acts = F.relu(pre * (pre > j["threshold"]))
    sae = load_sae(_dictionary_learning(tmp_path, "JumpReluAutoEncoder", j) / "config.json")
    _check(sae, acts, acts @ j["W_dec"] + j["b_dec"], x)

    t = _linear_sd(32, "b_dec")
    t["k"] = torch.tensor(K, dtype=torch.int)
    pre = (x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"]
    v, i = F.relu(pre).topk(K, dim=-1)
    acts = torch.zeros_like(pre).scatter_(-1, i, v)
    sae = load_sae(_dictionary_learning(tmp_path, "AutoEncoderTopK", t, k=K))
    assert (sae.architecture, sae.k) == ("topk", K)
    _check(sae, acts, acts @ t["decoder.weight"].T + t["b_dec"], x)

    s = _linear_sd(33, "bias")
    acts = F.relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
    sae = load_sae(_dictionary_learning(tmp_path, "AutoEncoder", s))
    assert sae.architecture == "relu"
    _check(sae, acts, acts @ s["decoder.weight"].T + s["bias"], x)


def test_dictionary_learning_unsupported_class_is_one_line(tmp_path):
    d = _dictionary_learning(tmp_path, "GatedAutoEncoder", _linear_sd(34, "b_dec"))
    with pytest.raises(SAEFormatError, match="dict_class 'GatedAutoEncoder' is not supported"):
        load_sae(d)
