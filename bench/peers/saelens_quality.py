"""SAELens' own training of one SAE kind on the planted rows (run with .venv-peers/bin/python).

bench/bench_trainer_quality.py writes the training rows and the held-out rows (bf16-rounded, as
the cache stores them) to .npy files; this script trains SAELens' training SAE of the kind
(`BatchTopKTrainingSAE`, `MatryoshkaBatchTopKTrainingSAE`, `JumpReLUTrainingSAE`,
`StandardTrainingSAE`, `TopKTrainingSAE`) through its own `SAETrainer.step`, at the dictionary
size, token budget, batch, learning rate, lr warmup, dead window (in steps) and coefficient warmup
it is given, with SAELens' defaults for everything else. It saves the inference model as SAELens does
(`save_inference_model`: BatchTopK and Matryoshka become JumpReLU), loads it back with
`SAE.load_from_disk`, encodes the held-out rows with it and prints ONE JSON line per setting:
held-out variance explained, L0, dead fraction, and the path of its W_dec (.npy) for recovery.
Imports nothing from this repository.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from importlib.metadata import version

import numpy as np
import sae_lens
import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

KINDS = {
    "topk": ("TopKTrainingSAE", "TopKTrainingSAEConfig"),
    "batchtopk": ("BatchTopKTrainingSAE", "BatchTopKTrainingSAEConfig"),
    "matryoshka": ("MatryoshkaBatchTopKTrainingSAE", "MatryoshkaBatchTopKTrainingSAEConfig"),
    "jumprelu": ("JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig"),
    "relu": ("StandardTrainingSAE", "StandardTrainingSAEConfig"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", required=True, choices=sorted(KINDS))
    p.add_argument("--train", required=True, help=".npy (rows, d_in) float32")
    p.add_argument("--heldout", required=True, help=".npy (rows, d_in) float32")
    p.add_argument("--d-sae", type=int, required=True)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--coefficients", default="", help="jumprelu / relu: comma-separated; one SAE each")
    p.add_argument("--matryoshka-sizes", default="", help="comma-separated, the last = d_sae")
    p.add_argument("--sparsity-warmup", type=int, default=0, help="jumprelu / relu: l0_ / l1_warm_up_steps")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--warmup", type=int, default=0, help="lr warmup steps")
    p.add_argument("--lr-decay-steps", type=int, default=0, help="the last steps, lr linear to 0 (lr_decay_steps)")
    p.add_argument("--adam-beta1", type=float, default=0.9, help="SAETrainerConfig.adam_beta1 (its default)")
    p.add_argument("--adam-beta2", type=float, default=0.999, help="SAETrainerConfig.adam_beta2 (its default)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--dead-window", type=int, default=1000, help="SAETrainerConfig.dead_feature_window, steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", required=True)
    return p.parse_args()


def build(a: argparse.Namespace, d_in: int, coefficient: float | None):
    sae_cls, cfg_cls = (getattr(sae_lens, n) for n in KINDS[a.arch])
    kw = dict(d_in=d_in, d_sae=a.d_sae, dtype="float32", device="cpu")
    if a.arch in ("topk", "batchtopk", "matryoshka"):
        kw["k"] = a.k
    if a.arch == "matryoshka":
        kw["matryoshka_widths"] = [int(v) for v in a.matryoshka_sizes.split(",")]
    if a.arch == "jumprelu":
        kw["l0_coefficient"] = coefficient
        kw["l0_warm_up_steps"] = a.sparsity_warmup
    if a.arch == "relu":
        kw["l1_coefficient"] = coefficient
        kw["l1_warm_up_steps"] = a.sparsity_warmup
    return sae_cls(cfg_cls(**kw))


def train_one(a: argparse.Namespace, data: np.ndarray, held: torch.Tensor, coefficient: float | None) -> dict:
    torch.manual_seed(a.seed)
    sae = build(a, data.shape[1], coefficient)
    steps = a.tokens // a.batch
    cfg = SAETrainerConfig(
        total_training_samples=steps * a.batch,
        train_batch_size_samples=a.batch,
        lr=a.lr,
        lr_end=a.lr,  # a constant lr after warmup, as the tiny profile's
        lr_warm_up_steps=a.warmup,
        lr_decay_steps=a.lr_decay_steps,
        adam_beta1=a.adam_beta1,
        adam_beta2=a.adam_beta2,
        dead_feature_window=a.dead_window,
        device="cpu",
    )
    trainer = SAETrainer(cfg, sae, data_provider=iter(()))
    rng = np.random.default_rng(a.seed)
    order, at = rng.permutation(len(data)), 0
    t0 = time.time()
    for _ in range(steps):
        if at + a.batch > len(order):  # a new epoch, a fresh permutation
            order, at = rng.permutation(len(data)), 0
        x = torch.from_numpy(np.ascontiguousarray(data[np.sort(order[at : at + a.batch])]))
        at += a.batch
        trainer.step(x)
        trainer.n_training_steps += 1  # fit() advances it after step()
    seconds = time.time() - t0
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        inference = SAE.load_from_disk(tmp)
    with torch.no_grad():
        codes = torch.cat([inference.encode(held[i : i + 8192]) for i in range(0, len(held), 8192)])
        recon = torch.cat([inference.decode(codes[i : i + 8192]) for i in range(0, len(held), 8192)])
    x = held.double()
    ve = 1 - float((x - recon.double()).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    fired = (codes != 0).any(0)
    tag = f"{a.arch}_c{coefficient:g}" if coefficient is not None else f"{a.arch}_k{a.k}"
    tag += f"_lr{a.lr:g}_w{a.warmup}" + (f"_decay{a.lr_decay_steps}" if a.lr_decay_steps else "")
    tag += f"_b{a.adam_beta1:g}-{a.adam_beta2:g}" if (a.adam_beta1, a.adam_beta2) != (0.9, 0.999) else ""
    tag += f"_seed{a.seed}" if a.seed else ""
    w_path = f"{a.out_dir}/saelens_{tag}_W_dec.npy"  # one file per setting: the workdir keeps them all
    np.save(w_path, inference.W_dec.detach().float().numpy())
    return {
        "side": "saelens",
        "architecture": a.arch,
        "inference_class": type(inference).__name__,
        "k": a.k if coefficient is None else None,
        "sparsity_coefficient": coefficient,
        "variance_explained": ve,
        "l0": float((codes != 0).sum(1).double().mean()),
        "dead_fraction": 1 - float(fired.double().mean()),
        "w_dec": w_path,
        "seconds": round(seconds, 1),
        "sae_lens": version("sae-lens"),
    }


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    data = np.load(a.train, mmap_mode="r")
    held = torch.from_numpy(np.load(a.heldout)).float()
    coefficients = [float(v) for v in a.coefficients.split(",") if v.strip()] or [None]
    for c in coefficients:
        print(json.dumps(train_one(a, data, held, c)), flush=True)


if __name__ == "__main__":
    main()
