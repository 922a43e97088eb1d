"""The shuffled loader against the codec's raw decode rate, and its mixing against a perfect shuffle.

1. Throughput, side by side in one run on the same shards with the same decode threads T:
   - raw decode: every chunk of the layer read and decoded (`Cache.read_chunk`) by a pool of
     T threads, nothing else: the ceiling for any reader of this cache;
   - the loader: `train.ShuffledLoader` over the same cache with T decode threads (plus its own
     producer thread, which gathers the batches), shuffled batches of 4096 rows, delivered as
     bf16 (the stored bits: what a GPU run moves to the device and converts there) and as fp32
     (what a CPU trainer consumes: + the conversion);
   - the gather alone: one thread copying shuffled rows of a decoded window into batches, the
     one copy per row a row-level shuffle needs. When the T decode threads already occupy every
     core, that copy competes with them, and the loader is bounded by
     1 / (1 + raw / (T * gather)) of raw decode ("copy-bound ceiling").
   T runs over --threads (default 1 and 2: on this 2-core box, T=1 leaves a core for the
   shuffle as a GPU host's spare cores do; T=2 puts every core on decoding).
   Each side makes --epochs passes over the shards (the loader: that many epochs from its
   construction, start-up and first window included; its time to the first batch is reported).
   The loader skips the held-out split (--heldout, 1% as in training) whose rows it decodes too.
   Datasets: real MiniLM hidden states (d=384, `bench/datasets.py`) and Gaussian rows at d=1024.
   Sides alternate over rounds (order rotated each round); the medians are reported.
2. Mixing: distinct sequences per batch of 4096 against a perfect shuffle (4096 rows drawn at
   random from the train split), at width 5120 within 8 GiB per layer: the loader holds two
   window buffers of bf16 rows and about 4 batches in flight, so a window buffer holds at most
   (8 GiB - 4 * 4096 * 5120 * 2 B) / (2 * 5120 * 2 B) = 411,238 rows (`ShuffledLoader.buffer_rows`).
   - at scale (100k sequences of 1024 tokens, 102M rows): the loader's plan over row metadata
     alone (`ShuffledLoader.planned_rows`), with and without harvest's write-time mixing;
   - confirmed on a small real cache written with the same write-time mixing, where the
     batches the loader actually yields are checked against the plan.

    python bench/bench_loader.py                 # everything (a few minutes on 2 cores)
    python bench/bench_loader.py --skip-scale    # without the 102M-row plan
    python bench/bench_loader.py --digest-cost-only   # 3. what checking every read costs the loader
3. Digest cost: the loader's CPU-seconds per row with every read checked (cache format 2's
   shard-index CRC32C and per-chunk XXH3) against the same loader with the checks off, over
   interleaved rounds (target: at most 5%).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import cache_format as cf  # noqa: E402
from cache_format.layout import BF16  # noqa: E402
from train.loader import ShuffledLoader  # noqa: E402
from train.loader_plan import RowMetadata as PlannerReads  # noqa: E402

WIDTH, BUDGET, BATCH = 5120, 8 * 2**30, 4096
IN_FLIGHT = 4  # batches the loader holds besides its windows: the prefetch queue (2), one being gathered, one out
WINDOW_AT_WIDTH = (BUDGET - IN_FLIGHT * BATCH * WIDTH * 2) // (2 * WIDTH * 2)  # rows per window buffer, two per layer
# eligible rows per window: held-out rows (1%, up to 3% in a window) stay in the decoded chunks, and a
# window overshoots its target by up to one chunk
WINDOW_TOKENS = int(WINDOW_AT_WIDTH * 0.96) - 4096


def harvest_order(n_seqs: int, seq_len: int, mix_window: int, seed: int = 0) -> np.ndarray:
    """Sequence id of every row as harvest writes it: in order, or permuted within windows of sequences."""
    seq = np.repeat(np.arange(n_seqs, dtype=np.int64), seq_len)
    if mix_window <= 1:
        return seq
    rows = mix_window * seq_len
    for a in range(0, len(seq), rows):
        part = seq[a : a + rows]
        seq[a : a + rows] = part[np.random.default_rng([seed, int(part[0])]).permutation(len(part))]
    return seq


class RowMetadata:
    """Row metadata of a cache too large to write here: what the loader's planner reads."""

    def __init__(self, seq_ids: np.ndarray, chunk_tokens: int):
        n = len(seq_ids)
        self.n_tokens, self.layers, self.d_model = n, [0], WIDTH
        self.seq_ids = seq_ids
        self.roles = np.zeros(n, np.int8)
        self._bounds = np.append(np.arange(0, n, chunk_tokens), n)

    def chunk_bounds(self) -> np.ndarray:
        return self._bounds.copy()


def distinct_per_batch(batches, seq_ids) -> float:
    return float(np.mean([len(np.unique(seq_ids[b])) for b in batches]))


def perfect_shuffle(train_rows: np.ndarray, seq_ids: np.ndarray, batch: int, n: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    return float(np.mean([len(np.unique(seq_ids[rng.choice(train_rows, batch, replace=False)])) for _ in range(n)]))


def mixing_at_scale(a) -> list[dict]:
    out = []
    for mix in [int(m) for m in a.mix_windows.split(",")]:
        seq = harvest_order(a.scale_seqs, 1024, mix)
        meta = RowMetadata(seq, 4096)
        assert isinstance(meta, PlannerReads), "the stand-in lacks what the loader's planner reads"
        t0 = time.perf_counter()
        ld = ShuffledLoader(
            meta, [0], 4096, seed=0, heldout_fraction=0.01, roles=None, window_tokens=WINDOW_TOKENS, announce=False
        )
        batches = list(ld.planned_rows(a.batches))
        plan_s = time.perf_counter() - t0
        train_rows = np.flatnonzero(np.unpackbits(ld.mask)[: meta.n_tokens].astype(bool))
        got = distinct_per_batch(batches, seq)
        ideal = perfect_shuffle(train_rows, seq, 4096, 20)
        win = ld.buffer_rows(0)
        gib = (2 * win + IN_FLIGHT * BATCH) * WIDTH * 2 / 2**30
        assert win <= WINDOW_AT_WIDTH, f"window buffers of {win} rows exceed the budget"
        out.append(
            {
                "rows": meta.n_tokens,
                "sequences": a.scale_seqs,
                "mix_window_seqs": mix,
                "window_buffer_rows": win,
                "loader_gib_per_layer_at_5120": round(gib, 2),
                "distinct_per_batch": round(got, 1),
                "perfect_shuffle": round(ideal, 1),
                "ratio": round(got / ideal, 3),
                "plan_seconds": round(plan_s, 1),
            }
        )
        print(
            f"mixing at scale: mix_window={mix:4d} seqs  loader {got:7.1f}  perfect {ideal:7.1f}  "
            f"-> {got / ideal:.1%}  (window buffers of {win} rows: {gib:.2f} GiB per layer at 5120 with "
            f"{IN_FLIGHT} batches in flight)",
            flush=True,
        )
        del seq, meta, ld, batches, train_rows
    return out


def mixing_real(a, tmp: Path) -> dict:
    """A real cache at 1/64 of the scale, same proportions (sequence length, chunk, window, mixing)."""
    n_seqs, seq_len, d = 1600, 1024 // 16, 16
    seq = harvest_order(n_seqs, seq_len, a.mix_window // 16)
    n = len(seq)
    url = str(tmp / "mixing")
    w = cf.create_cache(url, d_model=d, layers=[0], chunk_tokens=4096 // 16, shard_mib=1)
    rng = np.random.default_rng(0)
    o = np.argsort(seq, kind="stable")  # each row's position within its sequence: (seq_id, position) is unique
    starts = np.r_[0, np.flatnonzero(np.diff(seq[o])) + 1]
    pos = np.empty(n, np.int32)
    pos[o] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    with w.segment() as s:
        s.append(
            residuals={0: rng.standard_normal((n, d)).astype(BF16)},
            tokens=np.zeros(n, np.int32),
            seq_ids=seq,
            positions=pos,
            labels=np.full(n, -1, np.int8),
            roles=np.zeros(n, np.int8),
        )
    c = cf.open_cache(url)
    kw = dict(
        seed=0,
        heldout_fraction=0.01,
        roles=None,
        window_tokens=WINDOW_TOKENS // 16,
        announce=False,
        threads=max(int(t) for t in str(a.threads).split(",")),
    )
    batch = 4096 // 16
    plan = list(ShuffledLoader(c, [0], batch, **kw).planned_rows(a.batches))
    ld = ShuffledLoader(c, [0], batch, **kw)
    real = [b.rows for _, b in zip(range(a.batches), ld)]
    ld.close()
    assert all(np.array_equal(p, r) for p, r in zip(plan, real)), "the loader's batches differ from its plan"
    train_rows = np.flatnonzero(np.unpackbits(ld.mask)[:n].astype(bool))
    got, ideal = distinct_per_batch(real, seq), perfect_shuffle(train_rows, seq, batch, 50)
    print(
        f"mixing on a real cache ({n} rows, {n_seqs} seqs, batch {batch}): loader {got:.1f}  perfect {ideal:.1f}"
        f" -> {got / ideal:.1%}; yielded batches == plan",
        flush=True,
    )
    return {
        "rows": n,
        "sequences": n_seqs,
        "batch": batch,
        "distinct_per_batch": round(got, 1),
        "perfect_shuffle": round(ideal, 1),
        "ratio": round(got / ideal, 3),
        "batches_match_plan": True,
    }


def write_cache(url: str, x: np.ndarray, seq_len: int) -> None:
    n, d = x.shape
    w = cf.create_cache(url, d_model=d, layers=[0], chunk_tokens=4096, shard_mib=64)
    with w.segment() as s:
        s.append(
            residuals={0: x.astype(BF16)},
            tokens=np.zeros(n, np.int32),
            seq_ids=np.arange(n, dtype=np.int64) // seq_len,
            positions=(np.arange(n) % seq_len).astype(np.int32),
            labels=np.full(n, -1, np.int8),
            roles=np.zeros(n, np.int8),
        )


def raw_decode(c, threads: int, passes: int) -> tuple[float, float, float]:
    """(rows per wall second, rows per CPU second of this process (all threads), 0: no first batch)."""
    t0, c0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        rows = sum(len(x) for x in pool.map(lambda i: c.read_chunk(0, i % c.n_chunks), range(passes * c.n_chunks)))
    return rows / (time.perf_counter() - t0), rows / (time.process_time() - c0), 0.0


def loader_rate(c, threads: int, dtype, window: int, epochs: int, heldout: float) -> tuple[float, float, float]:
    """(rows per wall second, rows per CPU second, seconds to the first batch), from construction."""
    t0, c0 = time.perf_counter(), time.process_time()
    ld = ShuffledLoader(
        c,
        [0],
        4096,
        seed=0,
        heldout_fraction=heldout,
        roles=None,
        window_tokens=window,
        threads=threads,
        max_epochs=epochs,
        drop_last=False,
        announce=False,
        dtype=dtype,
    )
    rows, first = 0, 0.0
    for b in ld:
        rows += len(b)  # the batch is materialized on the device: what a trainer receives
        first = first or time.perf_counter() - t0
    return rows / (time.perf_counter() - t0), rows / (time.process_time() - c0), first


def gather_rate(c, window: int, passes: int) -> tuple[float, float, float]:
    """(rows per wall second, per CPU second, 0): one thread gathering shuffled batches of 4096 rows
    out of a decoded window (`np.take`, as the loader does): the cost of the shuffle's one copy."""
    n = min(window, c.n_tokens)
    win = np.concatenate([c.read_chunk(0, i).view(np.uint16) for i in range(-(-n // c.chunk_tokens))])[:n]
    out = np.empty((4096, c.d_model), np.uint16)
    t0, c0, rows = time.perf_counter(), time.process_time(), 0
    for p in range(passes * max(1, c.n_tokens // n)):
        perm = np.random.default_rng(p).permutation(n)
        for a in range(0, n - 4095, 4096):
            np.take(win, perm[a : a + 4096], axis=0, out=out, mode="clip")
            rows += 4096
    return rows / (time.perf_counter() - t0), rows / (time.process_time() - c0), 0.0


def throughput(a, tmp: Path) -> list[dict]:
    import torch

    datasets = []
    if a.minilm:
        try:
            sys.path.insert(0, str(ROOT / "bench"))
            from datasets import minilm  # bench/datasets.py

            sys.path.pop(0)
            x = minilm(a.rows, layers=(3,))[3]
            datasets.append(("MiniLM L3 (real, d=384)", x.astype(np.float32)))
        except Exception as e:  # the MiniLM package is optional
            print(f"MiniLM unavailable ({e}); Gaussian only", file=sys.stderr)
    rng = np.random.default_rng(0)
    datasets.append(("Gaussian d=1024", rng.standard_normal((a.rows, 1024)).astype(np.float32)))
    threads = [int(t) for t in str(a.threads).split(",")]
    out = []
    for name, x in datasets:
        url = str(tmp / name.split()[0].lower())
        write_cache(url, x, 256)
        c = cf.open_cache(url)
        sides = {"gather": lambda: gather_rate(c, a.window, a.epochs)}
        for t in threads:
            sides[f"raw_T{t}"] = lambda t=t: raw_decode(c, t, a.epochs)
            sides[f"loader_bf16_T{t}"] = lambda t=t: loader_rate(c, t, torch.bfloat16, a.window, a.epochs, a.heldout)
            sides[f"loader_fp32_T{t}"] = lambda t=t: loader_rate(c, t, torch.float32, a.window, a.epochs, a.heldout)
        wall, cpu, first = ({k: [] for k in sides} for _ in range(3))
        for r in range(a.rounds):
            names = list(sides)[r % len(sides) :] + list(sides)[: r % len(sides)]  # rotate the order each round
            for side in names:
                torch.set_num_threads(max(threads) if side == "gather" else int(side.rsplit("T", 1)[1]))
                w, per_cpu, f = sides[side]()
                wall[side].append(w)
                cpu[side].append(per_cpu)
                first[side].append(f)
        med = {k: float(np.median(v)) for k, v in wall.items()}
        mcpu = {k: float(np.median(v)) for k, v in cpu.items()}
        for t in threads:
            raw, bf, fp = med[f"raw_T{t}"], med[f"loader_bf16_T{t}"], med[f"loader_fp32_T{t}"]
            ceiling = 1 / (1 + raw / (t * med["gather"])) if t >= os.cpu_count() else 1.0
            out.append(
                {
                    "data": name,
                    "rows": len(x),
                    "d": x.shape[1],
                    "threads": t,
                    "cores": os.cpu_count(),
                    "window_rows": a.window,
                    "heldout_fraction": a.heldout,
                    "epochs": a.epochs,
                    "rounds": a.rounds,
                    "statistic": "median over rounds",
                    "first_batch_s": {
                        k: round(float(np.median(first[f"{k}_T{t}"])), 3) for k in ("loader_bf16", "loader_fp32")
                    },
                    "raw_decode_rows_s": round(raw),
                    "loader_bf16_rows_s": round(bf),
                    "loader_fp32_rows_s": round(fp),
                    "gather_rows_s": round(med["gather"]),
                    "ratio_bf16": round(bf / raw, 3),
                    "ratio_fp32": round(fp / raw, 3),
                    "copy_bound_ceiling": round(ceiling, 3),
                    "rounds_rows_s": {
                        k: [round(v) for v in vs] for k, vs in wall.items() if k == "gather" or k.endswith(f"_T{t}")
                    },
                    "rows_per_cpu_s": {k: round(v) for k, v in mcpu.items() if k == "gather" or k.endswith(f"_T{t}")},
                    "cpu_ratio_bf16": round(mcpu[f"loader_bf16_T{t}"] / mcpu[f"raw_T{t}"], 3),
                    "cpu_ratio_fp32": round(mcpu[f"loader_fp32_T{t}"] / mcpu[f"raw_T{t}"], 3),
                }
            )
            print(
                f"{name:24s} T={t}: raw decode {raw:>9,.0f} rows/s | loader bf16 {bf:>9,.0f} ({bf / raw:.0%}) | "
                f"fp32 {fp:>9,.0f} ({fp / raw:.0%}) | per CPU-second bf16 "
                f"{mcpu[f'loader_bf16_T{t}'] / mcpu[f'raw_T{t}']:.0%}, fp32 "
                f"{mcpu[f'loader_fp32_T{t}'] / mcpu[f'raw_T{t}']:.0%} | copy-bound ceiling {ceiling:.0%} "
                f"(gather {med['gather']:,.0f} rows/s on one thread) | first batch "
                f"{np.median(first[f'loader_bf16_T{t}']):.2f}s; medians of {a.rounds} rounds",
                flush=True,
            )
    return out


def digest_cost(a, tmp: Path) -> dict:
    """What checking every read costs the loader: CPU-seconds per row with the checks (shard-index
    CRC32C + per-chunk XXH3, cache format 2) against the same loader with them off, over
    interleaved rounds (order alternated), medians. Target: at most 5%."""
    import torch

    from cache_format import integrity
    from cache_format.codecs import index_nbytes, parse_index
    from cache_format.read import ArrayReader

    x = np.random.default_rng(1).standard_normal((a.rows, 1024)).astype(np.float32)
    url = str(tmp / "digest")
    write_cache(url, x, 256)
    c = cf.open_cache(url)
    t = min(int(v) for v in str(a.threads).split(","))
    torch.set_num_threads(t)
    cpu = {"checked": [], "unchecked": []}
    wall = {"checked": [], "unchecked": []}
    for r in range(a.rounds):
        for side in ("checked", "unchecked") if r % 2 == 0 else ("unchecked", "checked"):
            integrity.CHECK_READS = side == "checked"
            try:
                w, per_cpu, _ = loader_rate(cf.open_cache(url), t, torch.bfloat16, a.window, a.epochs, a.heldout)
            finally:
                integrity.CHECK_READS = True
            cpu[side].append(1 / per_cpu)
            wall[side].append(w)
    med = {k: float(np.median(v)) for k, v in cpu.items()}
    rounds_cost = [a_ / b_ - 1 for a_, b_ in zip(cpu["checked"], cpu["unchecked"])]
    cost = float(np.median(rounds_cost))
    # The same cost accounted directly, robust to a busy box: thread CPU time of the checks alone
    # (every chunk's XXH3 and its shard's index CRC32C, as a read does them) per row.
    loc, entry = c.log.loc, c.log.segments[0].layers[0]
    arr = ArrayReader(loc, entry["array"], entry["objects"])
    n_idx = index_nbytes(arr.per_shard)
    tails, blobs = {}, []
    for k in range(arr.n_chunks):
        s, j = divmod(k, arr.per_shard)
        key, size = f"{arr.path}/{arr.shard_key(s)}", arr.objects[arr.shard_key(s)]["size"]
        if s not in tails:
            tails[s] = bytes(loc.read_range(key, size - n_idx, size))
        idx = parse_index(tails[s], arr.per_shard)
        blobs.append(loc.read_range(key, int(idx[j, 0]), int(idx[j, 0] + idx[j, 1])))
    tail = tails[0]
    t0 = time.thread_time()
    for _ in range(5):
        for b in blobs:
            integrity.chunk_digest(b)
            integrity.index_ok(tail, arr.per_shard)
    check_s_per_row = (time.thread_time() - t0) / 5 / c.n_tokens
    accounted = check_s_per_row / med["unchecked"]
    print(
        f"digest cost (Gaussian d=1024, {a.rows} rows, T={t}): {cost:+.2%} CPU-seconds per row (median of "
        f"{a.rounds} interleaved rounds; per round {', '.join(f'{v:+.1%}' for v in rounds_cost)}); the checks "
        f"alone: {accounted:.2%} of the loader's CPU-seconds; target <= 5%",
        flush=True,
    )
    return {
        "data": "Gaussian d=1024",
        "rows": a.rows,
        "threads": t,
        "rounds": a.rounds,
        "epochs": a.epochs,
        "cpu_s_per_mrow": {k: round(v * 1e6, 3) for k, v in med.items()},
        "loader_rows_s": {k: round(float(np.median(v))) for k, v in wall.items()},
        "cost_median_of_rounds": round(cost, 4),
        "cost_per_round": [round(v, 4) for v in rounds_cost],
        "checks_alone_share_of_loader_cpu": round(accounted, 5),
        "chunks": c.n_chunks,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--threads", default="1,2", help="decode threads T (comma list), the same for raw decode and the loader"
    )
    p.add_argument("--rows", type=int, default=262144, help="rows per throughput dataset")
    p.add_argument("--window", type=int, default=32768, help="the loader's shuffle window (rows)")
    p.add_argument(
        "--heldout",
        type=float,
        default=0.01,
        help="held-out fraction the loader skips (train.heldout_fraction's default): its rows are decoded too",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--epochs",
        type=int,
        default=4,
        help="passes over the shards per side: a trainer's steady state, start-up included once",
    )
    p.add_argument("--minilm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--batches", type=int, default=64, help="batches measured for mixing")
    p.add_argument("--scale-seqs", type=int, default=100_000)
    p.add_argument("--mix-windows", default="0,256,1024", help="harvest.mix_window values (sequences) at scale")
    p.add_argument("--mix-window", type=int, default=1024, help="harvest.mix_window of the real cache (scaled /16)")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument(
        "--digest-cost-only",
        action="store_true",
        help="only the cost of checking every read (loader with and without the checks)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "loader.json")
    a = p.parse_args(argv)
    result = {
        "command": " ".join(["python", "bench/bench_loader.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
        "load_avg": os.getloadavg()[0],
    }
    if a.digest_cost_only:
        with tempfile.TemporaryDirectory() as tmp:
            result = {**result, "digest_cost": digest_cost(a, Path(tmp))}
        out = a.out.with_name("loader_digest_cost.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        result["digest_cost"] = digest_cost(a, Path(tmp))
        result["throughput"] = throughput(a, Path(tmp))
        result["mixing_real"] = mixing_real(a, Path(tmp))
    if not a.skip_scale:
        result["mixing_scale"] = mixing_at_scale(a)
    elif a.out.exists():  # keep the last at-scale plan rather than dropping it
        result["mixing_scale"] = json.loads(a.out.read_text()).get("mixing_scale")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
