"""Export: `OUT/run.json` and, per SAE, `OUT/<name>/` in the sae_lens layout plus the `000_*` file.

Normalization is folded into the weights first, so every exported file takes raw residuals.
The trajectory plot (variance explained and dead latents against tokens) is drawn here too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import atomic_write_text
from .sae import TopKSAE

RUN_JSON_VERSION = 1


def sae_name(layer: int, d_sae: int, k: int) -> str:
    return f"L{layer}_n{d_sae}_k{k}"


def export_sae(sae: TopKSAE, out_dir: Path, cfg: dict) -> dict[str, str]:
    """Write cfg.json + sae_weights.safetensors + sae_L{layer}_n{d_sae}_k{k}.pt; return the file names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    folded = sae.folded()
    weights = {n: t.detach().float().cpu().contiguous() for n, t in folded.weights().items()}
    save_file(weights, str(out_dir / "sae_weights.safetensors"))
    pt_name = f"sae_L{cfg['layer']}_n{sae.d_sae}_k{sae.k}.pt"
    torch.save(weights, out_dir / pt_name)
    atomic_write_text(out_dir / "cfg.json", json.dumps(cfg, indent=2, sort_keys=True))
    return {"cfg": "cfg.json", "safetensors": "sae_weights.safetensors", "pt": pt_name}


def sae_lens_cfg(sae: TopKSAE, *, layer: int, hook: str, hook_module: str, model: str, fingerprint: str,
                 tokens: int, split: dict, normalization: dict, config: dict, cache_url: str) -> dict:
    """sae_lens' cfg.json keys (architecture, d_in, d_sae, hook_name, ...) plus this project's provenance."""
    return {
        "architecture": "topk",
        "activation_fn": "topk",
        "activation_fn_kwargs": {"k": sae.k},
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.subtract_b_dec,
        "relu": sae.relu,
        "normalize_activations": "none",  # any normalization is folded into the weights
        "normalization": normalization,
        "model_name": model,
        "hook_name": hook_module or f"{hook}/{layer}",
        "hook_site": hook,
        "hook_layer": layer,
        "layer": layer,
        "layer_fingerprint": fingerprint,
        "cache": cache_url,
        "split": split,
        "tokens_seen": tokens,
        "training_tokens": tokens,
        "train_config": config,
    }


def write_run_json(out: Path, run: dict) -> None:
    atomic_write_text(out / "run.json", json.dumps(dict(run, version=RUN_JSON_VERSION), indent=2, sort_keys=True))


def plot_trajectory(rows: list[dict], path: Path, title: str) -> None:
    """Variance explained and dead latents against tokens (held-out and training-window dead)."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["tokens"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(t, [r["variance_explained"] for r in rows], marker="o")
    a.set(xlabel="tokens", ylabel="held-out variance explained", title=title)
    a.grid(alpha=0.3)
    b.plot(t, [r["dead_fraction"] for r in rows], marker="o", label="held-out (never fired)")
    b.plot(t, [r["train_dead_fraction"] for r in rows], marker="x", label="training window")
    b.set(xlabel="tokens", ylabel="dead latents (fraction)")
    b.legend()
    b.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
