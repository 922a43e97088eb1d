"""Shared fixtures: real servers on loopback and small real caches.

- `http_serve(directory) -> base URL`: a threaded HTTP server that honours Range
  (Python's http.server ignores it, and fsspec would then read garbage from shards).
  `http_serve(directory, fail_first=N)` answers the first N requests with 503, to test retries.
  `http_serve(directory, faults=FAULTS)` makes the first answer to every distinct request
  (path + Range) fail, rotating through FAULTS: "500", "drop" (close without a reply),
  "truncate" (full Content-Length, half the body, then close), "short" (a Content-Length and
  body of half the range) and "flip" (one byte changed); the re-request is answered correctly.
  `http_serve(directory, stall_from=N)` sends every object up to byte N and then hangs (a
  transfer to kill mid-object); `http_serve.served` counts the body bytes sent per path.
  `serve.requested` lists every request's path, in order.
- `s3`: one moto ThreadedMotoServer per session on loopback; `s3_bucket` gives a fresh
  bucket per test as `(url, storage_options)`.
- `hub_serve(fail_every=0, html=False) -> (endpoint, state)`: a stand-in for the Hub's dataset
  endpoints (API, tree, resolve → 302 → Range-capable storage with ETags and an occasional
  503), in tests/hub_standin.py.
- `make_cache(url=None, ...) -> (url, data)`: a small real cache on disk with known
  residuals, rows and labels (`data` holds what was written, for comparisons).
- `chromium`: one headless Debian Chromium per session, driven by Selenium through Debian's
  chromedriver (`make install` apt-installs both; nothing is downloaded at test time).
"""

from __future__ import annotations

import email.utils
import os
import re
import threading
import time
import uuid
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from support import free_port, s3_options, write_cache

os.environ.setdefault("ACTCACHE_RETRIES", "2")
os.environ.setdefault("ACTCACHE_BACKOFF_S", "0.05")


class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with single-range `Range: bytes=a-b | a- | -n` support (206 replies)."""

    fail_first = 0  # set per server: answer this many requests with 503 first
    _failures = None

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _choose_fault(self, counter):
        """The first answer to each distinct request fails (rotating kinds)."""
        faults = counter.get("faults")
        key = (self.command, self.path, self.headers.get("Range"))
        if faults and key not in counter["seen"]:
            counter["seen"].add(key)
            return faults[len(counter["seen"]) % len(faults)]
        return None

    def send_head(self):
        counter = self.server.failures
        with counter["lock"]:
            counter["requested"].append(self.path)
            if counter["left"] > 0:
                counter["left"] -= 1
                self.send_error(503, "transient test failure")
                return None
            self._fault = self._choose_fault(counter)
            if self._fault:
                counter["injected"][self._fault] = counter["injected"].get(self._fault, 0) + 1
        if self._fault == "500":
            self.send_error(500, "injected failure")
            return None
        if self._fault == "drop":
            self.close_connection = True
            return None
        path = self.translate_path(self.path)
        if os.path.isdir(path) or not os.path.isfile(path):
            self.send_error(404, "not found")
            return None
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
        rng = self.headers.get("Range")
        start, end = 0, size - 1
        status = 200
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                f.close()
                self.send_error(416, "bad range")
                return None
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start = max(0, size - int(m.group(2)))
            if start > end or start >= size:
                f.close()
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.end_headers()
                return None
            status = 206
        length = end - start + 1
        stall = counter.get("stall_from")  # a transfer that hangs at that byte (killed by the test)
        self._stall_after = None if stall is None or end < stall else max(0, stall - start)
        if self._fault == "short" and length > 1:
            end, length = start + length // 2 - 1, length // 2
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        st = os.fstat(f.fileno())
        self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
        self.send_header("ETag", f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        f.seek(start)
        self._remaining = end - start + 1
        return f

    def copyfile(self, source, outputfile):
        sent = [0]

        def write(data):
            outputfile.write(data)
            sent[0] += len(data)

        try:
            self._copy_body(source, write, outputfile)
        finally:
            counter = self.server.failures
            with counter["lock"]:
                counter["served"][self.path] = counter["served"].get(self.path, 0) + sent[0]

    def _copy_body(self, source, write, outputfile):
        stall = getattr(self, "_stall_after", None)
        if stall is not None:
            write(source.read(stall))
            outputfile.flush()
            time.sleep(120)
            self.close_connection = True
            return
        left = getattr(self, "_remaining", None)
        fault = getattr(self, "_fault", None)
        if fault in ("truncate", "flip") and left:
            body = bytearray(source.read(left))
            if fault == "flip":
                body[len(body) // 2] ^= 0x20
                write(bytes(body))
            else:
                write(bytes(body[: len(body) // 2]))
                self.close_connection = True
            return
        while left is None or left > 0:
            buf = source.read(1 << 20 if left is None else min(1 << 20, left))
            if not buf:
                break
            write(buf)
            if left is not None:
                left -= len(buf)


@pytest.fixture
def http_serve():
    servers = []

    def serve(directory, fail_first: int = 0, faults: tuple = (), stall_from: int | None = None) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(directory)))
        server.daemon_threads = True
        server.failures = {
            "left": fail_first,
            "lock": threading.Lock(),
            "faults": tuple(faults),
            "seen": set(),
            "injected": {},
            "served": {},
            "stall_from": stall_from,
            "requested": [],
        }
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        serve.injected = server.failures["injected"]  # fault kind → how many were injected
        serve.served = server.failures["served"]  # path → body bytes sent
        serve.requested = server.failures["requested"]
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
def hub_serve():
    """hub_serve(fail_every=0, html=False) -> (endpoint URL, HubState): a stand-in for the
    Hugging Face Hub's dataset endpoints (tests/hub_standin.py); `state.push(repo, dir)` adds
    a commit of `dir` to dataset `repo` and moves `main` to it."""
    from hub_standin import HubHandler, HubState

    servers = []

    def serve(fail_every: int = 0, html: bool = False):
        server = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
        server.daemon_threads = True
        server.hub = HubState(fail_every, html)
        server.failures = {
            "left": 0,
            "lock": threading.Lock(),
            "faults": (),
            "seen": set(),
            "injected": {},
            "served": {},
            "requested": [],
        }
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server.hub

    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


class FaultProxy(RangeHandler):
    """Forwards every request to `server.target` (e.g. moto's S3); the first GET of each distinct
    path + Range fails once with the next of `server.faults`, like `http_serve(faults=...)`."""

    def _forward(self):
        import http.client

        n = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Expect", "").lower() == "100-continue":  # botocore's PUTs wait for it
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        body = self.rfile.read(n) if n else None
        part = re.search(r"[?&]partNumber=(\d+)", self.path)
        stall = self.server.failures.get("stall_part")
        if part and stall is not None and int(part.group(1)) >= stall:  # an upload that hangs mid-object
            time.sleep(120)
            self.close_connection = True
            return
        if part:
            with self.server.failures["lock"]:
                self.server.failures["part_bytes"] += n
        fault = None
        if self.command == "GET" and self.server.failures["faults"]:
            counter = self.server.failures
            with counter["lock"]:
                key = (self.path, self.headers.get("Range"))
                if key not in counter["seen"]:
                    counter["seen"].add(key)
                    fault = counter["faults"][len(counter["seen"]) % len(counter["faults"])]
                    counter["injected"][fault] = counter["injected"].get(fault, 0) + 1
        if fault == "500":
            self.send_error(500, "injected failure")
            return
        if fault == "drop":
            self.close_connection = True
            return
        conn = http.client.HTTPConnection(*self.server.target, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "expect")}
        conn.request(self.command, self.path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        if fault == "short" and len(data) > 1:
            data = data[: len(data) // 2]
        if fault == "flip" and data:
            data = bytearray(data)
            data[len(data) // 2] ^= 0x20
            data = bytes(data)
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("content-length", "connection", "transfer-encoding", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data) * 2 if fault == "truncate" else len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        if fault == "truncate":
            self.close_connection = True
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


@pytest.fixture
def fault_proxy():
    """fault_proxy("http://host:port", faults, stall_part=None) -> the proxy's URL; `.injected` counts
    the faults; `stall_part=N` hangs every multipart upload of part N or later (an upload to kill
    mid-object); `.state["part_bytes"]` counts the part bytes forwarded."""
    servers = []

    def start(target: str, faults: tuple = (), stall_part: int | None = None) -> str:
        host, port = target.split("://", 1)[1].split(":")
        server = ThreadingHTTPServer(("127.0.0.1", 0), FaultProxy)
        server.daemon_threads = True
        server.target = (host, int(port))
        server.failures = {
            "left": 0,
            "lock": threading.Lock(),
            "faults": tuple(faults),
            "seen": set(),
            "injected": {},
            "stall_part": stall_part,
            "part_bytes": 0,
        }
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        start.injected = server.failures["injected"]
        start.state = server.failures  # part_bytes: bytes of multipart upload parts forwarded
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on loopback for the session: yields its endpoint URL."""
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(k, v)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3):
    """A fresh bucket: yields ("s3://bucket", storage_options)."""
    import s3fs

    opts = s3_options(s3)
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**opts).call_s3("create_bucket", Bucket=name)
    yield f"s3://{name}", opts


@pytest.fixture
def make_cache(tmp_path):
    """Factory: make_cache(url=None, **write_cache kwargs) -> (url, data)."""
    count = [0]

    def make(url=None, **kw):
        count[0] += 1
        url = url or str(tmp_path / f"cache{count[0]}")
        return url, write_cache(url, **kw)

    return make


@pytest.fixture
def run(monkeypatch, capsys):
    """`python -m cache_format ARGS` in-process, through run_cli: (exit code, stdout, stderr)."""
    import sys

    from cache_format.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["python -m cache_format", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def chromium(tmp_path_factory):
    """A Selenium WebDriver on Debian's headless Chromium, offline (see support.chromium_flags)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from support import CHROMEDRIVER, chromium_binary, chromium_flags

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium_binary()
    for flag in chromium_flags(tmp_path_factory.mktemp("chromium-profile")):
        opts.add_argument(flag)
    opts.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
