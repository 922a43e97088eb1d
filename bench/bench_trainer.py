"""One full training step of each SAE kind, ours against sparsify, SAELens and dictionary_learning.

Every side gets the same batches (one .npy written here), the same shapes, the same thread
count, the same seed and the same fixed set of dead latents (so AuxK runs on every side at
every step, with k_aux = d_in/2 as all three use), at each of several dead fractions: many
latents are dead early in training and at late layers, and AuxK's cost grows with them.
Each side runs in its own fresh process:
ours in this venv, the peers in `.venv-peers` (`make bench-peers-env`), through their own
training code (bench/peers/*.py). A step is forward, backward, optimizer step, decoder
renormalization / parallel-gradient removal where the tool does it, and its dead-latent
bookkeeping. The median over the timed steps (after warmup) gives tokens/s; sides run in
interleaved, rotated rounds and each keeps its best round (the box is shared with other work).

The other kinds (`--architectures`) run against the peers that train them: SAELens' training
SAE of the kind through its `SAETrainer.step`, and dictionary_learning's trainer through its
`update` (installed with `--no-deps`, see bench/peers/dictlearn_step.py); sparsify trains TopK
only. BatchTopK and Matryoshka run at each dead fraction, as TopK (AuxK on every side). JumpReLU
and ReLU have no dead-latent handling; they run twice: as initialized (each side's own init,
mostly dense), and at a trained-like sparsity where every side sets its thresholds or encoder
bias from the first batch so that each latent fires on k/d_sae of the rows (L0 = k).

    python bench/bench_trainer.py                      # 512/8192/32 and 1024/16384/64, batch 4096,
                                                       # 10%, 50% and 90% of the latents dead
    python bench/bench_trainer.py --shapes 512x8192x32 --sides ours,sparsify --dead-fracs 0.5
    python bench/bench_trainer.py --architectures batchtopk,matryoshka,jumprelu,relu --no-minilm \
        --sides ours,saelens,dictlearn
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# bench/datasets.py (the MiniLM loader) would shadow Hugging Face `datasets` for anything we import
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
PEERS = ROOT / "bench" / "peers"
PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"
SIDES = {
    "ours": None,
    "sparsify": PEERS / "sparsify_step.py",
    "saelens": PEERS / "saelens_step.py",
    "dictlearn": PEERS / "dictlearn_step.py",
}
TRAINS = {  # the kinds each peer trains (ours: all)
    "sparsify": ("topk",),
    "saelens": ("topk", "batchtopk", "matryoshka", "jumprelu", "relu"),
    "dictlearn": ("batchtopk", "matryoshka", "jumprelu", "relu"),
}
AUXK_KINDS = ("topk", "batchtopk", "matryoshka")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--shapes", default="512x8192x32,1024x16384x64", help="d_in x d_sae x k, comma-separated")
    p.add_argument(
        "--minilm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add a row on real MiniLM hidden states (d=384, n=6144, k=32)",
    )
    p.add_argument("--architectures", default="topk", help="SAE kinds, comma-separated")
    p.add_argument("--sides", default="ours,sparsify,saelens", help="ours, sparsify, saelens, dictlearn")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--n-batches", type=int, default=4, help="distinct batches, cycled")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="interleaved repeats; the best round counts")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dead-fracs", default="0.1,0.5,0.9", help="fractions of latents held dead, comma-separated")
    p.add_argument("--dead-frac", type=float, default=0.1, help=argparse.SUPPRESS)  # internal: one worker's
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trainer.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run our side in this process
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--d-sae", type=int, help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--aux-alpha", type=float, default=1 / 32, help=argparse.SUPPRESS)
    p.add_argument("--arch", default="topk", help=argparse.SUPPRESS)  # internal: one worker's kind
    p.add_argument("--l0", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--coefficient", type=float, default=1.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def structured_gaussian(n_rows: int, d: int, seed: int) -> np.ndarray:
    """Residual-like rows: a Zipf-weighted sparse mix of 4d unit atoms, a shared offset, noise."""
    rng = np.random.default_rng(seed)
    m, s = 4 * d, 16
    atoms = rng.standard_normal((m, d), dtype=np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    p = 1.0 / np.arange(1, m + 1)
    p /= p.sum()
    offset = rng.standard_normal(d, dtype=np.float32)
    out = np.empty((n_rows, d), dtype=np.float32)
    for a in range(0, n_rows, 1024):
        b = min(a + 1024, n_rows)
        idx = rng.choice(m, size=(b - a, s), p=p)
        coef = rng.exponential(1.0, size=(b - a, s)).astype(np.float32)
        out[a:b] = np.einsum("rs,rsd->rd", coef, atoms[idx]) + offset
        out[a:b] += 0.1 * rng.standard_normal((b - a, d), dtype=np.float32)
    return out


def minilm_rows(n_rows: int, seed: int) -> np.ndarray:
    """Real residual-stream rows from the MiniLM the design names, via bench/datasets.py."""
    import importlib.util

    path = ROOT / "bench" / "datasets.py"  # loaded by path: as `datasets` it would shadow HF's
    if not path.exists():
        raise SystemExit(f"{path} is missing (the MiniLM loader); pass --no-minilm")
    spec = importlib.util.spec_from_file_location("bench_datasets", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # layer 3 of 6 (a middle block's output), the cached 65,536-token sample when it suffices
    x = mod.minilm(max(65_536, n_rows), layers=(1, 3, 5))[3]
    rows = np.random.default_rng(seed).permutation(len(x))[:n_rows]  # a shuffled loader's mix
    return np.asarray(x[rows], dtype=np.float32)


def run_side(side: str, data: Path, d_sae: int, k: int, a: argparse.Namespace) -> dict:
    common = [
        "--data",
        str(data),
        "--d-sae",
        str(d_sae),
        "--k",
        str(k),
        "--aux-alpha",
        str(a.aux_alpha),
        "--dead-frac",
        str(a.dead_frac),
        "--warmup",
        str(a.warmup),
        "--steps",
        str(a.steps),
        "--threads",
        str(a.threads),
        "--seed",
        str(a.seed),
        "--arch",
        a.arch,
        "--l0",
        str(a.l0),
        "--coefficient",
        str(a.coefficient),
    ]
    if side == "ours":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "ours", *common]
    else:
        cmd = [str(PEERS_PY), str(SIDES[side]), *common]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(a.threads),
        MKL_NUM_THREADS=str(a.threads),
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"{side} failed (exit {proc.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1])


def ours_worker(a: argparse.Namespace) -> None:
    """Our side, in a fresh process: drives train's per-step API with the peers' protocol."""
    sys.path.insert(0, str(PEERS))
    sys.path.insert(0, str(ROOT))
    import torch
    from _common import firing_cut, matryoshka_sizes, run, setup

    from train.sae import BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE, TopKSAE
    from train.trainer import SAETrainer

    data, dead = setup(a)
    d, n, k = data.shape[2], a.d_sae, a.k
    sae = {
        "topk": lambda: TopKSAE(d, n, k),
        "batchtopk": lambda: BatchTopKSAE(d, n, k),
        "matryoshka": lambda: MatryoshkaSAE(d, n, k, matryoshka_sizes(n)),
        "jumprelu": lambda: JumpReLUSAE(d, n),
        "relu": lambda: ReLUSAE(d, n),
    }[a.arch]()
    trainer = SAETrainer(
        sae, aux_alpha=a.aux_alpha, warmup_steps=1000, total_steps=10_000, sparsity_coefficient=a.coefficient
    )
    trainer.init_from_sample(torch.from_numpy(np.array(data[0][:4096])))
    if a.l0:
        with torch.no_grad():
            cut = firing_cut(sae.pre_acts(torch.from_numpy(np.array(data[0]))), a.l0)
            if a.arch == "jumprelu":
                sae.threshold.copy_(cut.clamp_min(0.0))
            else:
                sae.b_enc.sub_(cut)

    def prepare() -> None:
        trainer.since_fired.zero_()
        trainer.since_fired[dead] = trainer.dead_tokens

    run("ours", a, data, prepare, trainer.step)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.worker == "ours":
        return ours_worker(a)
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    if bad := [s for s in sides if s not in SIDES]:
        raise SystemExit(f"unknown side(s) {bad}: pick from {sorted(SIDES)}")
    if any(s != "ours" for s in sides) and not PEERS_PY.exists():
        raise SystemExit(f"{PEERS_PY} is missing: run make bench-peers-env (or pass --sides ours)")

    shapes = []
    for spec in filter(None, (v.strip() for v in a.shapes.split(","))):
        try:
            d, n, k = (int(v) for v in spec.lower().split("x"))
        except ValueError:
            raise SystemExit(f"bad shape {spec!r}: write d_in x d_sae x k, e.g. 512x8192x32") from None
        shapes.append(("gaussian+structure", d, n, k))
    if a.minilm:
        shapes.append(("minilm", 384, 6144, 32))

    fracs = [float(v) for v in a.dead_fracs.split(",") if v.strip()]
    archs = [v.strip() for v in a.architectures.split(",") if v.strip()]
    cases = []  # (architecture, shape, dead fraction, L0 set from the first batch: 0 = as initialized)
    for arch in archs:
        for shape in shapes:
            if arch in AUXK_KINDS:
                cases += [(arch, shape, f, 0.0) for f in fracs]
            else:
                cases += [(arch, shape, 0.0, 0.0), (arch, shape, 0.0, float(shape[3]))]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        for arch, (dataset, d, n, k), frac, l0 in cases:
            a.dead_frac, a.arch, a.l0 = frac, arch, l0
            here = [s for s in sides if s == "ours" or arch in TRAINS[s]]
            rows_needed = a.n_batches * a.batch
            path = Path(tmp) / f"{dataset}_{d}.npy"
            if not path.exists():
                x = (
                    minilm_rows(rows_needed, a.seed)
                    if dataset == "minilm"
                    else structured_gaussian(rows_needed, d, a.seed)
                )
                np.save(path, x.reshape(a.n_batches, a.batch, d))
            result = {
                "architecture": arch,
                "dataset": dataset,
                "d_in": d,
                "d_sae": n,
                "k": k,
                "batch": a.batch,
                "dead_frac": frac,
                "l0_set": l0,
                "sides": {},
                "rounds": {s: [] for s in here},
            }
            what = f"dead {frac:.0%}" if arch in AUXK_KINDS else (f"L0 {l0:g}" if l0 else "at init")
            for rnd in range(a.rounds):
                # interleaved and rotated, so that load from other work hits every side alike
                order = here[rnd % len(here) :] + here[: rnd % len(here)]
                for side in order:
                    t0 = time.time()
                    r = run_side(side, path, n, k, a)
                    result["rounds"][side].append(r)
                    print(
                        f"{arch} {dataset} {d}/{n}/{k} {what} round {rnd} {side:9s} "
                        f"{r['tokens_per_s']:9.0f} tokens/s "
                        f"{r['tokens_per_cpu_s']:9.0f} tokens/cpu-s ({time.time() - t0:.0f}s wall, "
                        f"load {os.getloadavg()[0]:.1f})",
                        file=sys.stderr,
                    )
            for side, runs in result["rounds"].items():
                result["sides"][side] = max(runs, key=lambda r: r["tokens_per_s"])  # best round
            if "ours" in result["sides"]:
                ours = result["sides"]["ours"]
                result["ratio"] = {
                    s: ours["tokens_per_s"] / v["tokens_per_s"] for s, v in result["sides"].items() if s != "ours"
                }
                result["ratio_cpu"] = {
                    s: ours["tokens_per_cpu_s"] / v["tokens_per_cpu_s"]
                    for s, v in result["sides"].items()
                    if s != "ours"
                }
                if result["ratio"]:  # against the fastest peer that trains this kind
                    result["ratio_fastest_peer"] = min(result["ratio"].values())
            result["load_average"] = os.getloadavg()
            rows.append(result)
            save(a, argv, rows)  # after every case, so a long run that is stopped keeps its rows
    print(table(save(a, argv, rows)))


def save(a: argparse.Namespace, argv, rows: list) -> dict:
    report = {
        "machine": machine(),
        "threads": a.threads,
        "batch": a.batch,
        "warmup": a.warmup,
        "steps": a.steps,
        "rounds": a.rounds,
        "dead_fracs": a.dead_fracs,
        "command": " ".join(["python", "bench/bench_trainer.py", *(argv or sys.argv[1:])]),
        "rows": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    return report


def machine() -> str:
    model = (
        next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.machine(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    return f"{model}, {os.cpu_count()} cores, {platform.system()}"


def table(report: dict) -> str:
    peers = [s for s in ("sparsify", "saelens", "dictlearn") if any(s in r["sides"] for r in report["rows"])]
    head = "| kind | data | d_in/d_sae/k | dead / L0 | ours tok/s | " + " | ".join(f"{s} tok/s" for s in peers)
    head += " | " + " | ".join(f"ours/{s}" for s in peers) + " | ours/fastest peer |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in report["rows"]:
        arch = r.get("architecture", "topk")
        what = (
            f"{r.get('dead_frac', 0.1):.0%} dead"
            if arch in AUXK_KINDS
            else (f"L0 {r['l0_set']:g}" if r.get("l0_set") else "at init")
        )
        cells = [arch, r["dataset"], f"{r['d_in']}/{r['d_sae']}/{r['k']}", what]
        cells.append(f"{r['sides']['ours']['tokens_per_s']:,.0f}" if "ours" in r["sides"] else "-")
        cells += [f"{r['sides'][s]['tokens_per_s']:,.0f}" if s in r["sides"] else "-" for s in peers]
        cells += [
            f"{r['ratio'][s]:.2f}x ({r['ratio_cpu'][s]:.2f}x cpu)" if s in r.get("ratio", {}) else "-" for s in peers
        ]
        cells.append(f"{r['ratio_fastest_peer']:.2f}x" if "ratio_fastest_peer" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    for arch in dict.fromkeys(r.get("architecture", "topk") for r in report["rows"]):
        rows = [r for r in report["rows"] if r.get("architecture", "topk") == arch]
        worst = [(r["ratio_fastest_peer"], r) for r in rows if r.get("ratio_fastest_peer") is not None]
        if worst:
            w, r = min(worst, key=lambda t: t[0])
            lines.append(f"worst {arch}: {w:.2f}x the fastest peer ({r['d_in']}/{r['d_sae']}/{r['k']})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
