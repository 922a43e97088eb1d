"""`python -m train browse --out RUN`: the feature browser, a local web app over a run directory.

- `/` is the index: every feature of every SAE, sorted, filtered and searched on the server
  (`browse_data.RunIndex`), shown page by page by Tabulator in remote mode;
- `/feature/<sae>/<id>` is one feature: its top contexts shaded token by token, split by the
  rollout's correctness, its activation histogram, fire rate by role and position, decoder
  neighbours and logit effects; `/compare/<sae>/<id>/<sae>/<id>` puts two side by side;
- `/api/...` answers the pages' requests in JSON.

`--export DIR` writes the same pages as a static site and `--export-dashboard DIR` the
SAE-Dashboard / Neuronpedia upload JSON (both in `browse_export`). Starlette serves, uvicorn
listens on 127.0.0.1 unless told otherwise. The pages and the vendored Tabulator are package
data under `train/assets/`.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import Any

import click

from cache_format.errors import UserError

from .browse_pages import assets_dir, page_html


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
        from .config import load_config

        out_dir = load_config(config_path, profile, ()).train.out
    index = RunIndex(str(out_dir))
    if export_dir or dashboard_dir:
        from .browse_export import export_dashboard, export_site

        if export_dir:
            path = export_site(index, export_dir, progress=not quiet)
            print(f"browse: static site in {path} (serve it with any static HTTP server)", file=sys.stderr)
        if dashboard_dir:
            path = export_dashboard(index, dashboard_dir, progress=not quiet)
            print(f"browse: SAE-Dashboard / Neuronpedia batches in {path}", file=sys.stderr)
        return
    serve(index, host, port)
