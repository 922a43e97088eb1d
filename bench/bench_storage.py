"""Storage benchmark: size, write rate and read rate of the cache format, side by side.

For each dataset (MiniLM hidden states; the tiny model's when harvest is installed) and
each codec, in one run on the same data, shapes and thread count:

- bytes per token per layer against raw bf16 (2·d bytes), and a bit-exact read-back check;
- write MB/s through the segment writer (raw bf16 bytes in / wall time: running stats,
  encode, checksums and commit included) beside the codec's raw encode rate on the same
  chunks with the same threads;
- sequential read GB/s through `Cache.read_chunk` (the loader's path: range read + decode)
  against the codec's raw decode rate on the very same chunk payloads, already in memory,
  with the same threads, in interleaved best-of-7 rounds (wall and CPU seconds). Files are in the page cache (a
  warm-up pass first), so "read" measures the format's overhead over decode, not the disk.

    .venv/bin/python bench/bench_storage.py [--tokens 65536] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numcodecs
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets as bench_data  # noqa: E402

import cache_format as cf  # noqa: E402
from cache_format.codecs import index_nbytes, parse_index  # noqa: E402
from cache_format.read import ArrayReader  # noqa: E402

CODECS = ["blosc-zstd1", "blosc-lz4", "zstd3", "none"]


def write(url: str, arrays: dict, codec: str, chunk_tokens: int, batch: int) -> float:
    d = next(iter(arrays.values())).shape[1]
    n = next(iter(arrays.values())).shape[0]
    t0 = time.perf_counter()
    w = cf.create_cache(
        url, d_model=d, layers=sorted(arrays), codec=codec, chunk_tokens=chunk_tokens, meta={"bench": "storage"}
    )
    with w.segment() as seg:
        for s in range(0, n, batch):
            e = min(n, s + batch)
            seg.append(
                residuals={L: a[s:e] for L, a in arrays.items()},
                tokens=np.zeros(e - s, np.int32),
                seq_ids=np.arange(s, e) // 256,
                positions=np.arange(s, e) % 256,
            )
    return time.perf_counter() - t0


def arrays_of(c: cf.Cache, layer: int) -> list[ArrayReader]:
    """A reader of each segment's array of `layer`, from the cache's log (the public record-level API)."""
    return [ArrayReader(c.log.loc, s.layers[layer]["array"], s.layers[layer]["objects"]) for s in c.log.segments]


def payloads(c: cf.Cache, layer: int) -> list[tuple[bytes, int]]:
    """The encoded bytes of every chunk of a layer, read straight from the shard files."""
    out = []
    for r in arrays_of(c, layer):
        for s in range(-(-r.shape[0] // r.shard_rows)):
            key = f"{r.path}/{r.shard_key(s)}"
            blob = open(os.path.join(c.log.loc.root, *key.split("/")), "rb").read()
            idx = parse_index(blob[-index_nbytes(r.per_shard) :], r.per_shard)
            for off, nb in idx:
                if off != 2**64 - 1:
                    out.append((blob[int(off) : int(off + nb)], r.chunk_rows * r.shape[1] * 2))
    return out


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return r.ru_utime + r.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of fn(); CPU time is robust to other load on the machine."""
    w, c = time.perf_counter(), _cpu()
    fn()
    return time.perf_counter() - w, _cpu() - c


def rates(read, jobs, decode, blobs, threads: int, rounds: int = 7) -> dict:
    """Best-of-N wall and CPU seconds for the read path and for raw decode, in interleaved
    rounds with one shared pool, so that load from other work hits both sides alike."""
    best = {"read": [float("inf")] * 2, "decode": [float("inf")] * 2}
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(read, jobs))  # warm-up: page cache and mappings
        list(ex.map(decode, blobs))
        for _ in range(rounds):
            for name, fn, items in (("read", read, jobs), ("decode", decode, blobs)):
                w, c = timed(lambda: list(ex.map(fn, items)))
                best[name] = [min(best[name][0], w), min(best[name][1], c)]
    return best


def encoder(codec: str):
    """The same codec as a plain numcodecs object, for the raw encode baseline."""
    if codec == "none":
        return lambda a: a.tobytes()
    if codec.startswith("blosc-"):
        cname, level = ("lz4", 5) if codec == "blosc-lz4" else ("zstd", int(codec[len("blosc-zstd") :]))
        return numcodecs.Blosc(cname=cname, clevel=level, shuffle=numcodecs.Blosc.SHUFFLE, blocksize=1 << 20).encode
    return numcodecs.Zstd(level=int(codec[4:])).encode


def encode_seconds(codec: str, arrays: dict, chunk_tokens: int, threads: int) -> tuple[float, float]:
    enc = encoder(codec)
    chunks = [
        np.ascontiguousarray(a.view(np.uint16)[s : s + chunk_tokens])
        for a in arrays.values()
        for s in range(0, len(a), chunk_tokens)
    ]
    with ThreadPoolExecutor(threads) as ex:
        return timed(lambda: list(ex.map(enc, chunks)))


def bench_dataset(name: str, arrays: dict, args, tmp: str) -> dict:
    layers = sorted(arrays)
    n, d = arrays[layers[0]].shape
    raw = n * d * 2
    res = {"dataset": name, "tokens": n, "d_model": d, "layers": layers, "codecs": {}}
    for codec in CODECS:
        url = os.path.join(tmp, f"{name}-{codec}")
        secs, write_cpu = timed(lambda: write(url, arrays, codec, args.chunk_tokens, args.batch))
        enc_secs, enc_cpu = encode_seconds(codec, arrays, args.chunk_tokens, args.threads)
        c = cf.open_cache(url)
        lossless = all(
            np.array_equal(c.residuals(L).numpy().view(np.uint16), arrays[L].view(np.uint16)) for L in layers
        )
        per_layer = {}
        for L in layers:
            stored = sum(v["size"] for s in c.log.segments for v in s.layers[L]["objects"].values())
            per_layer[L] = {"bytes_per_token": stored / n, "ratio_vs_raw": stored / raw}
        jobs = [(L, i) for L in layers for i in range(c.n_chunks)]
        decode = arrays_of(c, layers[0])[0].decode
        blobs = [p for L in layers for p in payloads(c, L)]
        best = rates(lambda j: c.read_chunk(*j), jobs, lambda p: decode(*p), blobs, args.threads)
        (t_read, cpu_read), (t_dec, cpu_dec) = best["read"], best["decode"]
        decoded = sum(nb for _, nb in blobs)
        res["codecs"][codec] = {
            "lossless": lossless,
            "layers": per_layer,
            "write_MBps": raw * len(layers) / secs / 1e6,
            "raw_encode_MBps": raw * len(layers) / enc_secs / 1e6,
            "read_GBps": raw * len(layers) / t_read / 1e9,
            "raw_decode_GBps": decoded / t_dec / 1e9,
            "read_vs_decode": (raw * len(layers) / t_read) / (decoded / t_dec),
            "read_vs_decode_cpu": (raw * len(layers) / cpu_read) / (decoded / cpu_dec),
            "write_vs_encode_cpu": enc_cpu / write_cpu,
        }
        shutil.rmtree(url)
        print(
            f"  {name} {codec}: ratio {np.mean([v['ratio_vs_raw'] for v in per_layer.values()]):.3f} "
            f"write {res['codecs'][codec]['write_MBps']:.0f} MB/s read {res['codecs'][codec]['read_GBps']:.2f} GB/s "
            f"decode {res['codecs'][codec]['raw_decode_GBps']:.2f} GB/s",
            file=sys.stderr,
        )
    # For reference: blosc's default block size on the same chunks (size only).
    ref = numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE, blocksize=0)
    sizes = {}
    for L in layers:
        a = arrays[L].view(np.uint16)
        sizes[L] = (
            sum(
                len(ref.encode(np.ascontiguousarray(a[s : s + args.chunk_tokens])))
                for s in range(0, n, args.chunk_tokens)
            )
            / raw
        )
    res["blosc_default_blocksize_ratio"] = sizes
    return res


def write_breakdown(arrays: dict, args) -> dict:
    """CPU seconds of the writer's parts, each alone, against the whole writer (blosc-zstd1)."""
    from cache_format import log
    from cache_format.stats import RunningStats

    enc = encoder("blosc-zstd1")
    bits = [a.view(np.uint16) for a in arrays.values()]
    parts = {
        "blosc encode": lambda: [
            enc(np.ascontiguousarray(b[i : i + args.chunk_tokens]))
            for b in bits
            for i in range(0, len(b), args.chunk_tokens)
        ],
        "running stats": lambda: [RunningStats(b.shape[1]).update_bits(b) for b in bits],
        f"object digest ({log.DIGEST})": lambda: [log.digest(b.tobytes()) for b in bits],
    }
    out = {name: timed(fn)[1] for name, fn in parts.items()}
    tmp = tempfile.mkdtemp(prefix="bench-storage-")
    try:
        out["writer (all)"] = timed(
            lambda: write(os.path.join(tmp, "c"), arrays, "blosc-zstd1", args.chunk_tokens, args.batch)
        )[1]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["zarr assembly + disk + rows (rest)"] = out["writer (all)"] - sum(out[k] for k in parts)
    return out


def markdown(results: list[dict], args) -> str:
    lines = [
        f"Command: `.venv/bin/python bench/bench_storage.py --tokens {args.tokens} --threads {args.threads}` "
        f"(chunk {args.chunk_tokens} rows, one segment, appends of {args.batch} rows).",
        "",
        "Size (lossless = bit-exact read-back of every value):",
        "",
        "| data | layer | d | " + " | ".join(CODECS) + " | blosc-zstd1, blosc's default block |",
        "|---|---|---|" + "---|" * (len(CODECS) + 1),
    ]
    for r in results:
        for L in r["layers"]:
            cells = []
            for cd in CODECS:
                e = r["codecs"][cd]
                v = e["layers"][L]
                cells.append(
                    f"{v['bytes_per_token']:.0f} B/tok ({v['ratio_vs_raw']:.3f}×)" + ("" if e["lossless"] else " LOSSY")
                )
            lines.append(
                f"| {r['dataset']} | {L} | {r['d_model']} | "
                + " | ".join(cells)
                + f" | {r['blosc_default_blocksize_ratio'][L]:.3f}× |"
            )
    lines += [
        "",
        f"Rates ({args.threads} threads; read = `Cache.read_chunk` over every chunk of every layer, "
        "decode = numcodecs on the same chunk payloads already in memory):",
        "",
        "| data | codec | write MB/s | raw encode MB/s | write / encode (CPU s) | read GB/s "
        "| raw decode GB/s | read / decode (wall) | read / decode (CPU s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for cd in CODECS:
            e = r["codecs"][cd]
            lines.append(
                f"| {r['dataset']} | {cd} | {e['write_MBps']:.0f} | {e['raw_encode_MBps']:.0f} | "
                f"{e['write_vs_encode_cpu']:.2f} | {e['read_GBps']:.2f} | {e['raw_decode_GBps']:.2f} | "
                f"{e['read_vs_decode']:.2f} | {e['read_vs_decode_cpu']:.2f} |"
            )
    b = results[0].get("write_breakdown")
    if b:
        mb = results[0]["tokens"] * results[0]["d_model"] * 2 * len(results[0]["layers"]) / 1e6
        lines += [
            "",
            f"Writer CPU seconds by part, {results[0]['dataset']}, blosc-zstd1 ({mb:.0f} MB raw): "
            + ", ".join(f"{k} {v:.2f}" for k, v in b.items())
            + ".",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk-tokens", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8192, help="rows per append (like harvest's batches)")
    p.add_argument("--out", default=str(bench_data.ROOT / "bench" / "results" / "storage.json"))
    args = p.parse_args()
    datasets = [("MiniLM-L6 (trained)", bench_data.minilm(args.tokens))]
    tiny = bench_data.tiny(args.tokens)
    if tiny is not None:
        datasets.append(("tiny Qwen3.5 (random init)", tiny))
    tmp = tempfile.mkdtemp(prefix="bench-storage-")
    try:
        results = [bench_dataset(name, arrays, args, tmp) for name, arrays in datasets]
        results[0]["write_breakdown"] = write_breakdown(datasets[0][1], args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))
    print(markdown(results, args))


if __name__ == "__main__":
    main()
