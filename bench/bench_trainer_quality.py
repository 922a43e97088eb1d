"""Planted-feature recovery and held-out variance explained of `train run`, per SAE kind, against SAELens.

Why: speed means nothing if the SAE does not find the features. This writes a synthetic cache
whose rows are sparse non-negative mixes of known unit features (the issue's set: d=64, 512
features, 4 active per token with Zipf(0.8) frequencies, magnitudes U[0.5, 2.5], noise 0.02,
2.2M tokens in 128-token sequences), then runs `python -m train run --profile tiny` on it as a
user would, per architecture (and per `train.aux_norm` / `train.dead_tokens` asked for, for the
kinds with AuxK; per `sparsity_coefficient`, all in one pass, for jumprelu and relu). With
`--sides ours,saelens` SAELens trains the same kind (bench/peers/saelens_quality.py, in
.venv-peers) on the same train-split rows, at the same dictionary size, token budget, batch,
learning rate, lr warmup and dead window (and, when --set, `lr_decay_steps`, `adam_beta1`,
`adam_beta2`: PEER_EXTRAS), with its defaults for the rest. Both sides'
exported SAEs are measured the same way on the same 100k held-out rows:

- recovery: the fraction of true features whose best decoder cosine exceeds 0.9;
- variance_explained and L0 on held-out rows (10% of sequences, as the issue's set).

The coefficient kinds are compared at matched L0: each side's coefficients should bracket
`--target-l0` (4); the summary interpolates recovery and VE linearly in L0 between the two
settings around it.

    python bench/bench_trainer_quality.py                                  # topk, both norms
    python bench/bench_trainer_quality.py --dead-tokens 20000,100000,400000 --norms residual
    python bench/bench_trainer_quality.py --architectures batchtopk,matryoshka,jumprelu,relu \
        --norms residual --sides ours,saelens --workdir /tmp/q
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
    p.add_argument("--architectures", default="topk", help="train.architecture values, comma-separated")
    p.add_argument("--sides", default="ours", help="ours and/or saelens (needs make bench-peers-env)")
    p.add_argument(
        "--coefficients-jumprelu", default="0.25,0.5,1,2,4", help="ours: sparsity_coefficient values of jumprelu"
    )
    p.add_argument("--coefficients-relu", default="0.25,0.5,1,2,4", help="ours: sparsity_coefficient values of relu")
    p.add_argument("--saelens-coefficients-jumprelu", default="", help="SAELens' l0_coefficient values ('' = ours)")
    p.add_argument("--saelens-coefficients-relu", default="", help="SAELens' l1_coefficient values ('' = ours)")
    p.add_argument("--target-l0", type=float, default=4.0, help="the coefficient kinds are compared at this L0")
    p.add_argument("--norms", default="residual,total", help="train.aux_norm values, comma-separated (AuxK kinds)")
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
    p.add_argument(
        "--workdir", type=Path, default=None, help="keep the cache, the runs and SAELens results here (reused)"
    )
    p.add_argument(
        "--reuse-ours",
        action="store_true",
        help="measure our finished runs in --workdir made with the same settings instead of retraining "
        "(only while train/ is unchanged)",
    )
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
    "sparsity_warmup_steps": 0,  # jumprelu, relu: SAELens' default (l0_ / l1_warm_up_steps), given to both sides
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


COEFFICIENT_KINDS = ("jumprelu", "relu")
PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"
PEER = ROOT / "bench" / "peers" / "saelens_quality.py"


def split_rows(x: np.ndarray, seq_len: int, fraction: float, seed: int, n_held: int):
    """(train rows, the first n_held held-out rows), bf16-rounded as the cache stores them."""
    from cache_format.layout import BF16
    from cache_format.split import is_heldout

    held = is_heldout(np.arange(len(x)) // seq_len, seed, fraction)
    xb = x.astype(BF16).astype(np.float32)
    return xb[~held], xb[held][:n_held]


def measure(w_dec: np.ndarray, codes_recon, dic: np.ndarray, held: np.ndarray) -> dict:
    """Recovery from the decoder; VE, L0 and dead fraction on the held-out rows from (codes, recon)."""
    codes, recon = codes_recon
    x = held.astype(np.float64)
    return {
        "recovery": recovery(w_dec, dic),
        "variance_explained": 1 - float(((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()),
        "l0": float((codes != 0).sum(1).mean()),
        "dead_fraction": 1 - float((codes != 0).any(0).mean()),
    }


def ours_codes(sae_dir: Path, held: np.ndarray):
    """Our export, loaded as `train eval` loads it, on the held-out rows: (dense codes, recon)."""
    import torch

    from train.published import load_sae

    sae = load_sae(sae_dir)
    x = torch.from_numpy(held)
    with torch.no_grad():
        return sae.dense(x).numpy(), sae(x).double().numpy()


def train(cache: Path, out: Path, sets: dict, held: np.ndarray, dic: np.ndarray, reuse: bool = False) -> list[dict]:
    """One `train run` (all its sweep's SAEs in one pass); one row per SAE, measured on `held`.

    With `reuse`, a finished run in `out` made with the same settings (bench_sets.json) is
    measured again instead of retrained: only valid while train/ is unchanged since."""
    record = out / "bench_sets.json"
    if reuse and record.exists() and json.loads(record.read_text()) == sets and (out / "run.json").exists():
        return measure_run(out, held, dic, seconds=None)

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
        args += ["--set", f"train.{k}={toml_value(v)}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.time()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"train run failed: {proc.stderr.strip()[-400:]}")
    record.write_text(json.dumps(sets))
    return measure_run(out, held, dic, seconds=round(time.time() - t0, 1))


def measure_run(out: Path, held: np.ndarray, dic: np.ndarray, seconds: float | None) -> list[dict]:
    """One row per SAE of the finished run in `out`, measured on `held`."""
    from safetensors.numpy import load_file

    run = json.loads((out / "run.json").read_text())
    rows = []
    for sae in run["saes"]:
        w_dec = load_file(str(out / sae["path"] / "sae_weights.safetensors"))["W_dec"]
        cfg = json.loads((out / sae["path"] / "cfg.json").read_text())
        details = cfg["metadata"].get("training_architecture_details", {})
        rows.append(
            {
                "side": "ours",
                "architecture": sae["architecture"],
                "name": sae["name"],
                "k": sae["k"],
                "sparsity_coefficient": coefficient_of(sae["name"]),
                "aux_norm": run["config"]["aux_norm"],
                "dead_tokens": run["config"]["dead_tokens"],
                **measure(w_dec, ours_codes(out / sae["path"], held), dic, held),
                "run_variance_explained": sae["metrics"].get("variance_explained"),
                "details": details,
                "seconds": seconds,
            }
        )
    return rows


# train keys given to SAELens too when --set: its SAETrainerConfig's field of the same meaning
PEER_EXTRAS = {"lr_decay_steps": "--lr-decay-steps", "adam_beta1": "--adam-beta1", "adam_beta2": "--adam-beta2"}


def coefficient_of(name: str) -> float | None:
    """The sparsity coefficient a run's SAE name carries (`L0_n1024_jumprelu_c0.5`), else None."""
    tail = name.rsplit("_c", 1)
    return float(tail[1]) if len(tail) == 2 and "_" not in tail[1] else None


def toml_value(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(i) for i in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(i)}" for k, i in v.items()) + "}"
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)


def saelens(
    arch: str, run: dict, coefficients: list[float], files: dict[str, Path], dic: np.ndarray, seed: int = 0
) -> list[dict]:
    """SAELens' training of the same kind on the same rows (bench/peers/saelens_quality.py).

    Each result is kept in the workdir's saelens_runs.jsonl under the settings that made it (data,
    kind, sizes, budget, lr, warmups, dead window, coefficient); a later call with the same
    settings reuses it and trains only what is missing (a SAELens run takes minutes to tens of
    minutes on a shared CPU box)."""
    key = {
        "data": files["cache"],
        "arch": arch,
        **{k: run[k] for k in ("d_sae", "k", "lr", "warmup_steps", "batch_size", "training_tokens")},
        "dead_window": max(1, run["dead_tokens"] // run["batch_size"]),
        "sparsity_warmup_steps": run["sparsity_warmup_steps"] if arch in COEFFICIENT_KINDS else None,
    }
    for name in PEER_EXTRAS:  # only when set, so that results stored before these keys still match
        if run.get(name) is not None:
            key[name] = run[name]
    if seed:
        key["seed"] = seed
    store = files["dir"] / "saelens_runs.jsonl"
    done = [json.loads(ln) for ln in store.read_text().splitlines()] if store.exists() else []
    have = {r["sparsity_coefficient"]: r for r in done if r["key"] == key and Path(r["w_dec"]).exists()}
    wanted = coefficients if arch in COEFFICIENT_KINDS else [None]
    missing = [c for c in wanted if c not in have]
    if missing:
        for r in train_saelens(arch, run, missing, files, seed):
            have[r["sparsity_coefficient"]] = r
            with store.open("a") as f:
                f.write(json.dumps({"key": key, **r}) + "\n")
    rows = []
    for c in wanted:
        r = {k: v for k, v in have[c].items() if k != "key"}
        rows.append(dict(r, recovery=recovery(np.load(r["w_dec"]), dic), reused=c not in missing))
    return rows


def train_saelens(
    arch: str, run: dict, coefficients: list[float | None], files: dict[str, Path], seed: int = 0
) -> list[dict]:
    """One call of bench/peers/saelens_quality.py: one JSON row per coefficient (or the k kind's one)."""
    args = [
        str(PEERS_PY),
        str(PEER),
        "--arch",
        arch,
        "--train",
        str(files["train"]),
        "--heldout",
        str(files["held"]),
        "--d-sae",
        str(run["d_sae"]),
        "--k",
        str(run["k"]),
        "--lr",
        str(run["lr"]),
        "--warmup",
        str(run["warmup_steps"]),
        "--batch",
        str(run["batch_size"]),
        "--tokens",
        str(run["training_tokens"]),
        "--dead-window",
        str(max(1, run["dead_tokens"] // run["batch_size"])),
        "--sparsity-warmup",
        str(run["sparsity_warmup_steps"]),
        "--out-dir",
        str(files["dir"]),
        "--seed",
        str(seed),
    ]
    for name, flag in PEER_EXTRAS.items():
        if run.get(name) is not None:
            args += [flag, str(run[name])]
    if run.get("torch_threads"):  # the same threads as ours; changes the run time, not the result
        args += ["--threads", str(run["torch_threads"])]
    if arch == "matryoshka":
        d = run["d_sae"]
        args += ["--matryoshka-sizes", ",".join(str(v) for v in [d // 8, d // 4, d // 2, d])]
    if arch in COEFFICIENT_KINDS:
        args += ["--coefficients", ",".join(f"{c:g}" for c in coefficients)]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"SAELens {arch} failed: {proc.stderr.strip()[-600:]}")
    return lines


def at_l0(points: list[dict], target: float) -> dict | None:
    """Recovery and VE interpolated linearly in L0 between the two settings around `target`."""
    pts = sorted(points, key=lambda r: r["l0"])
    for lo, hi in zip(pts, pts[1:]):
        if lo["l0"] <= target <= hi["l0"]:
            t = 0.0 if hi["l0"] == lo["l0"] else (target - lo["l0"]) / (hi["l0"] - lo["l0"])
            return {m: lo[m] + t * (hi[m] - lo[m]) for m in ("recovery", "variance_explained", "l0")} | {
                "between": [lo.get("sparsity_coefficient"), hi.get("sparsity_coefficient")]
            }
    return None


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
    base = dict(RUN)
    for item in a.sets:
        k, v = item.split("=", 1)
        base[k.removeprefix("train.")] = json.loads(v) if v[:1] in '0123456789-[{"tf' else v
    train_rows, held = split_rows(x, 128, base["heldout_fraction"], 0, base["eval_tokens"])
    del x
    sides = [v.strip() for v in a.sides.split(",") if v.strip()]
    files = {
        "dir": a.workdir,
        "cache": cache.name,
        "train": a.workdir / "train_rows.npy",
        "held": a.workdir / "heldout_rows.npy",
    }
    if "saelens" in sides:
        if not PEERS_PY.exists():
            raise SystemExit(f"{PEERS_PY} is missing: run make bench-peers-env (or pass --sides ours)")
        np.save(files["train"], train_rows)
    np.save(files["held"], held)
    del train_rows
    dead_list = [int(v) for v in a.dead_tokens.split(",") if v.strip()] or [None]
    norms = [v.strip() for v in a.norms.split(",") if v.strip()]
    rows = []
    for arch in [v.strip() for v in a.architectures.split(",") if v.strip()]:
        coefficients = [float(v) for v in getattr(a, f"coefficients_{arch}", "").split(",") if v.strip()]
        for norm in norms if arch not in COEFFICIENT_KINDS else norms[:1]:
            for dead in dead_list:
                for seed in [int(v) for v in a.seeds.split(",")]:
                    sets = dict(base, architecture=arch, aux_norm=norm, seed=seed)
                    if arch not in COEFFICIENT_KINDS:  # a key a kind does not read is refused
                        del sets["sparsity_warmup_steps"]
                    if dead:
                        sets["dead_tokens"] = dead
                    if arch in COEFFICIENT_KINDS:  # every coefficient in one pass over the data
                        sets["sparsity_coefficient"] = coefficients[0]
                        sets["sweep"] = [{"sparsity_coefficient": c} for c in coefficients[1:]]
                    tag = f"{arch}_{norm}_dead{dead or 'profile'}_seed{seed}"
                    for r in train(cache, a.workdir / tag, sets, held, dic, reuse=a.reuse_ours):
                        rows.append(dict(r, seed=seed))
                        print(json.dumps({k: v for k, v in rows[-1].items() if k != "details"}), file=sys.stderr)
        if "saelens" in sides:
            run = dict(base, dead_tokens=dead_list[0] or rows[-1]["dead_tokens"])
            peer_c = [float(v) for v in getattr(a, f"saelens_coefficients_{arch}", "").split(",") if v.strip()]
            for seed in [int(v) for v in a.seeds.split(",")]:
                for r in saelens(arch, run, peer_c or coefficients, files, dic, seed):
                    rows.append(dict(r, seed=seed))
                    print(json.dumps(rows[-1]), file=sys.stderr)
    report = {
        "data": {k: getattr(a, k) for k in ("tokens", "d", "features", "active", "zipf", "noise")},
        "train": base,
        "profile": "tiny",
        "target_l0": a.target_l0,
        "rows": rows,
        "summary": summary(rows, a.target_l0),
        "load_average": os.getloadavg(),
        "command": " ".join(["python", "bench/bench_trainer_quality.py", *(argv or sys.argv[1:])]),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    print(table(report))
    if tmp:
        tmp.cleanup()


def summary(rows: list[dict], target: float) -> list[dict]:
    """Per kind and side, the mean over seeds: the k kinds' figures (first norm), the others' at
    matched L0 (each seed's sweep interpolated, then averaged); `per_seed` keeps each seed's."""
    metrics = ("recovery", "variance_explained", "l0")
    out = []
    for arch in dict.fromkeys(r["architecture"] for r in rows):
        for side in dict.fromkeys(r["side"] for r in rows if r["architecture"] == arch):
            mine = [r for r in rows if r["architecture"] == arch and r["side"] == side]
            norm = mine[0].get("aux_norm")
            per_seed = {}
            for seed in dict.fromkeys(r.get("seed", 0) for r in mine):
                runs = [r for r in mine if r.get("seed", 0) == seed and r.get("aux_norm") == norm]
                hit = at_l0(runs, target) if arch in COEFFICIENT_KINDS else {m: runs[0][m] for m in metrics}
                if hit:
                    per_seed[seed] = {m: hit[m] for m in metrics}
            head = {"architecture": arch, "side": side} | ({"at_l0": target} if arch in COEFFICIENT_KINDS else {})
            if not per_seed:
                out.append(head | {"bracketed": False})
                continue
            mean = {m: float(np.mean([v[m] for v in per_seed.values()])) for m in metrics}
            out.append(head | mean | {"seeds": len(per_seed), "per_seed": per_seed})
    return out


def table(report: dict) -> str:
    lines = [
        "| side | architecture | k / coefficient | aux_norm | recovery (cos > 0.9) | VE | L0 | held-out dead |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        setting = f"k {r['k']}" if r.get("k") else f"c {r.get('sparsity_coefficient'):g}"
        lines.append(
            f"| {r['side']} | {r['architecture']} | {setting} | {r.get('aux_norm', '-')} | {r['recovery']:.3f} | "
            f"{r['variance_explained']:.3f} | {r['l0']:.2f} | {r['dead_fraction']:.3f} |"
        )
    lines += [
        "",
        "| architecture | side | seeds | recovery | held-out VE | "
        f"L0 (coefficient kinds: at {report['target_l0']:g}) |",
        "|---|---|---|---|---|---|",
    ]
    for s in report["summary"]:
        if "recovery" in s:
            lines.append(
                f"| {s['architecture']} | {s['side']} | {s['seeds']} | {s['recovery']:.3f} | "
                f"{s['variance_explained']:.3f} | {s['l0']:.2f} |"
            )
        else:
            at = f"L0 {report['target_l0']:g} not bracketed"
            lines.append(f"| {s['architecture']} | {s['side']} | - | - | - | {at} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
