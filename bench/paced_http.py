"""A static file server behind a link of a fixed speed: every response, on every connection, draws
on one shared budget of bytes per second, as the transfers of one client share its network link.

Range requests (`bytes=a-b`, `a-`, `-n`) are answered with 206, HEAD with the size. Bodies are
read and sent in 256 KiB pieces, each sent when the link is free for it, so the aggregate rate
never exceeds the link's whatever the number of connections; below that rate, TCP's own
backpressure paces the sender. Used by bench_sync.py for its HTTP route at 1 and 10 Gbit/s.

    python bench/paced_http.py DIRECTORY PORT MBIT_PER_S
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from aiohttp import web

PIECE = 256 << 10


class Link:
    """Hands out send slots: a piece of n bytes occupies the link for n / rate seconds."""

    def __init__(self, bytes_per_s: float):
        self.rate = bytes_per_s
        self.free_at = time.monotonic()

    async def send(self, n: int) -> None:
        now = time.monotonic()
        start = max(now, self.free_at)  # an idle link does not bank its unused time
        self.free_at = start + n / self.rate
        if start > now:
            await asyncio.sleep(start - now)


def _range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, end) of a single `bytes=` range, None for the whole object."""
    if not header:
        return None
    a, _, b = header.strip().removeprefix("bytes=").partition("-")
    if not a:
        return max(0, size - int(b)), size
    return int(a), min(size, int(b) + 1) if b else size


def app(root: str, mbit_per_s: float) -> web.Application:
    link = Link(mbit_per_s * 1e6 / 8)
    root = os.path.realpath(root)

    async def serve(request: web.Request) -> web.StreamResponse:
        path = os.path.realpath(os.path.join(root, request.match_info["key"]))
        if not path.startswith(root + os.sep) or not os.path.isfile(path):
            raise web.HTTPNotFound()
        size = os.path.getsize(path)
        span = _range(request.headers.get("Range"), size)
        start, end = span or (0, size)
        if start >= end and size:
            raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
        headers = {"Content-Length": str(end - start), "Accept-Ranges": "bytes"}
        headers["Content-Type"] = "application/octet-stream"
        if span:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        resp = web.StreamResponse(status=206 if span else 200, headers=headers)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start
            while left:
                piece = f.read(min(PIECE, left))
                await link.send(len(piece))
                await resp.write(piece)
                left -= len(piece)
        await resp.write_eof()
        return resp

    a = web.Application()
    a.router.add_get("/{key:.+}", serve)  # HEAD too
    return a


if __name__ == "__main__":
    directory, port, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    web.run_app(app(directory, rate), host="127.0.0.1", port=port, print=None, access_log=None)
