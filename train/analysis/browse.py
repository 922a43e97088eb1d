"""`python -m train browse --out RUN`: the feature browser, a local web app over a run directory.

- `/` is the index: every feature of every SAE, sorted, filtered and searched on the server
  (`browse_data.RunIndex`), shown page by page by Tabulator in remote mode;
- `/feature/<sae>/<id>` is one feature: its top contexts shaded token by token, split by the
  rollout's correctness, its activation histogram, fire rate by role and position, decoder
  neighbours and logit effects; `/compare/<sae>/<id>/<sae>/<id>` puts two side by side;
- `/api/...` answers the pages' requests in JSON.

`--export DIR` writes the same pages as a static site and `--export-dashboard DIR` the
SAE-Dashboard / Neuronpedia upload JSON (both written by this module). Starlette serves, uvicorn
listens on 127.0.0.1 unless told otherwise. The pages and the vendored Tabulator are package
data under `train/assets/`.
"""

from __future__ import annotations

import errno
import gzip
import html
import json
import shutil
import socket
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import click
import numpy as np

from cache_format.errors import UserError

from .browse_data import RunIndex

# -- the pages and assets ----------------------------------------------------------------------

PAGES = ("index", "feature", "compare")


def assets_dir():
    return resources.files("train") / "assets"


def page_html(name: str, mode: str, base: str, title: str) -> str:
    """One of the pages, for the server (`base` "/") or the static export (`base` "./")."""
    text = (assets_dir() / "browse" / f"{name}.html").read_text()
    return text.replace("%MODE%", mode).replace("%BASE%", base).replace("%TITLE%", html.escape(title))


# -- the static export -------------------------------------------------------------------------
#
# The feature browser written to files: a static site (`train browse --export DIR`) and the
# SAE-Dashboard / Neuronpedia upload JSON (`--export-dashboard DIR`).
#
# The static site is the server's pages with the data cut into pieces that the page loads only
# when it needs them, so a 200k-feature run opens from any plain HTTP server (or `file://` is
# not enough: browsers refuse `fetch` there) without downloading the whole export:
#
#     index.html, feature.html, compare.html, assets/      the pages, Tabulator
#     data/meta.json                                       SAEs, columns, the first page of the index
#     data/columns/<column>.bin                            one little-endian typed array per index column
#     data/orders/<column>.<asc|desc>.bin                  the rows in each column's order (int32)
#     data/snippets/<block>.json.gz                        top contexts, SNIPPET_BLOCK rows each
#     data/search/tokens.json.gz, rows.bin                 token → features (the text search)
#     data/features/<sae #>/<block>.json.gz                FEATURE_BLOCK feature records each
#
# Sorting and filtering then run in the page over the typed arrays (fetched on the first sort
# or filter; a sort fetches its order); a feature page fetches one block. Pieces are gzip
# files that the page decompresses itself, so any static server will do.

SNIPPET_BLOCK = 4096
FEATURE_BLOCK = 64
READ_BLOCK = 1024  # features read from the parquet files at a time (one row group of prompts)
DTYPES = {"sae": "int16", "layer": "int32", "feature": "int32", "direction": "int8", "healthy": "uint8"}

# SAE-Dashboard's NeuronpediaRunner output (sae_dashboard/neuronpedia/neuronpedia_dashboard.py,
# sae-dashboard 0.8.0): batch-<n>.json files of NeuronpediaDashboardBatch, 128 features each.
DASHBOARD_FORMAT = "sae-dashboard 0.8.0 NeuronpediaDashboardBatch"
DASHBOARD_BATCH = 128


def _gz(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(json.dumps(obj, separators=(",", ":"), allow_nan=False).encode(), 6, mtime=0))


def _fresh_dir(out: Path, marker: str) -> Path:
    """`out`, empty: a previous export of the same kind is replaced, anything else refused."""
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / marker).exists()):
            raise UserError(f"{out} exists and is not a previous export; choose an empty or new directory")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def _blocks(index: RunIndex, progress: bool, desc: str):
    """(SAE number, SAE, first feature, records) for every READ_BLOCK features of the run."""
    from tqdm import tqdm

    with tqdm(total=index.n, unit="feat", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for i, s in enumerate(index.saes):
            for a in range(0, s.d_sae, READ_BLOCK):
                recs = index.features(s, a, min(a + READ_BLOCK, s.d_sae))
                yield i, s, a, recs
                bar.update(len(recs))


def export_site(index: RunIndex, out_dir: str | Path, progress: bool = True) -> Path:
    """Write the static browser into `out_dir` and return it."""
    out = _fresh_dir(Path(out_dir), "data/meta.json")
    for name in PAGES:
        (out / f"{name}.html").write_text(page_html(name, "static", "./", index.url))
    src = assets_dir()
    for sub in ("browse", "tabulator"):
        dst = out / "assets" / sub
        dst.mkdir(parents=True)
        for f in (src / sub).iterdir():
            if f.is_file() and not f.name.endswith(".html"):  # the pages themselves are rendered above
                (dst / f.name).write_bytes(f.read_bytes())
    data = out / "data"

    cols = dict(index.cols, alive=index.alive)
    specs = []
    (data / "columns").mkdir(parents=True)
    for field, arr in cols.items():
        dtype = DTYPES.get(field, "uint8" if field == "alive" else "float32")
        arr.astype(np.dtype(dtype).newbyteorder("<")).tofile(data / "columns" / f"{field}.bin")
        specs.append({"field": field, "dtype": dtype})

    # every column's order, both ways, as the server sorts (a sort in the page is then one fetch)
    (data / "orders").mkdir(parents=True)
    for field in index.cols:
        for desc in (False, True):
            index.order(field, desc).astype("<i4").tofile(data / "orders" / f"{field}.{'desc' if desc else 'asc'}.bin")

    before, token, after = (index.snippet[k].to_pylist() for k in ("before", "token", "after"))
    for b, a in enumerate(range(0, index.n, SNIPPET_BLOCK)):
        rows = [[before[r], token[r], after[r]] for r in range(a, min(a + SNIPPET_BLOCK, index.n))]
        _gz(data / "snippets" / f"{b}.json.gz", rows)
    _gz(
        data / "search" / "tokens.json.gz",
        {"tokens": index.token_dict.to_pylist(), "starts": index.token_starts.tolist()},
    )
    index.token_rows.astype("<i4").tofile(data / "search" / "rows.bin")

    for i, _s, a, recs in _blocks(index, progress, "export"):
        for j in range(0, len(recs), FEATURE_BLOCK):
            _gz(data / "features" / str(i) / f"{(a + j) // FEATURE_BLOCK}.json.gz", recs[j : j + FEATURE_BLOCK])

    meta = index.meta()
    first = index.page({"page": 1, "size": 50})
    meta["static"] = {
        "columns": specs,
        "snippet_block": SNIPPET_BLOCK,
        "feature_block": FEATURE_BLOCK,
        "first_page": first,
    }
    (data / "meta.json").write_text(json.dumps(meta, separators=(",", ":"), allow_nan=False))
    return out


# ---------------------------------------------------------------------------------------


def _model_id(index: RunIndex) -> str:
    """Neuronpedia's model ids are lower-case slugs (`gemma-2-2b`): the model's name, last part."""
    for s in index.saes:
        model = s.analysis.get("model")
        name = model.get("name_or_path") if isinstance(model, dict) else model
        if name:
            return Path(str(name)).name.lower()
    return "unknown-model"


def dashboard_feature(rec: dict, n_prompts: int, n_tokens: int, dataset: str) -> dict:
    """One feature in SAE-Dashboard's NeuronpediaDashboardFeature layout (its `to_dict()` keys)."""
    m = rec["metrics"]
    le = rec.get("logit_effects") or {}
    prof = rec.get("profile") or {}
    hist = prof.get("histogram") or {}
    counts = hist.get("counts") or []
    if counts and hist.get("low") is not None:
        w = (hist["high"] - hist["low"]) / len(counts)
        centres = [hist["low"] + w * (i + 0.5) for i in range(len(counts))]
    else:
        centres, counts = [], []
    lh = le.get("histogram") or {}
    max_act = m.get("max_activation") or 0.0
    return {
        "feature_index": rec["feature"],
        # neuron alignment, activation correlations and head attribution are not computed here
        "neuron_alignment_indices": [],
        "neuron_alignment_values": [],
        "neuron_alignment_l1": [],
        "correlated_neurons_indices": [],
        "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [],
        "correlated_features_indices": [],
        "correlated_features_l1": [],
        "correlated_features_pearson": [],
        "neg_str": [t["token"] for t in le.get("suppressed", [])],
        "neg_values": [t["value"] for t in le.get("suppressed", [])],
        "pos_str": [t["token"] for t in le.get("promoted", [])],
        "pos_values": [t["value"] for t in le.get("promoted", [])],
        "frac_nonzero": m.get("fire_rate") or 0.0,
        "freq_hist_data_bar_values": [round(c, 5) for c in centres],
        "freq_hist_data_bar_heights": [float(c) for c in counts],
        "logits_hist_data_bar_heights": [float(c) for c in lh.get("counts", [])],
        "logits_hist_data_bar_values": lh.get("centres", []),
        "n_prompts_total": n_prompts,
        "n_tokens_in_prompt": n_tokens,
        "dataset": dataset,
        "decoder_weights_dist": [],
        "activations": [
            {
                "bin_min": -1,  # SAE-Dashboard's "TOP ACTIVATIONS" group
                "bin_max": max_act,
                "bin_contains": -1,
                "tokens": ex["tokens"],
                "values": [0.0 if v is None else v for v in (ex["values"] or [])]
                or [ex["activation"] if i == ex["focus"] else 0.0 for i in range(len(ex["tokens"]))],
                "qualifying_token_index": ex["focus"],
            }
            for ex in rec["examples"]
        ],
        "vector": [],
    }


def export_dashboard(index: RunIndex, out_dir: str | Path, progress: bool = True) -> Path:
    """Write each SAE's features as SAE-Dashboard `batch-<n>.json` files under `out_dir/<sae>/`,
    with `skipped_indexes.json` naming the features that never fired (as the runner does)."""
    out = _fresh_dir(Path(out_dir), "dashboard.json")
    model_id = _model_id(index)
    sae_set = Path(str(index.url).rstrip("/")).name or "run"
    pending: dict[str, list] = {s.name: [] for s in index.saes}
    batch_no = {s.name: 0 for s in index.saes}
    skipped: dict[str, list[int]] = {s.name: [] for s in index.saes}

    def flush(s, final=False):
        while len(pending[s.name]) >= DASHBOARD_BATCH or (final and pending[s.name]):
            feats, pending[s.name] = pending[s.name][:DASHBOARD_BATCH], pending[s.name][DASHBOARD_BATCH:]
            batch = {
                "model_id": model_id,
                "layer": s.layer,
                "sae_set": sae_set,
                "sae_id_suffix": None,
                "features": feats,
            }
            path = out / s.name / f"batch-{batch_no[s.name]}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(batch, allow_nan=False))
            batch_no[s.name] += 1

    for _i, s, _a, recs in _blocks(index, progress, "dashboard"):
        summary = s.analysis.get("summary") or {}
        cfg = s.analysis.get("analysis_config") or {}
        source = s.analysis.get("source")
        if isinstance(source, dict):
            source = source.get("dataset") or source.get("name")
        dataset = str(source or s.analysis.get("cache") or "")
        n_tokens = 2 * int(cfg.get("context_tokens", 8)) + 1
        for rec in recs:
            if not rec["metrics"].get("fire_count"):
                skipped[s.name].append(rec["feature"])
                continue
            pending[s.name].append(dashboard_feature(rec, int(summary.get("sequences") or 0), n_tokens, dataset))
        flush(s)
    for s in index.saes:
        flush(s, final=True)
        (out / s.name).mkdir(parents=True, exist_ok=True)
        (out / s.name / "skipped_indexes.json").write_text(
            json.dumps(
                {
                    "model_id": model_id,
                    "layer": str(s.layer),
                    "sae_set": sae_set,
                    "log_sparsity": None,
                    "skipped_indexes": skipped[s.name],
                }
            )
        )
    (out / "dashboard.json").write_text(
        json.dumps(
            {
                "format": DASHBOARD_FORMAT,
                "run": index.url,
                "model_id": model_id,
                "sae_set": sae_set,
                "saes": {s.name: {"layer": s.layer, "batches": batch_no[s.name]} for s in index.saes},
            },
            indent=2,
        )
    )
    return out


# -- the server --------------------------------------------------------------------------------


def parse_query(q) -> dict[str, Any]:
    """The index's query parameters (the page's URL and /api/features share them)."""
    from .browse_data import DIRECTIONS, NUMERIC

    def number(key, cast=float):
        v = q.get(key)
        if v in (None, ""):
            return None
        try:
            return cast(v)
        except ValueError:
            raise UserError(f"{key}={v!r} is not a number") from None

    f: dict[str, Any] = {
        "sae": [q["sae"]] if q.get("sae") else None,
        "layer": number("layer", int),
        "direction": q.get("direction") or None,
        "significant": q.get("significant") == "1",
        "healthy": q.get("healthy") == "1",
        "alive": q.get("alive") == "1",
        "q": q.get("q") or None,
        "qmode": q.get("qmode") or "token",
        "sort": q.get("sort") or None,
        "dir": q.get("dir") or "asc",
        "page": number("page", int),
        "size": number("size", int),
    }
    if f["direction"] is not None and f["direction"] not in DIRECTIONS:
        raise UserError(f"direction={f['direction']!r}: use one of {', '.join(d for d in DIRECTIONS if d)}")
    if f["sort"] is not None and f["sort"] not in (*NUMERIC, "sae", "direction", "healthy"):
        raise UserError(f"sort={f['sort']!r} is not a column")
    if f["qmode"] not in ("token", "context"):
        raise UserError(f"qmode={f['qmode']!r}: use token or context")
    ranges = {}
    for c in NUMERIC:
        lo, hi = number(f"min_{c}"), number(f"max_{c}")
        if lo is not None or hi is not None:
            ranges[c] = (lo, hi)
    f["ranges"] = ranges
    return f


def not_found_html(message: str) -> str:
    import html

    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>Not found</title>"
        '<link rel="stylesheet" href="/assets/browse/browse.css"></head><body>'
        f'<h1>Not found</h1><p class="error">{html.escape(message)}</p>'
        '<p><a href="/">back to the index</a></p></body></html>'
    )


def create_app(index):
    """The Starlette app over a loaded `RunIndex`."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    title = index.url

    def html_page(name):
        return HTMLResponse(page_html(name, "server", "/", title))

    def check(name, fid):
        try:
            index.check(name, fid)
        except KeyError as e:
            raise HTTPException(404, e.args[0]) from None

    async def home(request):
        return html_page("index")

    async def feature_page(request):
        p = request.path_params
        check(p["sae"], p["fid"])
        return html_page("feature")

    async def compare_page(request):
        p = request.path_params
        check(p["a"], p["ai"])
        check(p["b"], p["bi"])
        return html_page("compare")

    async def api_meta(request):
        return JSONResponse(index.meta())

    def api_features(request):  # sync: numpy work runs in the thread pool
        try:
            f = parse_query(request.query_params)
        except UserError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse(index.page(f))

    def api_feature(request):
        p = request.path_params
        try:
            return JSONResponse(index.feature(p["sae"], p["fid"]))
        except KeyError as e:
            return JSONResponse({"error": e.args[0]}, status_code=404)

    async def not_found(request, exc):
        msg = exc.detail if isinstance(exc, HTTPException) and exc.detail != "Not Found" else None
        msg = msg or f"nothing at {request.url.path}"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": msg}, status_code=404)
        return HTMLResponse(not_found_html(msg), status_code=404)

    routes = [
        Route("/", home),
        Route("/feature/{sae}/{fid:int}", feature_page),
        Route("/compare/{a}/{ai:int}/{b}/{bi:int}", compare_page),
        Route("/api/meta", api_meta),
        Route("/api/features", api_features),
        Route("/api/feature/{sae}/{fid:int}", api_feature),
        Mount("/assets", StaticFiles(directory=str(assets_dir())), name="assets"),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found})


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or one line saying why not (a busy port most often)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(
                f"port {port} on {host} is in use; pass --port with a free one (or stop what serves there)"
            ) from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --host or --port") from None
    return sock


def serve(index, host: str, port: int) -> None:
    import uvicorn

    sock = listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}/"
    print(
        f"browse: {index.n:,} features of {len(index.saes)} SAE(s) in {index.url} at {url} (Ctrl-C stops)",
        file=sys.stderr,
    )
    sys.stderr.flush()
    config = uvicorn.Config(create_app(index), log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


@click.command("browse", help="Browse every feature of a run's SAEs in a local web app (or export it).")
@click.option("--config", "config_path", default=None, metavar="PATH", help="pipeline.toml (for the default --out).")
@click.option("--profile", default=None, help="Apply [profile.NAME] from pipeline.toml (e.g. tiny).")
@click.option(
    "--out", "out_dir", default=None, metavar="RUN", help="Run directory, a path or URL (default [train].out)."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, type=int, help="Port to listen on (0: any free one).")
@click.option("--export", "export_dir", default=None, metavar="DIR", help="Write the browser as a static site instead.")
@click.option(
    "--export-dashboard",
    "dashboard_dir",
    default=None,
    metavar="DIR",
    help="Write SAE-Dashboard / Neuronpedia batch JSON instead.",
)
@click.option("--quiet", is_flag=True, help="No progress bars (exports).")
def browse_cmd(config_path, profile, out_dir, host, port, export_dir, dashboard_dir, quiet):
    from .browse_data import RunIndex

    if out_dir is None:
        from ..config import load_config

        out_dir = load_config(config_path, profile, ()).train.out
    index = RunIndex(str(out_dir))
    if export_dir or dashboard_dir:
        if export_dir:
            path = export_site(index, export_dir, progress=not quiet)
            print(f"browse: static site in {path} (serve it with any static HTTP server)", file=sys.stderr)
        if dashboard_dir:
            path = export_dashboard(index, dashboard_dir, progress=not quiet)
            print(f"browse: SAE-Dashboard / Neuronpedia batches in {path}", file=sys.stderr)
        return
    serve(index, host, port)
