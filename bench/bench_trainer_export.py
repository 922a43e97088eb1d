"""Our SAE files against SAELens' own loader, both ways (needs `make bench-peers-env`).

1. export: a trained-looking SAE of every kind (random weights, non-zero biases, thresholds, a
   folded input scale) is exported by `train.export` as `train run` does; SAELens
   (`SAE.load_from_disk`) loads it in `.venv-peers` and encodes the same rows: its class
   (TopKSAE, JumpReLUSAE for batchtopk, matryoshka and jumprelu, StandardSAE for relu), its
   metadata (prepend_bos false, hook names, context size, dataset path) and its codes against ours.
2. import: SAELens writes a TopK SAE with `rescale_acts_by_decoder_norm: true` and decoder rows
   far from unit norm (`save_model`), with its codes on the same rows; `train.published.load_sae`
   loads that directory and its codes and reconstruction are compared with SAELens'.

    python bench/bench_trainer_export.py           # prints one JSON summary; exit 1 on a mismatch
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"
CHECK = ROOT / "bench" / "peers" / "saelens_export_check.py"


def peer(mode: str, directory: Path, ref: Path) -> dict:
    proc = subprocess.run([str(PEERS_PY), str(CHECK), mode, str(directory), str(ref)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"SAELens check ({mode}) failed: {proc.stderr.strip()[-600:]}")
    return json.loads(lines[-1])


def export_one(tmp: Path, kind: str, sae, cls: str, x: torch.Tensor, export_sae, sae_lens_cfg) -> dict:
    """Export one trained-looking SAE of `kind` and have SAELens load it and encode `x`."""
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.2)
        sae.input_scale.fill_(2.5)  # train.normalize: folded into the exported weights
        if kind in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(1.5)
        if kind == "jumprelu":
            sae.threshold.uniform_(0.5, 3.0)
        if kind == "relu":
            sae.b_enc.sub_(3.0)  # sparse codes, as a trained ReLU SAE's
    cfg = sae_lens_cfg(
        sae,
        layer=31,
        hook="resid_post",
        hook_module="model.language_model.layers.31",
        model="Qwen/Qwen3.6-27B",
        fingerprint="0" * 16,
        tokens=1 << 20,
        split={"seed": 0, "fraction": 0.01},
        normalization={"kind": "scale", "folded": True},
        config={"exclude_special": False},
        cache_url="caches/qwen36-27b",
        source={"name": "corpus", "seq_len": 1024},
        context=1024,
    )
    out = tmp / f"L31_{kind}"
    export_sae(sae, out, cfg)
    with torch.no_grad():
        torch.save({"x": x, "codes": sae.dense(x), "recon": sae(x), "class": cls}, tmp / f"{kind}.pt")
    return peer("load", out, tmp / f"{kind}.pt")


def main() -> None:
    if not PEERS_PY.exists():
        raise SystemExit(f"{PEERS_PY} is missing: run make bench-peers-env")
    from train.export import export_sae, sae_lens_cfg
    from train.published import load_sae
    from train.sae import BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE, TopKSAE

    torch.manual_seed(0)
    d, n, k = 64, 512, 8
    x = torch.randn(256, d) * 4 + 1
    kinds = {
        "topk": (lambda: TopKSAE(d, n, k), "TopKSAE"),
        "batchtopk": (lambda: BatchTopKSAE(d, n, k), "JumpReLUSAE"),
        "matryoshka": (lambda: MatryoshkaSAE(d, n, k, [64, 128, 256, 512]), "JumpReLUSAE"),
        "jumprelu": (lambda: JumpReLUSAE(d, n), "JumpReLUSAE"),
        "relu": (lambda: ReLUSAE(d, n), "StandardSAE"),
    }
    exported = {}
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        tmp = Path(tmp)
        for kind, (make, cls) in kinds.items():
            exported[kind] = export_one(tmp, kind, make(), cls, x, export_sae, sae_lens_cfg)
        torch.save({"x": x}, tmp / "theirs.pt")
        peer("save", tmp / "saelens_rescaled", tmp / "theirs.pt")
        ref = torch.load(tmp / "theirs.pt", weights_only=True)
        theirs = load_sae(tmp / "saelens_rescaled")
        with torch.no_grad():
            codes, recon = theirs.dense(ref["x"]), theirs(ref["x"])
        # float32 rounding of the folded weights: relative to the codes' scale (SAELens' random init is large)
        imported = {
            "same_active_latents": bool(torch.equal(codes != 0, ref["codes"] != 0)),
            "codes_max_rel_diff": float((codes - ref["codes"]).abs().max() / ref["codes"].abs().max()),
            "recon_max_rel_diff": float((recon - ref["recon"]).abs().max() / ref["recon"].abs().max()),
        }
        imported["ok"] = (
            imported["same_active_latents"]
            and imported["codes_max_rel_diff"] < 1e-5
            and imported["recon_max_rel_diff"] < 1e-5
        )
    report = {
        "export_loaded_by_saelens": exported,
        "saelens_rescaled_loaded_by_us": imported,
        "ok": all(e["ok"] for e in exported.values()) and imported["ok"],
    }
    print(json.dumps(report, indent=1))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
