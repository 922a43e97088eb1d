"""Time to the first committed segment and peak RSS of a corpus harvest, from any checkout.

Why: the before/after of streaming planning is about *when* the first unit lands and how
much memory planning holds at a large `--tokens`. This runs `harvest run --source corpus` on
the tiny profile (layer 0) over the rehearsal's generated corpus, polls its RSS and the
cache's committed segments every 0.25 s, and kills it some seconds after the first commit.

    python bench/bench_first_commit.py --tokens 50000000
    python bench/bench_first_commit.py --tokens 1000000000 --corpus builtin:tiny   # the bundled corpus only
    python bench/bench_first_commit.py ... --set harvest.batch_size=2                # any harvest --set
    git archive 79782a7 | tar -x -C /tmp/before && python bench/bench_first_commit.py --repo /tmp/before --limit 330
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def committed(url: str) -> bool:
    """A segment is committed (read with this checkout's reader, or, for a cache of another
    format version, any object under the commit log's directory)."""
    import cache_format as cf

    try:
        return bool(cf.open_cache(url).segments)
    except Exception:
        d = Path(url) / "commits"
        return d.is_dir() and any(f.is_file() for f in d.rglob("*"))


def main() -> None:
    import psutil

    from harvest.tiny import write_corpus

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(ROOT), help="checkout whose harvest runs (its cwd)")
    ap.add_argument("--tokens", type=int, default=50_000_000)
    ap.add_argument(
        "--corpus", default="", help="a .txt corpus, or builtin:tiny (it cycles); default: generate --tokens of it"
    )
    ap.add_argument("--set", action="append", default=[], help="more harvest --set overrides (later ones win)")
    ap.add_argument("--limit", type=float, default=120, help="give up after this many seconds")
    ap.add_argument("--after", type=float, default=4, help="seconds to keep watching after the first commit")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        corpus = a.corpus or str(Path(d) / "gen.txt")
        if not a.corpus:
            write_corpus(corpus, a.tokens)
        url = str(Path(d) / "cache")
        sources = (
            '[{name="tiny", path="builtin:tiny"}]'  # cycles: any --tokens without a file that large
            if corpus == "builtin:tiny"
            else f'[{{name="gen", path="{corpus}", weight=0.9}}, {{name="tiny", path="builtin:tiny", weight=0.1}}]'
        )
        sets = ["harvest.segment_sequences=256", "harvest.batch_size=64", f"corpus.sources={sources}", *a.set]
        cmd = [
            sys.executable,
            "-m",
            "harvest",
            "run",
            "--profile",
            "tiny",
            "--cache",
            url,
            "--source",
            "corpus",
            "--layers",
            "0",
            "--tokens",
            str(a.tokens),
            "--quiet",
            *sum((["--set", s] for s in sets), []),
        ]
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=a.repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        p, peak, first, trace = psutil.Process(proc.pid), 0, None, []
        while proc.poll() is None:
            rss, el = p.memory_info().rss, time.time() - t0
            peak = max(peak, rss)
            if not trace or el - trace[-1][0] >= 5:
                trace.append((round(el), rss >> 20))
            if first is None and committed(url):
                first = el
            if (first is not None and el > first + a.after) or el > a.limit:
                break
            time.sleep(0.25)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    print(
        json.dumps(
            {
                "repo": a.repo,
                "tokens": a.tokens,
                "first_commit_s": first and round(first, 1),
                "peak_rss_mib": peak >> 20,
                "rss_trace_mib": trace,
            }
        )
    )


if __name__ == "__main__":
    main()
