"""Planted-feature recovery and held-out variance explained of `train run`, per AuxK normalization.

Why: speed means nothing if the SAE does not find the features. This writes a synthetic cache
whose rows are sparse non-negative mixes of known unit features (the issue's set: d=64, 512
features, 4 active per token with Zipf(0.8) frequencies, magnitudes U[0.5, 2.5], noise 0.02,
2.2M tokens in 128-token sequences), then runs `python -m train run --profile tiny` on it as a
user would, once per `train.aux_norm` (and per `train.dead_tokens` asked for), and reports:

- recovery: the fraction of true features whose best decoder cosine exceeds 0.9;
- variance_explained on held-out rows (10% of sequences, as the issue's set).

    python bench/bench_trainer_quality.py                                  # both norms, the profile's dead_tokens
    python bench/bench_trainer_quality.py --dead-tokens 20000,100000,400000 --norms residual
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--norms", default="residual,total", help="train.aux_norm values, comma-separated")
    p.add_argument("--dead-tokens", default="", help="train.dead_tokens values; '' = the tiny profile's")
    p.add_argument("--seeds", default="0", help="train.seed values (one run each)")
    p.add_argument("--tokens", type=int, default=2_200_000, help="rows in the synthetic cache")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--features", type=int, default=512)
    p.add_argument("--active", type=int, default=4)
    p.add_argument("--zipf", type=float, default=0.8)
    p.add_argument("--noise", type=float, default=0.02)
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        help="extra train --set KEY=VALUE (default: the issue's d_sae 1024, k 4, lr 5e-3, ...)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="keep the cache and runs here (reused if present)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trainer_quality.json")
    return p.parse_args(argv)


# the run of the issue: everything else comes from [profile.tiny.train]
RUN = {
    "d_sae": 1024,
    "k": 4,
    "lr": 5e-3,
    "warmup_steps": 10,
    "batch_size": 4096,
    "training_tokens": 2_000_000,
    "eval_tokens": 100_000,
    "eval_every_tokens": 500_000,
    "checkpoint_every_tokens": 1_000_000,
    "shuffle_buffer_tokens": 262_144,
    "heldout_fraction": 0.1,
}


def planted(n: int, d: int, n_features: int, active: int, zipf: float, noise: float, seed: int = 0):
    """(rows float32 (n, d), dictionary (n_features, d)): sparse non-negative mixes of unit features."""
    rng = np.random.default_rng(seed)
    dic = rng.standard_normal((n_features, d))
    dic /= np.linalg.norm(dic, axis=1, keepdims=True)
    logf = -zipf * np.log(np.arange(1, n_features + 1))
    x = np.empty((n, d), np.float32)
    for a in range(0, n, 65_536):  # Gumbel top-k: `active` distinct features drawn by frequency
        b = min(a + 65_536, n)
        keys = logf[None, :] - np.log(-np.log(rng.random((b - a, n_features))))
        idx = np.argpartition(-keys, active, axis=1)[:, :active]
        mags = rng.uniform(0.5, 2.5, (b - a, active))
        x[a:b] = np.einsum("na,nad->nd", mags, dic[idx]) + noise * rng.standard_normal((b - a, d))
    return x, dic


def write_cache(url: Path, x: np.ndarray, seq_len: int = 128) -> None:
    import cache_format as cf
    from cache_format.layout import BF16

    n, d = x.shape
    w = cf.create_cache(
        str(url), d_model=d, layers=[0], meta={"model": {"name_or_path": "bench/planted", "dtype": "float32"}}
    )
    step = 262_144
    for a in range(0, n, step):
        b = min(a + step, n)
        rows = np.arange(a, b)
        with w.segment() as seg:
            seg.append(
                residuals={0: x[a:b].astype(BF16)},
                tokens=(rows % 1000).astype(np.int32),
                seq_ids=(rows // seq_len).astype(np.int64),
                positions=(rows % seq_len).astype(np.int32),
                labels=np.full(b - a, -1, np.int8),
                roles=np.zeros(b - a, np.int8),
            )


def recovery(w_dec: np.ndarray, dic: np.ndarray, threshold: float = 0.9) -> float:
    w = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)
    return float(((dic @ w.T).max(axis=1) > threshold).mean())


def train(cache: Path, out: Path, sets: dict) -> dict:
    from safetensors.numpy import load_file

    args = [
        sys.executable,
        "-m",
        "train",
        "run",
        "--profile",
        "tiny",
        "--no-progress",
        "--cache",
        str(cache),
        "--out",
        str(out),
        "--layers",
        "0",
        "--fresh",
    ]
    for k, v in sets.items():
        args += ["--set", f"train.{k}={json.dumps(v)}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.time()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"train run failed: {proc.stderr.strip()[-400:]}")
    run = json.loads((out / "run.json").read_text())
    sae = run["saes"][0]
    w_dec = load_file(str(out / sae["path"] / "sae_weights.safetensors"))["W_dec"]
    return {
        "metrics": sae["metrics"],
        "w_dec": w_dec,
        "seconds": time.time() - t0,
        "dead_tokens": run["config"]["dead_tokens"],
        "aux_norm": run["config"]["aux_norm"],
    }


def main(argv=None) -> None:
    a = parse_args(argv)
    tmp = None
    if a.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_quality_")
        a.workdir = Path(tmp.name)
    a.workdir.mkdir(parents=True, exist_ok=True)
    x, dic = planted(a.tokens, a.d, a.features, a.active, a.zipf, a.noise)
    cache = a.workdir / f"planted_d{a.d}_f{a.features}_n{a.tokens}"
    if not (cache / "zarr.json").exists():
        write_cache(cache, x)
    del x
    base = dict(RUN)
    for item in a.sets:
        k, v = item.split("=", 1)
        base[k.removeprefix("train.")] = json.loads(v) if v[:1] in '0123456789-[{"tf' else v
    dead_list = [int(v) for v in a.dead_tokens.split(",") if v.strip()] or [None]
    rows = []
    for norm in [v.strip() for v in a.norms.split(",") if v.strip()]:
        for dead in dead_list:
            for seed in [int(v) for v in a.seeds.split(",")]:
                sets = dict(base, aux_norm=norm, seed=seed, **({"dead_tokens": dead} if dead else {}))
                tag = f"{norm}_dead{dead or 'profile'}_seed{seed}"
                r = train(cache, a.workdir / tag, sets)
                row = {
                    "aux_norm": r["aux_norm"],
                    "dead_tokens": r["dead_tokens"],
                    "seed": seed,
                    "recovery": recovery(r["w_dec"], dic),
                    "variance_explained": r["metrics"]["variance_explained"],
                    "dead_fraction": r["metrics"].get("dead_fraction"),
                    "seconds": round(r["seconds"], 1),
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    report = {
        "data": {k: getattr(a, k) for k in ("tokens", "d", "features", "active", "zipf", "noise")},
        "train": base,
        "profile": "tiny",
        "rows": rows,
        "command": " ".join(["python", "bench/bench_trainer_quality.py", *(argv or sys.argv[1:])]),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    print("| aux_norm | dead_tokens | seed | recovery (cos > 0.9) | held-out VE | held-out dead | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['aux_norm']} | {r['dead_tokens']:,} | {r['seed']} | {r['recovery']:.3f} | "
            f"{r['variance_explained']:.3f} | {r['dead_fraction']:.3f} | {r['seconds']:.0f} |"
        )
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
