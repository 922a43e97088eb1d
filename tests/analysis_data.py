"""Shared test data for the analysis tests: a cache whose activations and labels are known by
construction, and an exact ±basis SAE (feature j's activation is relu(x_j))."""

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

import cache_format as cf
from cache_format.split import is_heldout
from train.sae import TopKSAE

D, LAYER, SEED, FRACTION = 16, 2, 0, 0.5
TINY = Path(__file__).resolve().parents[1] / "harvest" / "assets" / "tiny"


def identity_sae(d=D):
    sae = TopKSAE(d, 2 * d, d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def residual(token, position, correct):
    """Feature 8 + token % 8 fires at 1 + position/100; feature 0 only on correct rollouts (2.0);
    feature 1 on every row (0.5). Everything else stays silent."""
    x = np.zeros(D, np.float32)
    x[8 + token % 8] = 1 + position / 100
    x[0] = 2.0 * correct
    x[1] = 0.5
    return x


def make_cache(url: str, n_seqs: int = 40) -> str:
    """A rollout-like cache: prompt rows (label -1), then thinking/answer rows labeled by the
    sequence's correctness, alternating correct/wrong inside each split."""
    tok = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    lines = [ln for ln in (TINY / "corpus.txt").read_text().splitlines() if len(ln.split()) > 8][:n_seqs]
    seq_ids = np.arange(100, 100 + len(lines))
    held = is_heldout(seq_ids, SEED, FRACTION)
    # alternate correct / wrong inside each split so both classes are held out
    correct = np.zeros(len(lines), bool)
    for mask in (held, ~held):
        correct[np.flatnonzero(mask)[::2]] = True
    w = cf.create_cache(
        url,
        d_model=D,
        layers=[LAYER],
        meta={"source": "supergpqa"},
        chunk_tokens=64,
        shard_mib=1,
        tokenizer_files={"tokenizer.json": (TINY / "tokenizer.json").read_bytes()},
    )
    with w.segment() as seg:
        for s, line, ok in zip(seq_ids, lines, correct):
            ids = np.asarray(tok.encode(line).ids[:40], np.int64)
            n = len(ids)
            pos = np.arange(n)
            roles = np.where(pos < 3, cf.ROLE_PROMPT, np.where(pos < n - 4, cf.ROLE_THINKING, cf.ROLE_ANSWER))
            labels = np.where(pos < 3, -1, int(ok))
            x = np.stack([residual(int(t), int(p), bool(ok)) for t, p in zip(ids, pos)])
            seg.append(
                residuals={LAYER: torch.from_numpy(x).bfloat16()},
                tokens=ids,
                seq_ids=np.full(n, s),
                positions=pos,
                labels=labels,
                roles=roles,
            )
            seg.add_sequences([{"seq_id": int(s), "token_ids": ids.tolist(), "correct": bool(ok)}])
    return url


def exported_run(
    root: Path,
    *,
    name: str = "L2_n32_k16",
    hook_module: str = "",
    config: dict | None = None,
    trajectory: list[dict],
    metrics: dict,
    sae=None,
) -> tuple[Path, str, TopKSAE]:
    """A training run's OUT as `train run` leaves it, around the identity SAE on a fresh cache:
    the export, its trajectory.jsonl and run.json; (OUT, cache url, sae)."""
    from train.export import export_sae, sae_lens_cfg
    from train.outdir import write_run_json

    url = make_cache(str(root / "cache"))
    sae = identity_sae() if sae is None else sae
    cfg = sae_lens_cfg(
        sae,
        layer=LAYER,
        hook="resid_post",
        hook_module=hook_module,
        model="test",
        fingerprint=cf.open_cache(url).layer_fingerprint(LAYER),
        tokens=1000,
        split={"seed": SEED, "fraction": FRACTION},
        normalization={},
        config=config or {},
        cache_url=url,
    )
    out = root / "run"
    export_sae(sae, out / name, cfg)
    (out / name / "trajectory.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trajectory))
    write_run_json(out, {"saes": [{"name": name, "path": name, "layer": LAYER, "metrics": metrics}]})
    return out, url, sae
