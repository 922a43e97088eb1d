"""Loader tokens/s: our `train.ShuffledLoader` over a cache against SAELens' cached
`ActivationsStore` at its documented 80k-token buffer, on the same rows, side by side.

One float32 array of rows is written once in each tool's own cache format: ours through
`cache_format` (zarr v3 shards, bfloat16, the format's codec), SAELens' through the layout its
`CacheActivationsRunner` writes (a Hugging Face dataset of float32 (context, d_in) rows). Each
side then runs in a fresh process (SAELens in `.venv-peers`, `make bench-peers-env`) with the
same thread count and batch size, and delivers one epoch of float32 batches on the CPU. The
clock runs from the loader's construction to the last batch (start-up included); the rate after
the first batch is reported beside it. Sides alternate over rounds; each keeps its best.

    python bench/bench_loader_saelens.py                   # 524,288 rows, d=512, batch 4096
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
# bench/datasets.py (the MiniLM loader) would shadow Hugging Face `datasets` for anything we import
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"
SAELENS = ROOT / "bench" / "peers" / "saelens_loader.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--tokens", type=int, default=524_288, help="rows in the cache (a multiple of --context)")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--context", type=int, default=128, help="SAELens context size (rows per stored sequence)")
    p.add_argument("--buffer-tokens", type=int, default=81_920, help="SAELens mixing buffer (its documented 80k)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, and our loader's decode threads")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--window-tokens",
        type=int,
        default=0,
        help="our shuffle window (0: the loader's default); 81920 matches SAELens' buffer",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sides", default="ours,saelens")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "loader_saelens.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_ours(x: np.ndarray, url: str, context: int) -> None:
    import cache_format as cf
    from cache_format.layout import BF16

    n = x.shape[0]
    seq = np.arange(n) // context
    w = cf.create_cache(url, d_model=x.shape[1], layers=[0], meta={"model": {"name_or_path": "bench/rows"}})
    step = 64 * context
    with w.segment(meta={"bench": "loader_saelens"}) as seg:
        for a in range(0, n, step):
            b = min(a + step, n)
            toks = np.random.default_rng(a).integers(0, 50_000, b - a, dtype=np.int32)
            seg.append(
                residuals={0: x[a:b].astype(BF16)},
                tokens=toks,
                seq_ids=seq[a:b].astype(np.int64),
                positions=(np.arange(a, b) % context).astype(np.int32),
                labels=np.full(b - a, -1, np.int8),
                roles=np.zeros(b - a, np.int8),
            )
            seg.add_sequences(
                [{"seq_id": int(s), "token_ids": toks[seq[a:b] == s].tolist()} for s in np.unique(seq[a:b])]
            )


def ours_worker(a: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    import cache_format as cf
    from train import ShuffledLoader

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    cache = cf.open_cache(a.cache)
    window = {"window_tokens": a.window_tokens} if a.window_tokens else {}
    loader = ShuffledLoader(
        cache, layers=[0], batch_size=a.batch, seed=a.seed, split="all", threads=a.threads, announce=False, **window
    )
    n_batches = a.tokens // a.batch
    checksum = 0.0
    for i in range(n_batches):
        b = next(loader)
        if i == 0:
            first, t1 = time.perf_counter() - t0, time.perf_counter()
        r = b.residuals[0]
        assert r.shape == (a.batch, a.d) and r.dtype == torch.float32
        checksum += float(r[0, 0])
    total, steady = time.perf_counter() - t0, time.perf_counter() - t1
    loader.close()
    print(
        json.dumps(
            {
                "side": "ours",
                "tokens": n_batches * a.batch,
                "batch": a.batch,
                "d_in": a.d,
                "window_tokens": loader.window_tokens,
                "threads": torch.get_num_threads(),
                "first_batch_s": first,
                "total_s": total,
                "tokens_per_s": n_batches * a.batch / total,
                "steady_tokens_per_s": (n_batches - 1) * a.batch / steady,
                "checksum": checksum,
            }
        )
    )


def run(cmd: list[str], a: argparse.Namespace, what: str) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(a.threads),
        MKL_NUM_THREADS=str(a.threads),
        PYTHONWARNINGS="ignore",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"{what} failed (exit {proc.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1]) if lines else {}


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.worker == "ours":
        return ours_worker(a)
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    if bad := [s for s in sides if s not in ("ours", "saelens")]:
        raise SystemExit(f"unknown side(s) {bad}: pick from ours, saelens")
    if "saelens" in sides and not PEERS_PY.exists():
        raise SystemExit(f"{PEERS_PY} is missing: run make bench-peers-env (or pass --sides ours)")
    if a.tokens % a.context or a.tokens < a.batch:
        raise SystemExit(f"--tokens {a.tokens} must be a multiple of --context {a.context} and >= --batch")

    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_trainer", ROOT / "bench" / "bench_trainer.py")
    bench_trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_trainer)
    machine, structured_gaussian = bench_trainer.machine, bench_trainer.structured_gaussian

    common = ["--tokens", str(a.tokens), "--batch", str(a.batch), "--threads", str(a.threads), "--seed", str(a.seed)]
    with tempfile.TemporaryDirectory(prefix="bench_loader_", dir=os.environ.get("BENCH_TMP")) as tmp:
        t0 = time.time()
        x = structured_gaussian(a.tokens, a.d, a.seed)
        npy = Path(tmp) / "rows.npy"
        np.save(npy, x)
        ours_url, sl_dir = str(Path(tmp) / "ours_cache"), str(Path(tmp) / "saelens_cache")
        if "ours" in sides:
            write_ours(x, ours_url, a.context)
        del x
        if "saelens" in sides:
            run(
                [str(PEERS_PY), str(SAELENS), "--rows", str(npy), "--cache", sl_dir, "--context", str(a.context)],
                a,
                "writing the SAELens cache",
            )
        print(f"wrote {a.tokens:,} rows x {a.d} in each format ({time.time() - t0:.0f}s)", file=sys.stderr)

        results = {s: [] for s in sides}
        for rnd in range(a.rounds):
            for side in sides[rnd % len(sides) :] + sides[: rnd % len(sides)]:
                if side == "ours":
                    cmd = [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--worker",
                        "ours",
                        "--cache",
                        ours_url,
                        "--d",
                        str(a.d),
                        "--window-tokens",
                        str(a.window_tokens),
                        *common,
                    ]
                else:
                    cmd = [
                        str(PEERS_PY),
                        str(SAELENS),
                        "--cache",
                        sl_dir,
                        "--context",
                        str(a.context),
                        "--d-in",
                        str(a.d),
                        "--buffer-tokens",
                        str(a.buffer_tokens),
                        *common,
                    ]
                r = run(cmd, a, side)
                results[side].append(r)
                print(
                    f"round {rnd} {side:8s} {r['tokens_per_s']:12,.0f} tokens/s "
                    f"(steady {r['steady_tokens_per_s']:,.0f}, "
                    f"first batch {r['first_batch_s']:.2f}s, load {os.getloadavg()[0]:.1f})",
                    file=sys.stderr,
                )
        sizes = {s: du(p) for s, p in (("ours", ours_url), ("saelens", sl_dir)) if s in sides}

    best = {s: max(v, key=lambda r: r["tokens_per_s"]) for s, v in results.items()}
    report = {
        "machine": machine(),
        "command": " ".join(["python", "bench/bench_loader_saelens.py", *(argv or sys.argv[1:])]),
        "tokens": a.tokens,
        "d": a.d,
        "batch": a.batch,
        "threads": a.threads,
        "rounds": a.rounds,
        "bytes_on_disk": sizes,
        "best": best,
        "all": results,
    }
    if len(best) == 2:
        report["ratio"] = best["ours"]["tokens_per_s"] / best["saelens"]["tokens_per_s"]
        report["ratio_steady"] = best["ours"]["steady_tokens_per_s"] / best["saelens"]["steady_tokens_per_s"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    print(
        "| side | tokens/s (incl. start-up) | tokens/s after 1st batch | 1st batch s | on disk MB |\n"
        "|---|---|---|---|---|"
    )
    for s, r in best.items():
        print(
            f"| {s} | {r['tokens_per_s']:,.0f} | {r['steady_tokens_per_s']:,.0f} | {r['first_batch_s']:.2f} | "
            f"{sizes.get(s, 0) / 2**20:,.0f} |"
        )
    if "ratio" in report:
        print(f"ours / SAELens: {report['ratio']:.1f}x (after the first batch: {report['ratio_steady']:.1f}x)")


def du(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


if __name__ == "__main__":
    main()
