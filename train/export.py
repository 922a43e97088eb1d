"""Export: per SAE, `OUT/<name>/` in the SAELens 6 layout plus the `000_*` file (run.json: `outdir`).

Each kind is written as SAELens 6 writes its own (`save_inference_model`), so that
`SAE.load_from_disk` reads it natively: topk as "topk"; batchtopk and matryoshka in their
inference form, "jumprelu" with the learned threshold for every latent; jumprelu as
"jumprelu" (its `threshold` tensor); relu as "standard". The metadata block names the kind
trained (`training_architecture`, SAELens' own names) and its settings.

Normalization is folded into the weights first, so every exported file takes raw residuals.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from cache_format.errors import UserError

from .outdir import write_out
from .sae import SAE, BatchTopKSAE

SAE_LENS_FORMAT = "6.0.0"  # the SAELens config generation cfg.json follows (checked against 6.54)
# this project's kind -> (SAELens' inference architecture, SAELens' name of the kind trained)
SAE_LENS_ARCHITECTURE = {
    "topk": ("topk", "topk"),
    "batchtopk": ("jumprelu", "batchtopk"),
    "matryoshka": ("jumprelu", "matryoshka_batchtopk"),
    "jumprelu": ("jumprelu", "jumprelu"),
    "relu": ("standard", "standard"),
}


def sae_name(layer: int, s) -> str:
    """An SAE's name in a run: `L11_n4096_k32` for TopK (the `000` card's), the kind before k or
    the coefficient for the others (`L11_n4096_batchtopk_k32`, `L11_n4096_jumprelu_c0.5`)."""
    base = f"L{layer}_n{s.d_sae}"
    if s.architecture == "topk":
        return f"{base}_k{s.k}"
    if s.k is not None:
        return f"{base}_{s.architecture}_k{s.k}"
    return f"{base}_{s.architecture}_c{s.sparsity_coefficient:g}"


def inference_form(sae: SAE) -> SAE:
    """The SAE as it encodes after training (BatchTopK's and Matryoshka's: a JumpReLU at θ)."""
    return sae.jumprelu() if isinstance(sae, BatchTopKSAE) else sae


def export_sae(sae: SAE, out_dir: Path, cfg: dict) -> dict[str, str]:
    """Write cfg.json + sae_weights.safetensors + sae_<name>.pt (the directory's name); return the file names."""
    if not getattr(sae, "relu", True):
        raise UserError(
            f"cannot export {out_dir.name} in the SAELens layout: it has no ReLU, and SAELens' topk "
            "applies one (abstopk ranks by magnitude), so its codes would differ; "
            "keep its .pt file instead"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    folded = inference_form(sae).folded()
    weights = {n: t.detach().float().cpu().contiguous() for n, t in folded.weights().items()}
    write_out(out_dir / "sae_weights.safetensors", save_safetensors(weights))
    pt_name = f"sae_{out_dir.name}.pt"
    write_out(out_dir / pt_name, lambda f: torch.save(weights, f))
    write_out(out_dir / "cfg.json", json.dumps(cfg, indent=2, sort_keys=True))
    return {"cfg": "cfg.json", "safetensors": "sae_weights.safetensors", "pt": pt_name}


def absolute_url(url: str) -> str:
    """A cache location that resolves from anywhere: URLs as given, local paths made absolute."""
    if "://" in url and not url.startswith("file://"):
        return url
    return str(Path(url.removeprefix("file://")).expanduser().resolve())


def context_size(cache) -> int | None:
    """Tokens per sequence: the corpus' packing length, else the longest stored sequence (rollouts)."""
    seq_len = ((cache.meta or {}).get("source") or {}).get("seq_len")
    if isinstance(seq_len, int):
        return seq_len
    try:
        lengths = cache.sequences().column("token_ids").to_pylist()
    except Exception:  # a cache without a sequences table (an import) does not know
        return None
    return max((len(t) for t in lengths), default=None)


def sae_lens_cfg(
    sae: SAE,
    *,
    layer: int,
    hook: str,
    hook_module: str,
    model: str,
    fingerprint: str,
    tokens: int,
    split: dict,
    normalization: dict,
    config: dict,
    cache_url: str,
    source: dict | None = None,
    context: int | None = None,
) -> dict:
    """A SAELens 6.x cfg.json (its config class's fields and `metadata` block) plus this project's provenance.

    SAELens reads the top-level fields it knows and the `metadata` block, and ignores the rest,
    so our own keys (layer, fingerprint, split, train_config, ...) ride beside them. Without a
    metadata block carrying a 6.x `sae_lens_version`, SAELens would treat the file as a pre-6.0
    config and default `prepend_bos` to True; harvest never prepends a BOS (Qwen has none).
    """
    cache = absolute_url(cache_url)
    site = "resid_post" if hook in ("", "resid_post") else hook
    arch, trained = SAE_LENS_ARCHITECTURE[sae.architecture]
    out = {
        # SAELens' SAEConfig fields (+ TopKSAEConfig's k and rescale flag for topk)
        "architecture": arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.subtract_b_dec,
        "normalize_activations": "none",  # any normalization is folded into the weights
        "reshape_activations": "none",
    }
    if arch == "topk":  # top-k of the pre-activations, then ReLU
        out.update(k=sae.k, rescale_acts_by_decoder_norm=False)  # the decoder rows are unit norm
    metadata = {
        "sae_lens_version": SAE_LENS_FORMAT,
        "sae_lens_training_version": None,  # trained by this project, not by SAELens
        "model_name": model,
        "hook_name": f"blocks.{layer}.hook_{site}",
        "hf_hook_name": hook_module,
        "prepend_bos": False,
        "context_size": context,
        "dataset_path": cache,
        "exclude_special_tokens": bool(config.get("exclude_special", False)),
    }
    if sae.architecture != "topk":  # as SAELens records what an inference config was trained as
        metadata["training_architecture"] = trained
        metadata["training_architecture_details"] = sae.settings()
    out["metadata"] = metadata
    if arch == "topk":
        out.update(activation_fn="topk", activation_fn_kwargs={"k": sae.k}, relu=sae.relu)
    return {
        **out,
        # this project's fields (SAELens ignores them)
        "kind": sae.architecture,
        "normalization": normalization,
        "hook_site": hook,
        "hook_module": hook_module,
        "hook_layer": layer,
        "layer": layer,
        "layer_fingerprint": fingerprint,
        "cache": cache,
        "source": source or {},
        "split": split,
        "tokens_seen": tokens,
        "training_tokens": tokens,
        "train_config": config,
    }
