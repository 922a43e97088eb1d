"""How much held-out variance explained an SAE's inference form costs, on the planted set.

Why: BatchTopK and Matryoshka train with one top-k over the whole batch but run, as their papers
and SAELens export them, as a JumpReLU with one threshold θ for every latent. On the quality
bench's planted set (bench_trainer_quality.py: every row holds exactly 4 features, magnitudes
0.5-2.5) that readout is the ceiling of their held-out VE, not the training. For each exported
SAE (`train run` output, SAELens layout) this measures, on the bench's held-out rows:

- the SAE as exported (its own inference form);
- one global threshold, swept: VE and L0 per θ, the θ whose L0 equals k, and the best VE;
- the same weights read per row as a TopK (the top k pre-activations of each row);
- with `--finetune-tokens N`: the weights trained further *at* the one-threshold form (θ held;
  the gradient flows through the active codes, decoder rows kept at unit norm, Adam at
  `--finetune-lr` falling linearly to 0), VE reported every 2M tokens. If VE stays put while
  the tokens grow past the training budget, the form, not the training, sets the ceiling.

    python bench/bench_trainer_quality.py --architectures batchtopk,matryoshka --norms residual \
        --sides ours --set lr=0.02 --set lr_decay_steps=244 --workdir /tmp/q
    python bench/bench_inference_form.py /tmp/q/batchtopk_residual_deadprofile_seed0/L0_n1024_batchtopk_k4 \
        /tmp/q/matryoshka_residual_deadprofile_seed0/L0_n1024_matryoshka_k4 --finetune-tokens 8000000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_trainer_quality import RUN, measure, planted, split_rows  # noqa: E402
from bench_trainer_quality import parse_args as quality_args  # noqa: E402

from train.published import load_sae  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("sae", nargs="+", type=Path, help="exported SAE directories (cfg.json + sae_weights.safetensors)")
    p.add_argument("--k", type=int, default=RUN["k"], help="the per-row count the readouts are compared at")
    p.add_argument("--finetune-tokens", type=int, default=0, help="train further at the one-threshold form")
    p.add_argument("--finetune-lr", type=float, default=5e-3)
    p.add_argument("--finetune-batch", type=int, default=RUN["batch_size"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "inference_form.json")
    p.add_argument("--plot", type=Path, default=None, help="also draw VE against L0 per readout (PNG)")
    return p.parse_args(argv)


def score(sae, held: np.ndarray, dic: np.ndarray, z: torch.Tensor) -> dict:
    """Held-out VE and L0 of dense codes z, decoded by the SAE itself and measured as the
    quality bench measures (its `measure`)."""
    m = max(1, int((z != 0).sum(1).max()))
    recon = sae.decode(*z.topk(m, dim=1, sorted=False))
    r = measure(sae.W_dec.detach().numpy(), (z.numpy(), recon.double().numpy()), dic, held)
    return {"ve": r["variance_explained"], "l0": r["l0"]}


def gate(pre: torch.Tensor, theta: float) -> torch.Tensor:
    """The one-threshold form: pre-activations above θ, zero elsewhere (θ ≥ 0)."""
    return pre.clamp_min(0) * (pre > theta)


def readouts(sae, held: np.ndarray, dic: np.ndarray, k: int) -> dict:
    """VE and L0 of the exported form, of one global θ (swept), and of a per-row top-k."""
    with torch.no_grad():
        x = torch.from_numpy(held)
        pre = sae.pre_acts(x)
        out = {"exported": score(sae, held, dic, sae.dense(x))}
        positive = pre.clamp_min(0)
        at_k = float(positive.flatten().kthvalue(positive.numel() - k * len(held)).values)
        sweep = []
        for theta in sorted({round(at_k * f, 4) for f in np.linspace(0.5, 1.5, 21)} | {at_k}):
            sweep.append({"theta": theta, **score(sae, held, dic, gate(pre, theta))})
        out["global_threshold"] = {
            "at_l0_k": next(s for s in sweep if s["theta"] == at_k),
            "best": max(sweep, key=lambda s: s["ve"]),
            "sweep": sweep,
        }
        vals, idx = positive.topk(k, dim=1)
        out["per_row_topk"] = score(sae, held, dic, torch.zeros_like(pre).scatter_(1, idx, vals))
        return out


def finetune(sae, train_rows: np.ndarray, held: np.ndarray, dic: np.ndarray, theta: float, a) -> list[dict]:
    """Train the weights further at the one-threshold form; held-out VE every 2M tokens."""
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=a.finetune_lr)
    steps = a.finetune_tokens // a.finetune_batch
    gen = torch.Generator().manual_seed(0)
    rows = torch.from_numpy(train_rows)
    trace, every = [], max(1, 2_000_000 // a.finetune_batch)

    def checkpoint(step):
        with torch.no_grad():
            z = gate(sae.pre_acts(torch.from_numpy(held)), theta)
            return {"tokens": step * a.finetune_batch, **score(sae, held, dic, z)}

    trace.append(checkpoint(0))
    for step in range(steps):
        x = rows[torch.randint(0, len(rows), (a.finetune_batch,), generator=gen)]
        z = gate(sae.pre_acts(x), theta)
        loss = ((sae.normalize(x) - (z @ sae.W_dec + sae.b_dec)) ** 2).sum(1).mean()  # in the SAE's own space
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad()
        for g in opt.param_groups:
            g["lr"] = a.finetune_lr * (1 - step / steps)
        opt.step()
        sae.set_decoder_norm_to_unit()
        if (step + 1) % every == 0 or step + 1 == steps:
            trace.append(checkpoint(step + 1))
            print(json.dumps(trace[-1]), file=sys.stderr, flush=True)
    return trace


def plot(report: dict, path: Path) -> None:
    """VE against L0: each SAE's one-θ sweep as a line, its per-row top-k and fine-tuned end as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (r, color) in enumerate(zip(report["saes"], plt.rcParams["axes.prop_cycle"].by_key()["color"])):
        name = r["kind"]
        sweep = r["global_threshold"]["sweep"]
        ax.plot([s["l0"] for s in sweep], [s["ve"] for s in sweep], color=color, label=f"{name}: one θ, swept")
        ax.scatter(  # hollow and shrinking, so that squares at the same VE stay visible inside each other
            [report["k"]],
            [r["per_row_topk"]["ve"]],
            s=110 - 30 * i,
            marker="s",
            facecolors="none",
            edgecolors=color,
            linewidths=1.5,
            label=f"{name}: per-row top-k",
        )
        if "finetune" in r:
            end = r["finetune"]["trace"][-1]
            ax.scatter([end["l0"]], [end["ve"]], color=color, marker="*", s=120, label=f"{name}: trained at one θ")
    ax.axhline(0.90, color="grey", linestyle="--", linewidth=1, label="issue 20's target, 0.90")
    ax.set(xlabel="held-out L0", ylabel="held-out variance explained", xlim=(2, 8), ylim=(0.80, 0.94))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    q = quality_args([])  # the quality bench's planted set, as its defaults write it
    x, dic = planted(q.tokens, q.d, q.features, q.active, q.zipf, q.noise)
    train_rows, held = split_rows(x, 128, RUN["heldout_fraction"], 0, RUN["eval_tokens"])
    del x
    report = {"k": a.k, "saes": []}
    for path in a.sae:
        sae = load_sae(path)
        kind = sae.cfg.get("kind") or sae.cfg.get("architecture") or path.name  # the kind trained, not exported
        r = {"sae": str(path), "kind": kind, **readouts(sae, held, dic, a.k)}
        if a.finetune_tokens:
            theta = r["global_threshold"]["at_l0_k"]["theta"]
            thresholds = getattr(sae, "threshold", None)
            if thresholds is not None and bool((thresholds == thresholds.flatten()[0]).all()):
                theta = float(thresholds.detach().flatten()[0])  # one θ exported (BatchTopK, Matryoshka): keep it
            trace = finetune(sae, train_rows, held, dic, theta, a)
            r["finetune"] = {"theta": theta, "lr": a.finetune_lr, "trace": trace}
        report["saes"].append(r)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    if a.plot:
        plot(report, a.plot)
    head = f"one θ at L0 {a.k} | best one θ (L0) | per-row top-{a.k} | fine-tuned at one θ"
    print(f"| trained as | exported VE / L0 | {head} |")
    print("|---|---|---|---|---|---|")
    for r in report["saes"]:
        g = r["global_threshold"]
        ft = r.get("finetune", {}).get("trace", [])
        tail = f"{ft[-1]['ve']:.3f} after {ft[-1]['tokens']:,} tokens" if ft else "-"
        print(
            f"| {r['kind']} | {r['exported']['ve']:.3f} / {r['exported']['l0']:.2f} "
            f"| {g['at_l0_k']['ve']:.3f} | {g['best']['ve']:.3f} ({g['best']['l0']:.2f}) "
            f"| {r['per_row_topk']['ve']:.3f} | {tail} |"
        )


if __name__ == "__main__":
    main()
