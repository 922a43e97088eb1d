"""Sync speed side by side: `cache_format sync` against the ecosystem's own bulk copies, on the
same objects, in one run; and the bytes a partial sync moves.

Data: MiniLM-L6 hidden states (bench/datasets.py; d=384, layers 1/3/5; 65,536 real tokens,
tiled to fill), written with the format's defaults (blosc-zstd1, chunks of 4,096 rows, shards of
256 MiB raw: one ~177 MiB object per layer and segment, the objects a real harvest writes), plus
each segment's rows, sequences and stats. Routes, each best of `--repeats` runs, ours and the
peer alternating which goes first:

- local → S3: ours vs s3fs's `put(recursive=True)` of the cache directory;
- S3 → local: ours vs s3fs's `get(recursive=True)` of the same objects;
- HTTP → local: ours vs fsspec's HTTPFileSystem `get` of every file's URL, from aiohttp's static
  file server (sendfile: the server costs almost nothing, so this measures the clients' CPU),
  and again behind a link of each `--links` speed (bench/paced_http.py: one budget of bytes per
  second shared by every connection, as a remote server's transfers share a network link).

S3 is moto's standalone server and the HTTP servers are aiohttp, each in its own process on
loopback. s3fs and fsspec are this project's own dependencies, so they run in this process (the
issue's peers-in-their-own-environment rule is for sae-lens/sparsify). Ours does more per byte:
it checks every object's size and digest (BLAKE3, format 3's) as the bytes pass, writes
through resumable partial files / multipart uploads, and commits the log records; the peers
copy bytes. Rates are the
cache's bytes over wall seconds; CPU is per GB, of this process (the client) and the server's.
The digest line is the floor of that check on this machine, CPU-s/GB (and BLAKE2b-256's, format 2's).

    .venv/bin/python bench/bench_sync.py [--segments 1] [--shard-mib 256] [--repeats 3] [--threads 4]
        [--links 10000,1000] [--only HTTP]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets as bench_data  # noqa: E402

import cache_format as cf  # noqa: E402
from cache_format import log, ops  # noqa: E402
from cache_format.stores import Location  # noqa: E402
from cache_format.sync import sync  # noqa: E402

LAYERS = (1, 3, 5)
REAL_TOKENS = 65536  # MiniLM tokens computed; tiled to the segments' rows


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int, proc) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.args}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"server did not start: {proc.args}")


def write_source(url: str, segments: int, shard_mib: int) -> None:
    """`segments` segments of one shard of `shard_mib` MiB (raw) per layer, appended in 8,192-row batches."""
    arrays = bench_data.minilm(REAL_TOKENS, LAYERS)
    d = next(iter(arrays.values())).shape[1]
    w = cf.create_cache(url, d_model=d, layers=list(LAYERS), shard_mib=shard_mib, meta={"bench": "sync"})
    rows = w.snapshot().shard_rows
    for si in range(segments):
        with w.segment() as seg:
            for s in range(0, rows, 8192):
                e = min(rows, s + 8192)
                idx = (np.arange(s, e) + si * rows) % REAL_TOKENS
                g = np.arange(s, e) + si * rows
                seg.append(
                    residuals={L: a[idx] for L, a in arrays.items()},
                    tokens=(idx % 30000).astype(np.int32),
                    seq_ids=g // 256,
                    positions=g % 256,
                )
            first, last = si * rows // 256, (si * rows + rows - 1) // 256
            seg.add_sequences([{"seq_id": q, "token_ids": list(range(256))} for q in range(first, last + 1)])


def files(root: str) -> dict[str, int]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = os.path.getsize(p)
    return out


def _cpu(pid: int | None = None) -> float:
    """CPU seconds of this process (pid None) or of a server process."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def digest_cpu_s_per_gb(name: str) -> float:
    """CPU seconds per GB of an object digest (log.DIGESTS) here, best of 3 over 256 MiB."""
    data = memoryview(bytearray(os.urandom(1 << 20)) * 256)
    best = float("inf")
    for _ in range(3):
        c = _cpu()
        h = log.DIGESTS[name]()
        for a in range(0, len(data), 16 << 20):
            h.update(data[a : a + (16 << 20)])
        best = min(best, _cpu() - c)
    return best * 1e9 / len(data)


def timed(fn, server: int) -> tuple[float, float, float]:
    """(wall s, this process's CPU s, the server's CPU s) of one run."""
    c0, s0, t0 = _cpu(), _cpu(server), time.perf_counter()
    fn()
    return time.perf_counter() - t0, _cpu() - c0, _cpu(server) - s0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segments", type=int, default=1)
    ap.add_argument("--shard-mib", type=int, default=256, help="Raw MiB per shard (the format's default).")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument(
        "--links", default="10000,1000", help="Link speeds (Mbit/s) to repeat the HTTP route behind; '' for none."
    )
    ap.add_argument("--only", default=None, help="Run only the routes whose name contains this (e.g. HTTP).")
    ap.add_argument("--json", default=None, help="Also write the results here.")
    args = ap.parse_args(argv)

    import fsspec
    import s3fs

    load_before = os.getloadavg()
    links = [int(x) for x in args.links.split(",") if x.strip()]
    floor = {name: round(digest_cpu_s_per_gb(name), 3) for name in log.DIGESTS}
    print(f"object digests here, CPU-s/GB: {floor} (this cache's: {log.DIGEST})", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    procs = []
    try:
        src = str(tmp / "site" / "c")
        write_source(src, args.segments, args.shard_mib)
        ops.publish(Location(src))
        objects = files(src)
        total = sum(objects.values())

        env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
        s3_port, http_port = _port(), _port()
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        serve = (
            "import sys; from aiohttp import web; app = web.Application(); "
            "app.router.add_static('/', sys.argv[1]); web.run_app(app, host='127.0.0.1', port=int(sys.argv[2]), "
            "print=None, access_log=None)"
        )
        procs.append(subprocess.Popen([sys.executable, "-c", serve, str(tmp / "site"), str(http_port)]))
        paced = {}  # link Mbit/s → (port, process)
        script = str(Path(__file__).parent / "paced_http.py")
        for mbit in links:
            port = _port()
            proc = subprocess.Popen([sys.executable, script, str(tmp / "site"), str(port), str(mbit)])
            paced[mbit] = port, proc
            procs.append(proc)
        _wait(s3_port, procs[0])
        _wait(http_port, procs[1])
        for port, proc in paced.values():
            _wait(port, proc)
        opts = {
            "endpoint_url": f"http://127.0.0.1:{s3_port}",
            "key": "bench",
            "secret": "bench",
            "client_kwargs": {"region_name": "us-east-1"},
        }
        s3 = s3fs.S3FileSystem(**opts)
        s3.call_s3("create_bucket", Bucket="bench")
        s3.put(src, "bench/base", recursive=True)  # the S3 source both sides read
        http = fsspec.filesystem("http")

        def clear_s3(prefix):
            if s3.exists(f"bench/{prefix}"):
                s3.rm(f"bench/{prefix}", recursive=True)

        def clear_local(name):
            shutil.rmtree(tmp / name, ignore_errors=True)

        moto_pid, http_pid = procs[0].pid, procs[1].pid
        routes = {
            "local → S3": (
                lambda i: sync(src, f"s3://bench/ours{i}", None, opts, threads=args.threads),
                lambda i: s3.put(src, f"bench/peer{i}", recursive=True),
                lambda i: (clear_s3(f"ours{i}"), clear_s3(f"peer{i}")),
                "s3fs put(recursive=True)",
                moto_pid,
            ),
            "S3 → local": (
                lambda i: sync("s3://bench/base", str(tmp / f"ours{i}"), opts, None, threads=args.threads),
                lambda i: s3.get("bench/base", str(tmp / f"peer{i}"), recursive=True),
                lambda i: (clear_local(f"ours{i}"), clear_local(f"peer{i}")),
                "s3fs get(recursive=True)",
                moto_pid,
            ),
        }

        def http_route(port: int, pid: int):
            base_url = f"http://127.0.0.1:{port}/c"
            return (
                lambda i: sync(base_url, str(tmp / f"ours{i}"), threads=args.threads),
                lambda i: http.get([f"{base_url}/{k}" for k in objects], [str(tmp / f"peer{i}" / k) for k in objects]),
                lambda i: (clear_local(f"ours{i}"), clear_local(f"peer{i}")),
                "fsspec HTTPFileSystem.get",
                pid,
            )

        routes["HTTP → local"] = http_route(http_port, http_pid)
        for mbit, (port, proc) in paced.items():
            routes[f"HTTP → local, {mbit / 1000:g} Gbit/s link"] = http_route(port, proc.pid)
        if args.only:
            routes = {k: v for k, v in routes.items() if args.only.lower() in k.lower()}
        results = {}
        for name, (ours, peer, clear, peer_name, server) in routes.items():
            load = os.getloadavg()[0]
            runs: dict[str, list] = {"ours": [], "peer": []}
            for i in range(args.repeats):
                pair = [("ours", ours), ("peer", peer)]
                for side, fn in pair if i % 2 == 0 else pair[::-1]:
                    runs[side].append(timed(lambda fn=fn: fn(i), server))
                if i == 0 and name == "S3 → local":  # the same objects
                    assert files(str(tmp / "ours0")).keys() >= {k for k in objects if k != "index.json"}
                clear(i)
            best = {side: min(r, key=lambda t: t[0]) for side, r in runs.items()}
            rate = {side: total / b[0] / 1e6 for side, b in best.items()}
            results[name] = {
                "peer": peer_name,
                "ours_MBps": round(rate["ours"], 1),
                "peer_MBps": round(rate["peer"], 1),
                "ratio": round(rate["ours"] / rate["peer"], 3),
                # CPU seconds per GB of the best run: the client (this process) and the server process
                "ours_cpu_s_per_GB": [round(c * 1e9 / total, 2) for c in best["ours"][1:]],
                "peer_cpu_s_per_GB": [round(c * 1e9 / total, 2) for c in best["peer"][1:]],
                # the client's CPU s/GB in the median run by CPU (less sensitive to a busy machine than the best wall)
                "ours_client_cpu_median": round(statistics.median(r[1] for r in runs["ours"]) * 1e9 / total, 2),
                "peer_client_cpu_median": round(statistics.median(r[1] for r in runs["peer"]) * 1e9 / total, 2),
                "ours_s": [round(r[0], 3) for r in runs["ours"]],
                "peer_s": [round(r[0], 3) for r in runs["peer"]],
                "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
            }
            cpu = (results[name]["ours_cpu_s_per_GB"][0], results[name]["peer_cpu_s_per_GB"][0])
            print(
                f"{name:<30} ours {rate['ours']:7.1f} MB/s   {peer_name} {rate['peer']:7.1f} MB/s   "
                f"ratio {rate['ours'] / rate['peer']:.2f}   client CPU s/GB: ours {cpu[0]}, peer {cpu[1]}   "
                f"load {load:.1f} → {os.getloadavg()[0]:.1f}",
                flush=True,
            )

        partial = None
        if not args.only:
            full = sync(src, str(tmp / "full"))["bytes"]
            one = sync(src, str(tmp / "one"), layers=[3])["bytes"]
            partial = {"full_bytes": full, "one_layer_bytes": one, "ratio": round(one / full, 3)}
            print(f"partial: one layer of three moves {one:,} of {full:,} bytes ({one / full:.3f}×)")
        out = {
            "segments": args.segments,
            "shard_mib": args.shard_mib,
            "d_model": 384,
            "layers": list(LAYERS),
            "objects": len(objects),
            "bytes": total,
            "threads": args.threads,
            "repeats": args.repeats,
            "links_mbit_s": links,
            "digest_cpu_s_per_GB": floor,
            "routes": results,
            "partial": partial,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "cpus": os.cpu_count(),
        }
        print(json.dumps(out, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
