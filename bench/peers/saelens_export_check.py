"""SAELens' own loader and encoder against this project's SAE files (run with .venv-peers/bin/python).

    saelens_export_check.py load DIR REF.pt   # SAELens loads our export; its codes vs ours in REF.pt
    saelens_export_check.py save DIR REF.pt   # SAELens writes a TopK SAE with rescale_acts_by_decoder_norm
                                              # (non-unit decoder rows) and its codes on REF.pt's x

`load` checks what SAELens makes of cfg.json (a 6.x config, so no pre-6.0 defaults such as
prepend_bos=True), that it builds the class REF.pt names ("class", TopKSAE by default) and that
`SAE.load_from_disk(DIR).encode(x)` equals our codes. Prints ONE
JSON line; exits non-zero on a mismatch. Imports nothing from this repository.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version

import torch
from sae_lens import SAE, TopKSAE, TopKSAEConfig


def load(directory: str, ref_path: str) -> dict:
    ref = torch.load(ref_path, weights_only=True)
    sae = SAE.load_from_disk(directory)
    meta = sae.cfg.metadata
    with torch.no_grad():
        codes = sae.encode(ref["x"])
        recon = sae.decode(codes)
    out = {
        "mode": "load",
        "sae_lens": version("sae-lens"),
        "class": type(sae).__name__,
        "prepend_bos": meta.prepend_bos,
        "hook_name": meta.hook_name,
        "hf_hook_name": meta.hf_hook_name,
        "context_size": meta.context_size,
        "dataset_path": meta.dataset_path,
        "model_name": meta.model_name,
        "codes_max_abs_diff": float((codes - ref["codes"]).abs().max()),
        "recon_max_abs_diff": float((recon - ref["recon"]).abs().max()) if "recon" in ref else None,
    }
    ok = (
        out["class"] == ref.get("class", "TopKSAE")
        and out["prepend_bos"] is False
        and out["codes_max_abs_diff"] < 1e-4
        and (out["recon_max_abs_diff"] is None or out["recon_max_abs_diff"] < 1e-4)
    )
    return dict(out, ok=ok)


def save(directory: str, ref_path: str) -> dict:
    torch.manual_seed(0)
    x = torch.load(ref_path, weights_only=True)["x"]
    d_in = x.shape[1]
    cfg = TopKSAEConfig(d_in=d_in, d_sae=4 * d_in, k=4, rescale_acts_by_decoder_norm=True)
    sae = TopKSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        sae.W_dec.mul_(torch.rand(cfg.d_sae, 1) * 3 + 0.2)  # decoder rows far from unit norm
        codes = sae.encode(x)
        recon = sae.decode(codes)
    sae.save_model(directory)
    torch.save({"x": x, "codes": codes, "recon": recon}, ref_path)
    return {"mode": "save", "sae_lens": version("sae-lens"), "dir": directory, "ok": True}


if __name__ == "__main__":
    mode, directory, ref = sys.argv[1:4]
    result = {"load": load, "save": save}[mode](directory, ref)
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)
