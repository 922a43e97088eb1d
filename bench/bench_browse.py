"""The feature browser at the `001` recipe's scale: 3 SAEs × 65,536 features, 16 contexts each.

Builds a synthetic run directory in the exact layout `train analyze` writes (same files, columns
and row groups; random but realistic values: Zipf-like fire rates, sparse activations in each
17-token window, a 20k-token vocabulary), then measures, in Debian's headless Chromium:

- the server: start-up, index first paint (navigation start → first page of rows drawn), each
  sort / filter / search (request → table redrawn, through the page's own table), the API's own
  latency for the same queries, a feature page (navigation start → record drawn), and the
  server's resident memory (VmHWM: its peak);
- the static export: its size, and the bytes a browser fetches to draw the first page.

    .venv/bin/python bench/bench_browse.py [--features 65536] [--saes 3] [--out /tmp/browse-bench]

Targets (the browser issue): first paint ≤ 1 s, sort/filter/search ≤ 200 ms, server < 1 GiB,
feature page ≤ 300 ms, export < 1 GiB with a first page that does not read all of it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.analysis.features import PROFILE_ROW_GROUP, PROMPT_ROW_GROUP  # noqa: E402

WINDOW = 8  # [analysis].context_tokens: 17-token windows
EXAMPLES = 16
VOCAB = 20_000
REPEATS = 5  # each table action's time is the median of this many


def _lists(values: np.ndarray, typ) -> pa.Array:
    n, k = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), pa.array(values.ravel(), typ))


def _write(path: Path, cols: dict, row_group: int | None = None) -> None:
    pq.write_table(pa.table(cols), path, compression="zstd", row_group_size=row_group)


def build_run(out: Path, n_saes: int, d_sae: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 8))) for _ in range(VOCAB)]
    vocab = pa.array([(" " if i % 3 else "") + w for i, w in enumerate(words)], pa.string())
    names = [f"L{layer}_n{d_sae}_k128" for layer in (11, 31, 55)[:n_saes]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"saes": [{"name": n, "path": n} for n in names], "version": 1}))
    n_rows = 1_000_000
    for si, name in enumerate(names):
        d = out / name
        d.mkdir(exist_ok=True)
        layer = int(name[1:].split("_")[0])
        fire = np.minimum(0.5, 0.3 / np.arange(1, d_sae + 1) ** 0.9)[rng.permutation(d_sae)]
        fire[rng.random(d_sae) < 0.02] = 0.0  # dead
        alive = fire > 0
        mx = np.where(alive, rng.gamma(3, 4, d_sae), np.nan)
        auroc = np.where(alive, np.clip(0.5 + rng.normal(0, 0.04, d_sae), 0, 1), np.nan)
        q = np.where(alive, np.clip(rng.random(d_sae) ** 3 * 1.2, 0, 1), np.nan)
        metrics = {
            "feature": np.arange(d_sae, dtype=np.int32),
            "fire_count": (fire * n_rows).astype(np.int64),
            "fire_rate": fire,
            "mean_activation": mx * 0.6,
            "mean_activation_all": mx * 0.6 * fire,
            "max_activation": mx,
            "auroc": auroc,
            "auroc_ci_low": auroc - 0.02,
            "auroc_ci_high": auroc + 0.02,
            "p_value": q / 2,
            "q_value": q,
            "seq_auroc": np.where(alive, np.clip(0.5 + rng.normal(0, 0.08, d_sae), 0, 1), np.nan),
            "fire_rate_correct": fire * 1.05,
            "fire_rate_wrong": fire * 0.95,
            "direction": pa.array(np.where(~alive, "", np.where(auroc > 0.5, "correct↑", "wrong↑")).tolist()),
            "tested": alive,
            "n_examples": np.where(alive, EXAMPLES, 0).astype(np.int32),
        }
        _write(d / "feature_metrics.parquet", metrics)

        feats = np.repeat(np.flatnonzero(alive).astype(np.int32), EXAMPLES)
        n = len(feats)
        w = 2 * WINDOW + 1
        ids = rng.integers(0, VOCAB, (n, w)).astype(np.int32)
        acts = np.where(rng.random((n, w)) < 0.15, rng.gamma(2, 2, (n, w)), 0.0).astype(np.float32)
        act = np.repeat(mx[alive], EXAMPLES) * np.tile(np.linspace(1, 0.5, EXAMPLES), int(alive.sum()))
        acts[:, WINDOW] = act
        toks = pc.take(vocab, pa.array(ids.ravel()))
        tok_lists = pa.ListArray.from_arrays(pa.array(np.arange(0, n * w + 1, w, dtype=np.int32)), toks)
        side = pa.array(np.arange(0, n * WINDOW + 1, WINDOW, dtype=np.int32))
        b_list = pa.ListArray.from_arrays(side, pc.take(vocab, pa.array(ids[:, :WINDOW].ravel())))
        a_list = pa.ListArray.from_arrays(side, pc.take(vocab, pa.array(ids[:, WINDOW + 1 :].ravel())))
        before, after = pc.binary_join(b_list, ""), pc.binary_join(a_list, "")
        token = pc.take(vocab, pa.array(ids[:, WINDOW]))
        prompts = {
            "feature": feats,
            "rank": np.tile(np.arange(EXAMPLES, dtype=np.int32), int(alive.sum())),
            "activation": act.astype(np.float32),
            "row": rng.integers(0, n_rows, n),
            "seq_id": rng.integers(0, 2000, n),
            "position": rng.integers(WINDOW, 4000, n).astype(np.int32),
            "token_id": ids[:, WINDOW],
            "label": rng.integers(0, 2, n).astype(np.int8),
            "role": rng.integers(2, 4, n).astype(np.int8),
            "context_token_ids": _lists(ids, pa.int32()),
            "context_tokens": tok_lists,
            "context_focus": np.full(n, WINDOW, np.int32),
            "token": token,
            "context_before": before,
            "context_after": after,
            "context": pc.binary_join_element_wise(before, token, after, ""),
            "context_activations": _lists(acts, pa.float32()),
        }
        _write(d / "feature_prompts.parquet", prompts, PROMPT_ROW_GROUP)

        bins, buckets = 32, 9
        profiles = {
            "feature": np.arange(d_sae, dtype=np.int32),
            "hist_low": np.where(alive, 0.0, np.nan),
            "hist_high": mx,
            "hist_counts": _lists(rng.integers(0, 500, (d_sae, bins)).astype(np.int32), pa.int32()),
            "fire_rate_text": np.full(d_sae, np.nan),
            "fire_rate_prompt": np.full(d_sae, np.nan),
            "fire_rate_thinking": fire * 1.1,
            "fire_rate_answer": fire * 0.7,
            "fire_rate_by_position": _lists(
                (fire[:, None] * rng.random((d_sae, buckets))).astype(np.float32), pa.float32()
            ),
        }
        _write(d / "feature_profiles.parquet", profiles, PROFILE_ROW_GROUP)

        parts = []
        for oi, other in enumerate(names):
            k = 10 if other == name else 5
            parts.append(
                {
                    "feature": np.repeat(np.arange(d_sae, dtype=np.int32), k),
                    "rank": np.tile(np.arange(k, dtype=np.int32), d_sae),
                    "sae": np.full(d_sae * k, oi),
                    "neighbour": rng.integers(0, d_sae, d_sae * k).astype(np.int32),
                    "cosine": np.sort(rng.random((d_sae, k)).astype(np.float32), axis=1)[:, ::-1].ravel(),
                }
            )
        nb = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
        own = nb["sae"] == si
        order = np.lexsort((nb["rank"], nb["sae"], ~own, nb["feature"]))
        nb = {c: v[order] for c, v in nb.items()}
        nb["sae"] = pa.array(np.array(names, dtype=object)[nb["sae"]].tolist(), pa.string())
        _write(d / "feature_neighbours.parquet", nb, PROMPT_ROW_GROUP)

        top_ids = rng.integers(0, VOCAB, (d_sae, 10)).astype(np.int32)
        bot_ids = rng.integers(0, VOCAB, (d_sae, 10)).astype(np.int32)
        logits = {
            "feature": np.arange(d_sae, dtype=np.int32),
            "top_token_ids": _lists(top_ids, pa.int32()),
            "top_tokens": pa.ListArray.from_arrays(
                pa.array(np.arange(0, d_sae * 10 + 1, 10, dtype=np.int32)), pc.take(vocab, pa.array(top_ids.ravel()))
            ),
            "top_values": _lists(
                np.sort(rng.random((d_sae, 10)).astype(np.float32) * 5, axis=1)[:, ::-1], pa.float32()
            ),
            "bottom_token_ids": _lists(bot_ids, pa.int32()),
            "bottom_tokens": pa.ListArray.from_arrays(
                pa.array(np.arange(0, d_sae * 10 + 1, 10, dtype=np.int32)), pc.take(vocab, pa.array(bot_ids.ravel()))
            ),
            "bottom_values": _lists(-np.sort(rng.random((d_sae, 10)).astype(np.float32) * 5, axis=1), pa.float32()),
            "hist_low": np.full(d_sae, -5.0, np.float32),
            "hist_high": np.full(d_sae, 5.0, np.float32),
            "hist_counts": _lists(rng.integers(0, 9000, (d_sae, 32)).astype(np.int32), pa.int32()),
        }
        _write(d / "logit_effects.parquet", logits, 4096)
        analysis = {
            "layer": layer,
            "summary": {"labels": "correctness", "tokens": n_rows, "sequences": 2000},
            "analysis_config": {"alpha": 0.05, "context_tokens": WINDOW, "top_examples": EXAMPLES},
            "profiles": {
                "hist_bins": bins,
                "rows_by_role": {"text": 0, "prompt": 0, "thinking": 800_000, "answer": 200_000},
                "position_edges": [0, 1, 4, 16, 64, 256, 1024, 4096, 16384],
                "rows_by_position": [2000, 6000, 24000, 96000, 384000, 488000, 0, 0, 0],
            },
            "model": {"name_or_path": "Qwen/Qwen3.6-27B"},
            "source": "supergpqa",
        }
        (d / "analysis.json").write_text(json.dumps(analysis))
    return out


# -- measuring --------------------------------------------------------------------------------


def driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    o = webdriver.ChromeOptions()
    o.binary_location = "/usr/bin/chromium"
    for a in (
        "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
        "--disable-component-update --disable-sync --window-size=1400,1000"
    ).split():
        o.add_argument(a)
    o.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)


def wait(d, js, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(d, timeout, poll_frequency=0.005).until(lambda x: x.execute_script(js))


def page_load(d, url, done_js) -> float:
    """Milliseconds from navigation start to `done_js` (a performance.now() the page records)."""
    d.get(url)
    return float(wait(d, f"return {done_js}"))


def table_action(d, js) -> float:
    """Milliseconds from a table action (sort, filter, search) to the table redrawn with its answer;
    TIMES[-1] keeps (answer received, drawn) for the breakdown."""
    n0 = d.execute_script("return window.BROWSE.rendered")
    t0 = d.execute_script(f"const t0 = performance.now(); {js}; return t0;")
    wait(d, f"return window.BROWSE.rendered > {n0}")
    answered, drawn = d.execute_script("return [window.BROWSE.answeredAt, window.BROWSE.renderedAt]")
    TIMES.append((round(answered - t0, 1), round(drawn - t0, 1)))
    return drawn - t0


TIMES: list = []


def filter_js(name, value):
    """Set one filter control and reload the table at once (no typing debounce)."""
    v = json.dumps(value)
    return (
        "const f = document.getElementById('filters'); const el = f.elements[" + json.dumps(name) + "];"
        f"if (el.type === 'checkbox') el.checked = {v} === '1'; else el.value = {v};"
        "window.BROWSE.table.setData()"
    )


def measure_server(run: Path, tmp: Path) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-m", "train", "browse", "--out", str(run), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    line = p.stderr.readline()
    url = re.search(r"at (http://\S+/) ", line).group(1)
    startup = time.perf_counter() - t0
    out: dict = {"startup_s": round(startup, 2)}
    d = driver(Path(tempfile.mkdtemp(dir=tmp, prefix="profile-")))  # a fresh browser: nothing cached
    try:
        d.get(url)  # warm: the browser's own first start is not the page's
        out["first_paint_ms"] = [round(page_load(d, url, "window.BROWSE.renderedAt"), 1) for _ in range(3)]
        meta = json.load(urlopen(url + "api/meta"))
        sae = meta["saes"][1]["name"]
        actions = {
            "sort fire_rate desc": "window.BROWSE.table.setSort('fire_rate', 'desc')",
            "sort auroc asc": "window.BROWSE.table.setSort('auroc', 'asc')",
            "sort max_activation desc": "window.BROWSE.table.setSort('max_activation', 'desc')",
            "sort q_value asc": "window.BROWSE.table.setSort('q_value', 'asc')",
            "filter SAE": filter_js("sae", sae),
            "filter significant": filter_js("significant", "1"),
            "filter AUROC ≥ 0.55": filter_js("min_auroc", "0.55"),
            "filter direction": filter_js("direction", "wrong↑"),
            "search token 'ab'": filter_js("q", "ab"),
            "search exact token": filter_js("q", '" abc"'),
            "search context": filter_js("qmode", "context"),
            "clear": (  # the form's own reset also reloads (debounced): clear the fields without it
                "for (const el of document.getElementById('filters').elements) {"
                "if (el.type === 'checkbox') el.checked = false;"
                "else if (el.tagName === 'SELECT') el.selectedIndex = 0;"
                "else if (el.tagName === 'INPUT') el.value = ''; }"
                "window.BROWSE.table.setData()"
            ),
            "page 200": "window.BROWSE.table.setPage(200)",
        }
        ui = {}
        answered = {}
        for _ in range(REPEATS):  # the same sequence each time, so each action meets the same state
            table_action(d, actions["clear"])
            for name, js in actions.items():
                ui.setdefault(name, []).append(table_action(d, js))
                answered.setdefault(name, []).append(TIMES[-1][0])
        out["ui_ms"] = {k: round(statistics.median(v), 1) for k, v in ui.items()}
        out["ui_ms_max"] = {k: round(max(v), 1) for k, v in ui.items()}
        out["ui_answer_received_ms"] = {k: round(statistics.median(v), 1) for k, v in answered.items()}
        api = {}
        queries = {
            "sort auroc desc": "sort=auroc&dir=desc",
            "sort seq_auroc asc (uncached)": "sort=seq_auroc",
            "filter SAE + significant": f"sae={sae}&significant=1",
            "ranges": "min_fire_rate=0.001&max_fire_rate=0.05&min_auroc=0.52",
            "search token": "q=ab",
            "search context": "q=xyz&qmode=context",
        }
        for name, qs in queries.items():
            times = []
            for _ in range(5):
                t = time.perf_counter()
                urlopen(url + "api/features?size=50&" + qs).read()
                times.append((time.perf_counter() - t) * 1000)
            api[name] = {"first": round(times[0], 1), "median": round(statistics.median(times), 1)}
        out["api_ms"] = api
        rng = np.random.default_rng(1)
        feats = []
        for f in rng.integers(0, meta["saes"][0]["d_sae"], 5):
            s = meta["saes"][int(f) % len(meta["saes"])]["name"]
            feats.append(round(page_load(d, f"{url}feature/{s}/{int(f)}", "window.BROWSE.featureRenderedAt"), 1))
        out["feature_page_ms"] = feats
        t = time.perf_counter()
        urlopen(f"{url}api/feature/{sae}/{meta['saes'][1]['d_sae'] // 3}").read()
        out["api_feature_ms"] = round((time.perf_counter() - t) * 1000, 1)
        status = Path(f"/proc/{p.pid}/status").read_text()
        out["server_rss_mib"] = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) // 1024
        out["server_peak_rss_mib"] = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) // 1024
    finally:
        d.quit()
        p.terminate()
        p.wait()
    return out


class CountingHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        if os.path.isfile(path):
            self.server.bytes += os.path.getsize(path)
            self.server.files += 1
        super().do_GET()


def measure_static(run: Path, site: Path, tmp: Path, sae: str, d_sae: int) -> dict:
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "train", "browse", "--out", str(run), "--export", str(site), "--quiet"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    out = {"export_s": round(time.perf_counter() - t, 1)}
    files = [f for f in site.rglob("*") if f.is_file()]
    out["export_mib"] = round(sum(f.stat().st_size for f in files) / 2**20, 1)
    out["export_files"] = len(files)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(CountingHandler, directory=str(site)))
    httpd.bytes = httpd.files = 0
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    d = driver(Path(tempfile.mkdtemp(dir=tmp, prefix="profile-")))  # a fresh browser: nothing cached
    try:
        out["first_paint_ms"] = round(page_load(d, url + "index.html", "window.BROWSE.renderedAt"), 1)
        out["first_page_fetched_kib"] = round(httpd.bytes / 1024, 1)
        out["first_page_fetched_files"] = httpd.files
        first_sort = table_action(d, "window.BROWSE.table.setSort('auroc', 'desc')")
        first_search = table_action(d, filter_js("q", "ab"))
        table_action(d, filter_js("q", ""))
        actions = {
            "sort fire_rate desc": "window.BROWSE.table.setSort('fire_rate', 'desc')",
            "sort auroc asc": "window.BROWSE.table.setSort('auroc', 'asc')",
            "filter significant": filter_js("significant", "1"),
            "search token": filter_js("q", "ab"),
            "clear search": filter_js("q", ""),
            "clear significant": filter_js("significant", ""),
        }
        ui: dict = {}
        for _ in range(REPEATS):
            for name, js in actions.items():
                ui.setdefault(name, []).append(table_action(d, js))
        out["ui_ms"] = {
            "first sort (fetches the columns and the order)": round(first_sort, 1),
            "first search (fetches the token index)": round(first_search, 1),
            **{k: round(statistics.median(v), 1) for k, v in ui.items()},
        }
        out["feature_page_ms"] = round(
            page_load(d, f"{url}feature.html?sae={sae}&id={d_sae // 3}", "window.BROWSE.featureRenderedAt"), 1
        )
    finally:
        d.quit()
        httpd.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=65536)
    ap.add_argument("--saes", type=int, default=3)
    ap.add_argument("--out", default=None, help="Where the synthetic run and export go (default: a temp dir).")
    ap.add_argument("--skip-static", action="store_true")
    args = ap.parse_args()
    tmp = Path(args.out or tempfile.mkdtemp(prefix="browse-bench-"))
    run = tmp / "run"
    t = time.perf_counter()
    if not (run / "run.json").exists():
        build_run(run, args.saes, args.features)
    result = {
        "saes": args.saes,
        "features_per_sae": args.features,
        "contexts_per_feature": EXAMPLES,
        "run_mib": round(sum(f.stat().st_size for f in run.rglob("*") if f.is_file()) / 2**20, 1),
        "build_s": round(time.perf_counter() - t, 1),
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    result["server"] = measure_server(run, tmp)
    if not args.skip_static:
        import shutil

        site = tmp / "site"
        shutil.rmtree(site, ignore_errors=True)
        result["static"] = measure_static(run, site, tmp, f"L31_n{args.features}_k128", args.features)
    result["load_average_after"] = os.getloadavg()
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    res = ROOT / "bench" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "browse.json").write_text(text)
    print(f"wrote {res / 'browse.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
