"""Fault figures on the tiny profile: crashes, corrupted bytes and a flaky server.

1. kill -9 of `harvest run` at N points, then the same command again: rows, commit order and
   fingerprint against an uninterrupted run of the same command.
2. kill -9 of `train run` at N points (after its first checkpoint), then the same command again:
   exported weights (bit for bit) and run.json's layer fingerprint against an uninterrupted run.
3. Byte flips, one at a time at random offsets of residual shards, row columns, stats and
   sequences: caught by a read of everything (IntegrityError) and by `verify`; edits to commit
   records and to the root: refused by readers and by `verify`.
4. A flaky HTTP server (Range-capable, loopback) that truncates, drops, returns 500, shortens
   and flips the bytes of a share of its answers at random: full reads and `train run` over it
   against local.
5. N `harvest run` processes started at once on one cache (new, and seeded with a first part
   of the run), for N in --concurrent: (seq_id, position) pairs held twice, fingerprint against
   one uninterrupted process, and wall time against that one process.

    python bench/bench_faults.py                       # N=3 kill points each (a few minutes on 2 cores)
    python bench/bench_faults.py --kills 5 --flips 40
    python bench/bench_faults.py --parts concurrency --concurrent 2,3,4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ACTCACHE_BACKOFF_S", "0.02")

import cache_format as cf  # noqa: E402
from cache_format import integrity, log, ops  # noqa: E402
from cache_format.stores import Location  # noqa: E402

HARVEST = [
    sys.executable,
    "-m",
    "harvest",
    "run",
    "--profile",
    "tiny",
    "--source",
    "corpus",
    "--layers",
    "1,4",
    "--quiet",
    "--set",
    "corpus.seq_len=64",
    "--set",
    "harvest.segment_sequences=4",
    "--set",
    "harvest.batch_size=4",
    "--set",
    "harvest.chunk_tokens=128",
]
TRAIN = [
    sys.executable,
    "-m",
    "train",
    "run",
    "--profile",
    "tiny",
    "--no-progress",
    "--layers",
    "1",
    "--set",
    "train.d_sae=128",
    "--set",
    "train.k=4",
    "--set",
    "train.batch_size=256",
    "--set",
    "train.geometric_median_samples=512",
    "--set",
    "train.shuffle_buffer_tokens=4096",
    "--set",
    "train.eval_tokens=1024",
    "--set",
    "train.checkpoint_every_tokens=4096",
    "--set",
    "train.eval_every_tokens=4096",
]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def _summary(url: str) -> dict:
    c = cf.open_cache(url)
    return {
        "fingerprint": c.fingerprint,
        "units": [s.meta["unit"] for s in c.segments],
        "tokens": np.asarray(c.tokens[:]),
        "seq_ids": np.asarray(c.seq_ids[:]),
        "n": c.n_tokens,
    }


def _same_cache(a: dict, b: dict) -> dict:
    rows = sorted(zip(a["seq_ids"].tolist(), a["tokens"].tolist())) == sorted(
        zip(b["seq_ids"].tolist(), b["tokens"].tolist())
    )
    return {
        "rows": rows,
        "order": bool(np.array_equal(a["tokens"], b["tokens"]) and a["units"] == b["units"]),
        "fingerprint": a["fingerprint"] == b["fingerprint"],
    }


def _wait_for(pred, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def harvest_kills(tmp: Path, n: int, tokens: int, rng: random.Random) -> dict:
    ref = str(tmp / "h_ref")
    t0 = time.time()
    subprocess.run([*HARVEST, "--cache", ref, "--tokens", str(tokens)], env=ENV, check=True, stderr=subprocess.DEVNULL)
    dur = time.time() - t0
    want = _summary(ref)
    out = []
    for i in range(n):
        url = str(tmp / f"h_kill{i}")
        p = subprocess.Popen([*HARVEST, "--cache", url, "--tokens", str(tokens)], env=ENV, stderr=subprocess.DEVNULL)

        target = rng.randrange(1, len(want["units"]) - 1)  # kill once this many segments are committed

        def committed():
            try:
                return len(cf.open_cache(url).segments) >= target
            except cf.CacheError:
                return False

        _wait_for(committed, p)
        time.sleep(rng.uniform(0, 0.2))
        killed = p.poll() is None
        p.send_signal(signal.SIGKILL)
        p.wait()
        before = len(cf.open_cache(url).segments)
        subprocess.run(
            [*HARVEST, "--cache", url, "--tokens", str(tokens)], env=ENV, check=True, stderr=subprocess.DEVNULL
        )
        got = _same_cache(_summary(url), want)
        out.append({"killed_mid_run": killed, "segments_before_resume": before, **got})
        print(
            f"harvest kill {i + 1}/{n}: {before} of {len(want['units'])} segments committed when killed; "
            f"rows {got['rows']}, order {got['order']}, fingerprint {got['fingerprint']}",
            flush=True,
        )
    return {
        "points": n,
        "tokens": tokens,
        "uninterrupted_s": round(dur, 1),
        "runs": out,
        "identical_rows": sum(r["rows"] for r in out),
        "identical_order": sum(r["order"] for r in out),
        "identical_fingerprint": sum(r["fingerprint"] for r in out),
    }


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    w = {}
    for sae in sorted(p for p in out.iterdir() if (p / "sae_weights.safetensors").exists()):
        w[sae.name] = {k: v.numpy() for k, v in load_file(str(sae / "sae_weights.safetensors")).items()}
    run = json.loads((out / "run.json").read_text())
    return {"weights": w, "fingerprints": [run.get("cache_fingerprint"), run.get("layer_fingerprints")]}


def _same_weights(a: dict, b: dict) -> bool:
    return a["weights"].keys() == b["weights"].keys() and all(
        all(np.array_equal(a["weights"][s][k], b["weights"][s][k]) for k in a["weights"][s]) for s in a["weights"]
    )


def train_kills(tmp: Path, cache: str, n: int, tokens: int, rng: random.Random) -> dict:
    args = [*TRAIN, "--cache", cache, "--set", f"train.training_tokens={tokens}"]
    ref = tmp / "t_ref"
    t0 = time.time()
    subprocess.run([*args, "--out", str(ref)], env=ENV, check=True, stderr=subprocess.DEVNULL)
    dur = time.time() - t0
    want = _weights(ref)
    out = []
    for i in range(n):
        o = tmp / f"t_kill{i}"
        p = subprocess.Popen([*args, "--out", str(o)], env=ENV, stderr=subprocess.DEVNULL)
        every = 4096
        target = every * rng.randrange(1, max(2, tokens // every - 1))  # kill once a checkpoint at this count exists

        def reached():
            return any(int(f.stem.split("_")[1]) >= target for f in o.glob("**/checkpoints/tokens_*.json"))

        _wait_for(reached, p)
        time.sleep(rng.uniform(0, 0.2))
        killed = p.poll() is None
        p.send_signal(signal.SIGKILL)
        p.wait()
        subprocess.run([*args, "--out", str(o)], env=ENV, check=True, stderr=subprocess.DEVNULL)
        got = _weights(o)
        same, fp = _same_weights(got, want), got["fingerprints"] == want["fingerprints"]
        out.append({"killed_mid_run": killed, "identical_weights": same, "identical_fingerprint": fp})
        print(
            f"train kill {i + 1}/{n}: killed mid-run {killed}; weights identical {same}, run.json fingerprint {fp}",
            flush=True,
        )
    return {
        "points": n,
        "training_tokens": tokens,
        "uninterrupted_s": round(dur, 1),
        "runs": out,
        "identical_weights": sum(r["identical_weights"] for r in out),
        "identical_fingerprint": sum(r["identical_fingerprint"] for r in out),
    }


def _read_all(c) -> None:
    for L in c.layers:
        c.residuals(L)[:]
        c.stats(L)
    for name in ("tokens", "seq_ids", "positions", "labels", "roles"):
        getattr(c, name)[:]
    c.sequences()


def flips(tmp: Path, cache: str, n: int, rng: random.Random) -> dict:
    import shutil

    url = str(tmp / "flips")
    shutil.copytree(cache, url)
    c = cf.open_cache(url)
    objs = {}
    for s in c.log.segments:
        objs.update(log.segment_objects(s))
    keys = sorted(k for k in objs if not k.endswith("zarr.json"))
    kinds = {
        "residual shard": [k for k in keys if "/resid_post/" in k and "/c/" in k],
        "row column": [k for k in keys if "/rows/" in k],
        "stats": [k for k in keys if "/stats/" in k],
        "sequences": [k for k in keys if k.endswith(".parquet")],
    }
    res = {}
    for kind, pool in kinds.items():
        caught_read = caught_verify = total = 0
        for _ in range(n if kind == "residual shard" else max(2, n // 4)):
            key = rng.choice(pool)
            path = os.path.join(url, *key.split("/"))
            off = rng.randrange(os.path.getsize(path))
            raw = bytearray(open(path, "rb").read())
            raw[off] ^= 1 << rng.randrange(8)
            open(path, "wb").write(bytes(raw))
            total += 1
            try:
                _read_all(cf.open_cache(url))
            except integrity.IntegrityError:
                caught_read += 1
            caught_verify += bool(ops.verify(cf.open_cache(url))[1])
            shutil.copyfile(os.path.join(cache, *key.split("/")), path)  # restore it for the next flip
        res[kind] = {"flips": total, "caught_by_reads": caught_read, "caught_by_verify": caught_verify}
        print(
            f"byte flips in {kind}: {caught_read}/{total} caught by reads, {caught_verify}/{total} by verify",
            flush=True,
        )
    edits = {
        "n_rows - 1": (b'"n_rows":', None),
        "kind": (b'"kind":"segment"', b'"kind":"segmenx"'),
        "root layers": None,
        "non-UTF-8 byte": (None, None),
    }
    log_res = {}
    for name, how in edits.items():
        work = str(tmp / f"edit-{len(log_res)}")
        shutil.copytree(cache, work)
        if name == "root layers":
            p = os.path.join(work, "zarr.json")
            d = json.loads(open(p).read())
            d["attributes"]["actcache"]["layers"] = d["attributes"]["actcache"]["layers"][:-1]
            open(p, "w").write(json.dumps(d))
        else:
            p = os.path.join(work, "commits", "0000000001.json")
            raw = open(p, "rb").read()
            if name == "n_rows - 1":
                d = json.loads(raw)
                d["n_rows"] -= 1
                raw = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
            elif name == "kind":
                raw = raw.replace(*how)
            else:
                raw = raw[:40] + b"\xff" + raw[41:]
            open(p, "wb").write(raw)
        try:
            cf.open_cache(work)
            refused = False
        except cf.CacheError as e:
            refused = "\n" not in str(e)
        v = subprocess.run(
            [sys.executable, "-m", "cache_format", "verify", work], env=ENV, capture_output=True, text=True
        )
        verify_caught = v.returncode == 2 and v.stderr.strip().count("\n") == 0 and "Traceback" not in v.stderr
        log_res[name] = {"refused_by_readers_in_one_line": refused, "caught_by_verify_in_one_line": verify_caught}
        print(f"edit {name}: readers refuse {refused}, verify catches {verify_caught}", flush=True)
    return {"objects": res, "log_and_root": log_res}


class FlakyRangeHandler(SimpleHTTPRequestHandler):
    """Static files over HTTP with single-range `Range: bytes=a-b | a- | -n` (206 replies), that
    answers a share of requests badly: 500, a dropped connection, a body cut short ("truncate"),
    a Content-Length of half the range ("short"), or one flipped bit ("flip"). `choose()` (set
    per server) draws the fault of each request; `server.failures["injected"]` counts them.

    The bench's own (tests/conftest.py has a richer one for the tests; bench/ and tests/ do not
    import each other)."""

    def log_message(self, *args):
        pass

    def send_head(self):
        counter = self.server.failures
        with counter["lock"]:
            self.fault = self.server.choose()
            if self.fault:
                counter["injected"][self.fault] = counter["injected"].get(self.fault, 0) + 1
        if self.fault == "500":
            self.send_error(500, "injected failure")
            return None
        if self.fault == "drop":
            self.close_connection = True
            return None
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404, "not found")
            return None
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
        start, end, status = 0, size - 1, 200
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", (self.headers.get("Range") or "").strip())
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start, end = int(m.group(1)), min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start = max(0, size - int(m.group(2)))
            status = 206
        length = end - start + 1
        if self.fault == "short" and length > 1:
            end, length = start + length // 2 - 1, length // 2
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        f.seek(start)
        self.remaining = length
        return f

    def copyfile(self, source, outputfile):
        body = bytearray(source.read(self.remaining))
        if self.fault == "flip" and body:
            body[len(body) // 2] ^= 0x20
        if self.fault == "truncate":
            body = body[: len(body) // 2]
            self.close_connection = True
        outputfile.write(bytes(body))


def flaky_server(tmp: Path, cache: str, runs: int, rates: dict, train_runs: int, rng: random.Random) -> dict:
    def choose():
        x = rng.random()
        for kind, p in rates.items():
            if x < p:
                return kind
            x -= p
        return None

    import shutil

    site = tmp / "site"
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(cache, site / "c")
    ops.publish(Location(str(site / "c")))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(FlakyRangeHandler, directory=str(site)))
    server.daemon_threads = True
    server.choose = choose
    server.failures = {"lock": threading.Lock(), "injected": {}}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/c"
    local = cf.open_cache(cache)
    want = {L: local.residuals(L).numpy().view(np.uint16) for L in local.layers}
    same = loud = wrong = 0
    for _ in range(runs):
        try:
            c = cf.open_cache(url)
            got = {L: c.residuals(L).numpy().view(np.uint16) for L in c.layers}
            ok = all(np.array_equal(got[L], want[L]) for L in want) and np.array_equal(c.tokens[:], local.tokens[:])
            same, wrong = same + ok, wrong + (not ok)
        except cf.UserError as e:  # a one-line error naming the object: loud, never wrong data
            loud += "\n" not in str(e)
    print(
        f"flaky server ({rates}): of {runs} full reads {same} identical to local, {loud} failed in one line, "
        f"{wrong} silently wrong; injected {server.failures['injected']}",
        flush=True,
    )
    tr = []
    if train_runs:
        args = [*TRAIN, "--set", "train.training_tokens=8192"]
        ref = tmp / "f_ref"
        subprocess.run([*args, "--cache", cache, "--out", str(ref)], env=ENV, check=True, stderr=subprocess.DEVNULL)
        want_w = _weights(ref)
        env = dict(ENV, ACTCACHE_RETRIES="8")
        for i in range(train_runs):
            o = tmp / f"f_http{i}"
            p = subprocess.run([*args, "--cache", url, "--out", str(o)], env=env, capture_output=True, text=True)
            ok = p.returncode == 0
            tr.append(
                {
                    "exit": p.returncode,
                    "identical_weights": ok and _same_weights(_weights(o), want_w),
                    "traceback": "Traceback" in p.stderr,
                    "last_line": (p.stderr.strip().splitlines() or [""])[-1],
                }
            )
            print(
                f"train run over the flaky server {i + 1}/{train_runs}: exit {p.returncode}, "
                f"identical weights {tr[-1]['identical_weights']}" + ("" if ok else f" ({tr[-1]['last_line']})"),
                flush=True,
            )
    server.shutdown()
    return {
        "rates": rates,
        "read_runs": runs,
        "identical_reads": int(same),
        "reads_failed_in_one_line": loud,
        "reads_silently_wrong": wrong,
        "injected": dict(server.failures["injected"]),
        "train_runs": tr,
        "train_identical": sum(r["identical_weights"] for r in tr),
        "train_failed_in_one_line": sum(r["exit"] == 2 and not r["traceback"] for r in tr),
        "train_silently_wrong": sum(r["exit"] == 0 and not r["identical_weights"] for r in tr),
    }


def _duplicated_rows(url: str) -> int:
    """(seq_id, position) pairs held more than once (each extra copy counted)."""
    c = cf.open_cache(url)
    pairs = np.stack([np.asarray(c.seq_ids[:]), np.asarray(c.positions[:])], axis=1)
    return int(len(pairs) - len(np.unique(pairs, axis=0)))


def concurrent_harvests(tmp: Path, counts: list[int], tokens: int, seed_tokens: int) -> dict:
    """N harvests started together on one cache, new or seeded: duplicates, fingerprint, wall time."""
    import shutil

    cmd = [*HARVEST, "--tokens", str(tokens)]
    ref = str(tmp / "c_ref")
    t0 = time.time()
    subprocess.run([*cmd, "--cache", ref], env=ENV, check=True, stderr=subprocess.DEVNULL)
    one = time.time() - t0
    want = cf.open_cache(ref).fingerprint
    seed = str(tmp / "c_seed")
    subprocess.run(
        [*HARVEST, "--tokens", str(seed_tokens), "--cache", seed], env=ENV, check=True, stderr=subprocess.DEVNULL
    )
    t0 = time.time()
    seeded_ref = str(tmp / "c_seeded_ref")
    shutil.copytree(seed, seeded_ref)
    subprocess.run([*cmd, "--cache", seeded_ref], env=ENV, check=True, stderr=subprocess.DEVNULL)
    one_seeded = time.time() - t0
    out = []
    for n in counts:
        for start in ("new", "seeded"):
            url = str(tmp / f"c_{n}_{start}")
            if start == "seeded":
                shutil.copytree(seed, url)
            t0 = time.time()
            procs = [
                subprocess.Popen(
                    [*cmd, "--cache", url, "--json"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
                for _ in range(n)
            ]
            done = [p.communicate() for p in procs]
            wall = time.time() - t0
            summaries = [json.loads(out) for out, _ in done if out.strip()]
            failures = [(err.strip().splitlines() or [""])[-1] for p, (_, err) in zip(procs, done) if p.returncode]
            c = cf.open_cache(url)
            row = {
                "processes": n,
                "cache": start,
                "exit_codes": [p.returncode for p in procs],
                "failures": failures,  # the last stderr line of each process that failed
                "duplicated_rows": _duplicated_rows(url),
                "verify_problems": len(ops.verify(c)[1]),
                "fingerprint_equal": c.fingerprint == want,
                "summaries_agree": len({(s["n_tokens"], s["fingerprint"]) for s in summaries}) == 1,
                "units_per_process": [s.get("units_run_here") for s in summaries],  # None: code before claims
                "wall_s": round(wall, 1),
                "wall_vs_one_process": round(wall / (one if start == "new" else one_seeded), 2),
            }
            out.append(row)
            print(
                f"{n} harvests at once on a {start} cache: exit codes {row['exit_codes']}"
                + (f" ({'; '.join(failures)})" if failures else "")
                + f", {row['duplicated_rows']} duplicated rows, fingerprint equal "
                f"{row['fingerprint_equal']}, summaries agree {row['summaries_agree']}, units per process "
                f"{row['units_per_process']}, wall {row['wall_s']}s = {row['wall_vs_one_process']}x one process",
                flush=True,
            )
    return {
        "tokens": tokens,
        "seed_tokens": seed_tokens,
        "one_process_s": round(one, 1),
        "one_process_seeded_s": round(one_seeded, 1),
        "runs": out,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=3, help="kill -9 points for harvest and for train")
    p.add_argument("--tokens", type=int, default=64 * 48, help="harvest rows (12 segments of 4 sequences)")
    p.add_argument("--train-tokens", type=int, default=40960)
    p.add_argument("--flips", type=int, default=28, help="byte flips in residual shards (a quarter as many elsewhere)")
    p.add_argument("--flaky-runs", type=int, default=10)
    p.add_argument("--flaky-train-runs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrent", default="2,3", help="numbers of harvests started at once on one cache")
    p.add_argument("--concurrent-tokens", type=int, default=64 * 64, help="their rows (16 segments)")
    p.add_argument(
        "--parts",
        default="kills,flips,flaky,concurrency",
        help="which figures to measure (comma-separated: kills, flips, flaky, concurrency)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults.json")
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    result = {
        "command": " ".join(["python", "bench/bench_faults.py", *(argv or sys.argv[1:])]),
        "load_avg": os.getloadavg()[0],
    }
    parts = set(a.parts.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = str(tmp / "h_ref")
        if parts & {"kills", "flips", "flaky"}:
            result["harvest_kill9"] = harvest_kills(tmp, a.kills, a.tokens, rng)
        if "kills" in parts:
            result["train_kill9"] = train_kills(tmp, cache, a.kills, a.train_tokens, rng)
        if "flips" in parts:
            result["byte_flips"] = flips(tmp, cache, a.flips, rng)
        if "flaky" in parts:
            rates = {"truncate": 0.05, "flip": 0.01, "drop": 0.01, "500": 0.01, "short": 0.01}
            result["flaky_http"] = flaky_server(tmp, cache, a.flaky_runs, rates, a.flaky_train_runs, rng)
        if "concurrency" in parts:
            counts = [int(x) for x in a.concurrent.split(",")]
            result["concurrent_harvests"] = concurrent_harvests(
                tmp, counts, a.concurrent_tokens, a.concurrent_tokens // 4
            )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
