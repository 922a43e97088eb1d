"""Reading a published SAE's tensors and making them one of train.sae's kinds: the file readers,
the checks on the four weights, their orientation read off the bias lengths, and the build with
k or the thresholds and the normalizer.

Shared by every layout loader in published.py, which only decides what to read and how to encode;
`SAEFormatError` lives here so that run-directory code can raise it without loading the layouts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cache_format.errors import UserError

from .sae import SAE, JumpReLUSAE, ReLUSAE, TopKSAE

__all__ = [
    "SAEFormatError",
    "WEIGHT_KEYS",
    "read_pt",
    "read_safetensors",
    "read_npz",
    "read_json",
    "weight_tensors",
    "oriented",
    "build_topk",
    "build_jumprelu",
    "build_relu",
]

WEIGHT_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


class SAEFormatError(UserError):
    """An SAE file or directory is missing, ambiguous or corrupt."""


def read_pt(p: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and truncation errors all mean the same to a user
        raise SAEFormatError(
            f"{p}: not a readable PyTorch file ({type(e).__name__}); re-download or re-export it"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SAEFormatError(f"{p}: holds a {type(obj).__name__}, not a state dict of SAE tensors")
    return obj


def read_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SAEFormatError(
            f"{p}: not a readable safetensors file ({str(e).splitlines()[0][:80]}); re-download or re-export it"
        ) from None


def read_npz(p: Path) -> dict[str, torch.Tensor]:
    """A numpy archive of plain arrays (Gemma Scope's params.npz); object arrays are refused, not unpickled."""
    import zipfile

    import numpy as np

    try:
        with np.load(p, allow_pickle=False) as z:
            return {key: torch.from_numpy(np.ascontiguousarray(z[key])) for key in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise SAEFormatError(f"{p}: not a readable .npz of plain arrays ({type(e).__name__}); re-download it") from None


def read_json(p: Path) -> dict[str, Any]:
    try:
        out = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SAEFormatError(f"{p}: not valid JSON ({e}); re-download or re-export it") from None
    if not isinstance(out, dict):
        raise SAEFormatError(f"{p}: expected a JSON object")
    return out


def weight_tensors(p: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    missing = [key for key in WEIGHT_KEYS if key not in tensors]
    if missing:
        have = ", ".join(list(tensors)[:6])
        raise SAEFormatError(f"{p}: missing SAE tensors {', '.join(missing)} (found: {have}); not a TopK SAE file")
    out = {}
    for key in WEIGHT_KEYS:
        t = tensors[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise SAEFormatError(f"{p}: {key} is not a floating-point tensor; the file is corrupt")
        out[key] = t.float()
    return out


def oriented(p: Path, w: dict[str, torch.Tensor], expect: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(W_enc (d_in, d_sae), W_dec (d_sae, d_in), stored orientation) from the bias lengths.

    `expect` is the orientation the layout's name implies ("000" or "qwen_scope"); it
    settles the square case and must agree with the shapes otherwise.
    """
    b_enc, b_dec, W_enc, W_dec = w["b_enc"], w["b_dec"], w["W_enc"], w["W_dec"]
    if b_enc.dim() != 1 or b_dec.dim() != 1 or W_enc.dim() != 2 or W_dec.dim() != 2:
        raise SAEFormatError(f"{p}: tensors have the wrong rank (W_* must be 2-D, b_* 1-D); the file is corrupt")
    d_sae, d_in = b_enc.shape[0], b_dec.shape[0]
    sae_first = W_enc.shape == (d_sae, d_in) and W_dec.shape == (d_in, d_sae)
    in_first = W_enc.shape == (d_in, d_sae) and W_dec.shape == (d_sae, d_in)
    if not (sae_first or in_first):
        raise SAEFormatError(
            f"{p}: shapes do not fit together (W_enc {tuple(W_enc.shape)}, W_dec {tuple(W_dec.shape)}, "
            f"b_enc {d_sae}, b_dec {d_in}); the file is corrupt or not a TopK SAE"
        )
    if sae_first and in_first:  # d_in == d_sae: only the layout's name can tell
        if expect is None:
            raise SAEFormatError(
                f"{p}: square SAE (d_in = d_sae = {d_in}) in an unnamed layout: "
                "orientation is ambiguous; "
                "rename it like the card (sae_L11_n4096_k32.pt or layer11.sae.pt)"
            )
        orient = expect
    else:
        orient = "qwen_scope" if sae_first else "000"
        if expect is not None and expect != orient:
            raise SAEFormatError(
                f"{p}: named like a {'Qwen-Scope' if expect == 'qwen_scope' else '000'} SAE but its "
                f"W_enc is {tuple(W_enc.shape)}; the layout is ambiguous, rename the file"
            )
    if orient == "qwen_scope":
        return W_enc.T.contiguous(), W_dec.T.contiguous(), orient
    return W_enc, W_dec, orient


def build_topk(
    p: Path,
    w: dict,
    W_enc,
    W_dec,
    k: int | None,
    *,
    relu: bool,
    subtract_b_dec: bool,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> TopKSAE:
    d_in, d_sae = W_enc.shape
    if k is None:
        raise SAEFormatError(f"{p}: k is not recorded in the file, its config or its name; pass --k K")
    if not 0 < k < d_sae:
        raise SAEFormatError(f"{p}: k={k} must be between 1 and d_sae-1={d_sae - 1}; pass a valid --k")
    return _filled(p, TopKSAE(d_in, d_sae, k, relu=relu, subtract_b_dec=subtract_b_dec), w, W_enc, W_dec, mean, std)


def build_jumprelu(p: Path, w: dict, W_enc, W_dec, threshold, *, subtract_b_dec: bool) -> JumpReLUSAE:
    """A JumpReLU SAE (SAELens "jumprelu", Gemma Scope): its per-latent `threshold` is required."""
    d_in, d_sae = W_enc.shape
    if threshold is None:
        raise SAEFormatError(f"{p}: a JumpReLU SAE without its threshold tensor; re-export it with the thresholds")
    t = torch.as_tensor(threshold, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(d_sae)
    if t.numel() != d_sae or not torch.isfinite(t).all() or (t < 0).any():
        raise SAEFormatError(f"{p}: threshold has {t.numel()} values, expected {d_sae} finite non-negative ones")
    sae = _filled(p, JumpReLUSAE(d_in, d_sae, subtract_b_dec=subtract_b_dec), w, W_enc, W_dec)
    with torch.no_grad():
        sae.threshold.copy_(t)
    return sae


def build_relu(p: Path, w: dict, W_enc, W_dec, *, subtract_b_dec: bool) -> ReLUSAE:
    """A ReLU SAE (SAELens "standard")."""
    d_in, d_sae = W_enc.shape
    return _filled(p, ReLUSAE(d_in, d_sae, subtract_b_dec=subtract_b_dec), w, W_enc, W_dec)


def _filled(p: Path, sae: SAE, w: dict, W_enc, W_dec, mean=None, std=None):
    d_in = W_enc.shape[0]
    for name, t in (("W_enc", W_enc), ("W_dec", W_dec), ("b_enc", w["b_enc"]), ("b_dec", w["b_dec"])):
        if not torch.isfinite(t).all():
            raise SAEFormatError(f"{p}: {name} holds NaN or inf values; the file is corrupt")
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.copy_(w["b_enc"])
        sae.b_dec.copy_(w["b_dec"])
        if mean is not None:
            sae.input_mean.copy_(_vec(p, "input_mean", mean, d_in))
        if std is not None:
            s = _vec(p, "input_std", std, d_in)
            if not (s > 0).all():
                raise SAEFormatError(f"{p}: input_std has non-positive entries; the normalizer is corrupt")
            sae.input_scale.copy_(s)
    return sae


def _vec(p: Path, name: str, v: Any, d_in: int) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(d_in)
    if t.numel() != d_in or not torch.isfinite(t).all():
        raise SAEFormatError(f"{p}: {name} has {t.numel()} finite values, expected {d_in}; the normalizer is corrupt")
    return t.clone()
