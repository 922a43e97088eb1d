"""Load the published SAE layouts (the seed cards', SAELens') into one of train.sae's kinds.

`load_sae(path, k=None)` detects the layout from the files and tensor shapes:

- `000` plain state dict `.pt` (W_enc (d_in, d_sae), W_dec (d_sae, d_in)); k from the
  name `…_k32.pt`. Encodes relu(topk((x − b_dec) @ W_enc + b_enc)).
- `001` / sae_lens: `cfg.json` + `sae_weights.safetensors` in a directory (also this
  project's exports), or `sae_L11_latest.safetensors` beside `sae_L11_cfg.json`. Same
  orientation and encoding as `000`, unless the config says `apply_b_dec_to_input: false`.
  Its `architecture` picks the kind: "topk", "jumprelu" (a `threshold` tensor per latent:
  this project's batchtopk, matryoshka and jumprelu exports, as SAELens' own) or "standard"
  (ReLU).
  SAELens 6 configs keep hook_name and the rest in a `metadata` block, read as well. With
  `rescale_acts_by_decoder_norm: true` SAELens scales the pre-activations by each decoder
  row's norm before the top-k and divides it out in the decoder; that is folded into the
  weights on load (W_enc and b_enc times the norms, W_dec rows over them), so the codes and
  the reconstruction are SAELens' own.
- `003` Qwen-Scope `layer{n}.sae.pt`: W_enc (d_sae, d_model), W_dec (d_model, d_sae).
  The card encodes topk(x @ W_enc.T + b_enc) and keeps the values as they are (no ReLU,
  no b_dec subtraction); it shows no decoder, so we decode acts @ W_dec.T + b_dec.
- Gemma Scope `params.npz` (W_enc (d_in, d_sae), W_dec, b_enc, b_dec, threshold): JumpReLU on
  x itself, relu(pre) where pre > threshold; the layer from a `layer_{n}` directory.
- `dictionary_learning` `ae.pt` + `config.json` (its `trainer.dict_class` names the kind):
  BatchTopKSAE and MatryoshkaBatchTopKSAE encode relu(enc(x − b_dec)) above their scalar
  threshold (a JumpReLU with that threshold for every latent; none estimated yet, -1, is plain
  ReLU, as their own encode), JumpReluAutoEncoder as Gemma Scope, AutoEncoderTopK as TopK and
  AutoEncoder (the standard trainer) as ReLU with `bias` subtracted and added back.
- `004` `model.safetensors` + `model.metadata.json` (no code published; our assumptions):
  keys W_enc/W_dec/b_enc/b_dec, orientation read off the bias lengths, the SAE applied to
  (x − input_mean) / input_std with the output mapped back (the normalizer's vectors come
  from the metadata, or from the safetensors when stored there), encoding as `000`.

k comes from the file, its config or its name, else the `k` argument (an explicit `k`
always wins: TopK SAEs are often evaluated at another k). Anything ambiguous, missing or
corrupt raises `SAEFormatError` with one line naming the file and the fix.

Below: what a file's name says; reading and checking the tensors and building the kind (the
file readers, the checks on the four weights, their orientation read off the bias lengths);
then one loader per layout, and what an exported SAE records of its training (layer, cache).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from cache_format.errors import UserError

from .sae import SAE, JumpReLUSAE, ReLUSAE, TopKSAE

# -- what a file's name says -------------------------------------------------------------------

QWEN_SCOPE_NAME = re.compile(r"layer(\d+)\.sae\.pt")
K_IN_NAME = [
    re.compile(r"(?:^|[_\-.])k(\d+)(?=[_\-.]|$)"),
    re.compile(r"topk[_\-]?(\d+)", re.I),
    re.compile(r"L0[_\-](\d+)"),
]
LAYER_IN_NAME = [re.compile(r"(?:^|[_\-.])L(\d+)(?=[_\-.])"), re.compile(r"^layer(\d+)\.")]


def k_from_name(p: Path) -> int | None:
    """`sae_L11_n4096_k32.pt` → 32; `…-W64K-L0_50/layer3.sae.pt` → 50; `…-topk64/…` → 64."""
    for part in [p.name] + [q.name for q in p.parents][:2]:
        for rx in K_IN_NAME:
            m = rx.search(part)
            if m:
                return int(m.group(1))
    return None


def layer_from_name(p: Path) -> int | None:
    for rx in LAYER_IN_NAME:
        m = rx.search(p.name)
        if m:
            return int(m.group(1))
    return None


# -- reading and checking the tensors, building the SAE ----------------------------------------

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


# -- the layouts -------------------------------------------------------------------------------

# SAELens 6's inference architectures this loader reads -> the kind that encodes like it
SAE_LENS_KINDS = {"topk": "topk", "top_k": "topk", "jumprelu": "jumprelu", "standard": "relu"}

__all__ = ["load_sae", "detect_layout"]


def load_sae(path: str | Path, k: int | None = None, layer: int | None = None) -> SAE:
    """Any supported layout at `path` (a file or a directory) → an SAE (train.sae) on the CPU.

    `sae.cfg["layout"]` names the layout found; `layer`, the split and the provenance are
    copied into `sae.cfg` when the files record them. A published repository directory with
    one SAE per layer (`layer{n}.sae.pt`, `sae_L{n}_…`) needs `layer` to pick one.
    """
    p = Path(path)
    if not p.exists():
        raise SAEFormatError(f"{p}: no such SAE file or directory; pass --sae PATH to a published or exported SAE")
    layout, files = detect_layout(p, layer)
    loaders = {
        "topk_pt": _load_pt,
        "qwen_scope": _load_pt,
        "sae_lens": _load_sae_lens,
        "metadata_json": _load_004,
        "gemma_scope": _load_npz,
        "dictionary_learning": _load_dictionary_learning,
    }
    loader = loaders[layout]
    sae = loader(files, k)
    sae.cfg.setdefault("layout", layout)
    sae.cfg["source_path"] = str(p)
    sae.eval()
    return sae


def detect_layout(p: Path, layer: int | None = None) -> tuple[str, dict[str, Path]]:
    """(layout, the files that make it up) for a path, or a one-line refusal."""
    if p.is_dir():
        found = []
        if (p / "cfg.json").is_file() and (p / "sae_weights.safetensors").is_file():
            found.append(("sae_lens", {"weights": p / "sae_weights.safetensors", "cfg": p / "cfg.json"}))
        if (p / "ae.pt").is_file() and (p / "config.json").is_file():
            found.append(("dictionary_learning", {"weights": p / "ae.pt", "cfg": p / "config.json"}))
        if (p / "params.npz").is_file():
            found.append(("gemma_scope", {"weights": p / "params.npz"}))
        if (p / "model.safetensors").is_file() and (p / "model.metadata.json").is_file():
            found.append(("metadata_json", {"weights": p / "model.safetensors", "meta": p / "model.metadata.json"}))
        if len(found) > 1:
            kinds = " and ".join(layout for layout, _ in found)
            raise SAEFormatError(f"{p}: holds both a {kinds} SAE; pass the file you mean")
        if found:
            return found[0]
        pts = sorted(p.glob("*.pt"))
        sts = sorted(q for q in p.glob("*.safetensors"))
        if layer is not None and len(pts) + len(sts) > 1:  # a repo with one SAE per layer
            pts = [q for q in pts if layer_from_name(q) == layer]
            sts = [q for q in sts if layer_from_name(q) == layer]
            if not pts and not sts:
                raise SAEFormatError(
                    f"{p}: no SAE file for layer {layer} in this directory; pass another --layer or --sae FILE"
                )
        if len(pts) == 1 and not sts:
            return detect_layout(pts[0])
        if len(sts) == 1 and not pts:
            return detect_layout(sts[0])
        if not pts and not sts:
            raise SAEFormatError(f"{p}: no SAE files (.pt, .safetensors) in this directory; pass --sae PATH to one")
        names = ", ".join(q.name for q in (pts + sts)[:4])
        raise SAEFormatError(f"{p}: several SAE files ({names}, ...); pass --layer N or --sae PATH to one of them")
    name = p.name
    if name.endswith(".json"):
        if name == "model.metadata.json":
            return (
                detect_layout(p.with_name("model.safetensors"))
                if p.with_name("model.safetensors").exists()
                else _missing(p, "model.safetensors")
            )
        if name == "config.json" and p.with_name("ae.pt").is_file():
            return "dictionary_learning", {"weights": p.with_name("ae.pt"), "cfg": p}
        if name == "cfg.json" or name.endswith("_cfg.json"):
            weights = (
                p.with_name("sae_weights.safetensors")
                if name == "cfg.json"
                else p.with_name(name[: -len("_cfg.json")] + "_latest.safetensors")
            )
            cands = [weights] + sorted(p.parent.glob(name[: -len("cfg.json")] + "*.safetensors"))
            for w in cands:
                if w.is_file():
                    return "sae_lens", {"weights": w, "cfg": p}
            return _missing(p, "its .safetensors weights")
        raise SAEFormatError(
            f"{p}: a JSON file is not an SAE; pass the weights (.pt / .safetensors) or their directory"
        )
    if name.endswith(".safetensors"):
        if name == "model.safetensors" and p.with_name("model.metadata.json").is_file():
            return "metadata_json", {"weights": p, "meta": p.with_name("model.metadata.json")}
        cfg = _sibling_cfg(p)
        return "sae_lens", {"weights": p, **({"cfg": cfg} if cfg else {})}
    if name.endswith(".npz"):
        return "gemma_scope", {"weights": p}
    if name == "ae.pt" and p.with_name("config.json").is_file():
        return "dictionary_learning", {"weights": p, "cfg": p.with_name("config.json")}
    if name.endswith(".pt") or name.endswith(".pth"):
        return ("qwen_scope" if QWEN_SCOPE_NAME.fullmatch(name) else "topk_pt"), {"weights": p}
    raise SAEFormatError(f"{p}: unknown SAE file type; expected .pt, .safetensors, .npz or a directory of them")


def _missing(p: Path, what: str):
    raise SAEFormatError(f"{p}: {what} is missing beside it; copy the whole SAE directory")


def _sibling_cfg(weights: Path) -> Path | None:
    """The sae_lens config of a weights file: cfg.json, or the `001` card's `sae_L11_cfg.json`."""
    if weights.name == "sae_weights.safetensors" and weights.with_name("cfg.json").is_file():
        return weights.with_name("cfg.json")
    stem = weights.name[: -len(".safetensors")]
    best = None
    for c in weights.parent.glob("*_cfg.json"):
        prefix = c.name[: -len("_cfg.json")]
        if stem == prefix or stem.startswith(prefix + "_"):
            if best is None or len(prefix) > len(best.name):
                best = c
    return best


# ---------------------------------------------------------------------------------------
# the layouts


def _load_pt(files: dict[str, Path], k: int | None) -> SAE:
    p = files["weights"]
    raw = read_pt(p)
    w = weight_tensors(p, raw)
    qs_name = QWEN_SCOPE_NAME.fullmatch(p.name) is not None
    k_name = re.search(r"_n(\d+)_k(\d+)", p.name)
    expect = "qwen_scope" if qs_name else ("000" if k_name else None)
    W_enc, W_dec, orient = oriented(p, w, expect)
    k = k if k is not None else k_from_name(p)
    if "threshold" in raw and orient != "qwen_scope":  # this project's JumpReLU-form .pt beside its export
        sae = build_jumprelu(p, w, W_enc, W_dec, raw["threshold"], subtract_b_dec=True)
        sae.cfg.update(layout="topk_pt")
    elif orient == "qwen_scope":
        sae = build_topk(p, w, W_enc, W_dec, k, relu=False, subtract_b_dec=False)
        sae.cfg.update(layout="qwen_scope")
    else:
        mean, std = raw.get("input_mean"), raw.get("input_scale", raw.get("input_std"))
        sae = build_topk(p, w, W_enc, W_dec, k, relu=True, subtract_b_dec=True, mean=mean, std=std)
        sae.cfg.update(layout="topk_pt")
    layer = layer_from_name(p)
    if layer is not None:
        sae.cfg["layer"] = layer
    return sae


def _fold_decoder_norm(p: Path, W_enc, W_dec, w: dict):
    """SAELens' rescale_acts_by_decoder_norm as plain TopK weights: the same codes, the same output."""
    norm = W_dec.norm(dim=1)
    if not (norm > 0).all():
        raise SAEFormatError(f"{p}: rescale_acts_by_decoder_norm is set but a decoder row is zero; the file is corrupt")
    return W_enc * norm[None, :], W_dec / norm[:, None], dict(w, b_enc=w["b_enc"] * norm)


def _cfg_k(cfg: dict) -> int | None:
    for key in ("k", "top_k", "topk", "k_sparsity"):
        if isinstance(cfg.get(key), int) and not isinstance(cfg.get(key), bool):
            return cfg[key]
    kw = cfg.get("activation_fn_kwargs") or {}
    if isinstance(kw, dict) and isinstance(kw.get("k"), int):
        return kw["k"]
    return None


def _cfg_layer(cfg: dict) -> int | None:
    for key in ("layer", "hook_layer"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook = cfg.get("hook_name") or cfg.get("hookpoint") or meta.get("hook_name") or meta.get("hf_hook_name") or ""
    m = re.search(r"(?:blocks|layers)\.(\d+)", str(hook))
    return int(m.group(1)) if m else None


def _load_sae_lens(files: dict[str, Path], k: int | None) -> SAE:
    p = files["weights"]
    cfg = read_json(files["cfg"]) if "cfg" in files else {}
    arch = str(cfg.get("architecture") or "").lower()
    act = str(cfg.get("activation_fn_str") or cfg.get("activation_fn") or "").lower()
    if not arch:
        arch = "topk" if (not act or "topk" in act) else act
    if arch not in SAE_LENS_KINDS:
        raise SAEFormatError(
            f"{files['cfg']}: architecture {arch!r} is not supported; "
            f"supported: {', '.join(sorted(SAE_LENS_KINDS))} (SAELens' names)"
        )
    norm = str(cfg.get("normalize_activations", "none") or "none").lower()
    if norm not in ("none", "null"):
        raise SAEFormatError(
            f"{files['cfg']}: normalize_activations={norm!r} needs statistics the file does not hold; "
            "fold the normalization into the weights first"
        )
    tensors = read_safetensors(p)
    w = weight_tensors(p, tensors)
    W_enc, W_dec, orient = oriented(p, w, "000")
    for key, have in (("d_in", W_enc.shape[0]), ("d_sae", W_enc.shape[1])):
        if key in cfg and cfg[key] != have:
            raise SAEFormatError(
                f"{p}: {key}={have} in the weights but {cfg[key]} in {files.get('cfg')}; the pair is mismatched"
            )
    subtract_b_dec = bool(cfg.get("apply_b_dec_to_input", cfg.get("subtract_b_dec", True)))
    if SAE_LENS_KINDS[arch] == "jumprelu":
        sae = build_jumprelu(p, w, W_enc, W_dec, tensors.get("threshold"), subtract_b_dec=subtract_b_dec)
    elif SAE_LENS_KINDS[arch] == "relu":
        sae = build_relu(p, w, W_enc, W_dec, subtract_b_dec=subtract_b_dec)
    else:
        k = k if k is not None else (_cfg_k(cfg) or k_from_name(p))
        if cfg.get("rescale_acts_by_decoder_norm"):
            W_enc, W_dec, w = _fold_decoder_norm(p, W_enc, W_dec, w)
        sae = build_topk(p, w, W_enc, W_dec, k, relu=bool(cfg.get("relu", True)), subtract_b_dec=subtract_b_dec)
    sae.cfg.update({key: v for key, v in cfg.items() if isinstance(key, str)})
    sae.cfg["layout"] = "sae_lens"
    if hasattr(sae, "k"):
        sae.cfg["k"] = sae.k
    layer = _cfg_layer(cfg)
    if layer is None:
        layer = layer_from_name(p)
    if layer is not None:
        sae.cfg["layer"] = layer
    return sae


def _find_key(obj: Any, names: tuple[str, ...], depth: int = 0) -> Any:
    """The first value stored under one of `names` anywhere in nested dicts (breadth-first)."""
    if depth > 4 or not isinstance(obj, dict):
        return None
    for n in names:
        if n in obj:
            return obj[n]
    for v in obj.values():
        hit = _find_key(v, names, depth + 1)
        if hit is not None:
            return hit
    return None


def _load_004(files: dict[str, Path], k: int | None) -> TopKSAE:
    p, meta_p = files["weights"], files["meta"]
    meta = read_json(meta_p)
    tensors = read_safetensors(p)
    w = weight_tensors(p, tensors)
    W_enc, W_dec, _ = oriented(p, w, None if w["b_enc"].shape != w["b_dec"].shape else "000")
    mean = tensors.get("input_mean", _find_key(meta, ("input_mean",)))
    std = tensors.get("input_std", _find_key(meta, ("input_std", "input_scale")))
    if (mean is None) != (std is None):
        raise SAEFormatError(
            f"{meta_p}: the normalizer has only one of input_mean / input_std; the metadata is incomplete"
        )
    if k is None:
        found = _find_key(meta, ("k", "top_k", "topk", "k_sparsity"))
        k = found if isinstance(found, int) and not isinstance(found, bool) else k_from_name(p)
    sub = _find_key(meta, ("apply_b_dec_to_input", "subtract_b_dec"))
    sae = build_topk(
        p, w, W_enc, W_dec, k, relu=True, subtract_b_dec=True if sub is None else bool(sub), mean=mean, std=std
    )
    sae.cfg.update(layout="metadata_json", normalizer=mean is not None)
    layer = _find_key(meta, ("layer", "hook_layer"))
    if isinstance(layer, int):
        sae.cfg["layer"] = layer
    return sae


def _load_npz(files: dict[str, Path], k: int | None) -> SAE:
    """Gemma Scope's `params.npz`: JumpReLU on the residual itself (no b_dec subtracted)."""
    p = files["weights"]
    tensors = read_npz(p)
    w = weight_tensors(p, tensors)
    W_enc, W_dec, _ = oriented(p, w, "000")
    sae = build_jumprelu(p, w, W_enc, W_dec, tensors.get("threshold"), subtract_b_dec=False)
    sae.cfg["layout"] = "gemma_scope"
    layer = next((int(m.group(1)) for q in p.parents if (m := GEMMA_SCOPE_LAYER.fullmatch(q.name))), None)
    if layer is not None:
        sae.cfg["layer"] = layer
    return sae


GEMMA_SCOPE_LAYER = re.compile(r"layer_(\d+)")

# dictionary_learning's dict_class -> (our kind, b_dec subtracted from the input)
DICTIONARY_LEARNING_KINDS = {
    "BatchTopKSAE": ("batchtopk", True),
    "MatryoshkaBatchTopKSAE": ("batchtopk", True),
    "AutoEncoderTopK": ("topk", True),
    "JumpReluAutoEncoder": ("jumprelu", False),
    "AutoEncoder": ("relu", True),
}


def _load_dictionary_learning(files: dict[str, Path], k: int | None) -> SAE:
    """`dictionary_learning`'s `ae.pt` (the trainer's state dict) and its `config.json`."""
    p, cfg_p = files["weights"], files["cfg"]
    trainer = read_json(cfg_p).get("trainer")
    cls = trainer.get("dict_class") if isinstance(trainer, dict) else None
    if cls not in DICTIONARY_LEARNING_KINDS:
        raise SAEFormatError(
            f"{cfg_p}: trainer.dict_class {cls!r} is not supported; supported: {', '.join(DICTIONARY_LEARNING_KINDS)}"
        )
    kind, subtract_b_dec = DICTIONARY_LEARNING_KINDS[cls]
    raw = read_pt(p)
    named = {  # nn.Linear weights are (out, in): the encoder's is W_enc transposed, the decoder's W_dec
        "W_enc": _transposed(raw["encoder.weight"]) if "encoder.weight" in raw else raw.get("W_enc"),
        "b_enc": raw.get("encoder.bias", raw.get("b_enc")),
        "W_dec": _transposed(raw["decoder.weight"]) if "decoder.weight" in raw else raw.get("W_dec"),
        "b_dec": raw.get("bias", raw.get("b_dec")),
    }
    w = weight_tensors(p, {key: v for key, v in named.items() if v is not None})
    W_enc, W_dec, _ = oriented(p, w, "000")
    if kind == "batchtopk":
        if "threshold" not in raw:
            raise SAEFormatError(f"{p}: a {cls} without its threshold buffer; save the whole state dict")
        theta = torch.as_tensor(raw["threshold"], dtype=torch.float32).clamp(min=0.0)  # -1: never estimated
        sae = build_jumprelu(p, w, W_enc, W_dec, theta, subtract_b_dec=True)
    elif kind == "jumprelu":
        sae = build_jumprelu(p, w, W_enc, W_dec, raw.get("threshold"), subtract_b_dec=subtract_b_dec)
    elif kind == "relu":
        sae = build_relu(p, w, W_enc, W_dec, subtract_b_dec=subtract_b_dec)
    else:
        stored = raw.get("k", trainer.get("k"))
        k = k if k is not None else (int(stored) if stored is not None else None)
        sae = build_topk(p, w, W_enc, W_dec, k, relu=True, subtract_b_dec=True)
    sae.cfg.update(layout="dictionary_learning", dict_class=cls)
    if isinstance(trainer.get("layer"), int):
        sae.cfg["layer"] = trainer["layer"]
    return sae


def _transposed(t: Any) -> Any:
    return t.T if isinstance(t, torch.Tensor) and t.ndim == 2 else t


def recorded_layer(sae: SAE, layer: int | None, path) -> int:
    """--layer if given, else the layer the SAE records (config or file name)."""
    if layer is not None:
        return layer
    if isinstance((sae.cfg or {}).get("layer"), int):
        return sae.cfg["layer"]
    raise SAEFormatError(f"{path}: the SAE does not record its layer; pass --layer N")


def recorded_cache(sae: SAE, cache: str | None, fallback: str) -> str:
    """--cache, else the cache the SAE was trained on (if it is still reachable), else `fallback`."""
    if cache:
        return cache
    recorded = (sae.cfg or {}).get("cache")
    if recorded and ("://" in recorded or Path(recorded).exists()):
        return recorded
    return fallback
