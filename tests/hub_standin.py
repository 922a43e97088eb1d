"""A loopback stand-in for the Hugging Face Hub's dataset endpoints (the `hub_serve` fixture).

It serves what huggingface_hub's HfApi and HfFileSystem ask for, and what a browser or the
HTTP backend asks of a resolve URL (huggingface_hub 2.4's requests, read from its source):

- `GET /api/datasets/<org>/<name>[/revision/<rev>]`: the repo's info with the commit `sha` a
  revision names (`X-Error-Code: RepoNotFound` / `RevisionNotFound` on a 404, as the Hub does);
- `GET /api/datasets/<org>/<name>/tree/<rev>/<path>`: one directory's entries (HfFileSystem's
  `ls` and `info`); `POST /api/datasets/<org>/<name>/paths-info/<rev>`: entries by path;
- `GET|HEAD /datasets/<org>/<name>/resolve/<rev>/<path>`: a 302 to a storage URL (with
  `X-Repo-Commit`, `ETag`, `X-Linked-Size`), `X-Error-Code: EntryNotFound` for a missing file;
- `GET /storage/<sha>/<path>?sig=…`: the bytes, honouring Range, with an ETag; every
  `fail_every`-th distinct storage request answers 503 once (an occasional 5xx);
- `html=True` answers every resolve with a 200 web page instead (a login or error page).

Reading a cache through HfFileSystem needs only the revision info, the tree listing of each
directory read from (for an object's size) and the resolve GETs; nothing else is asked.
huggingface_hub also fetches `GET /api/agent-harnesses` (a registry for its user agent, once a
day): the stand-in answers 404, which it tolerates.

A repo is a directory per commit: `serve.push(repo, directory)` adds a commit and moves `main`
to it, so a reader that pinned the old commit keeps reading the old files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import urllib.parse

from conftest import RangeHandler

API = re.compile(r"^/api/datasets/([^/]+/[^/]+?)(?:/revision/([^/?]+))?/?$")
TREE = re.compile(r"^/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(/.*)?$")
PATHS = re.compile(r"^/api/datasets/([^/]+/[^/]+)/paths-info/([^/]+)$")
RESOLVE = re.compile(r"^/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
STORAGE = re.compile(r"^/storage/([0-9a-f]{40})/(.+)$")


class HubState:
    def __init__(self, fail_every: int = 0, html: bool = False):
        self.repos: dict[str, dict] = {}  # repo → {"refs": {name: sha}, "commits": {sha: directory}}
        self.fail_every, self.html = fail_every, html
        self.lock = threading.Lock()
        self.storage_requests = 0  # distinct (path, Range) storage requests
        self.seen: set = set()
        self.failed = 0
        self.log: list[tuple[str, str]] = []  # (method, path) of every request
        self.unserved: list[str] = []  # requests for routes the stand-in does not serve

    def push(self, repo: str, directory) -> str:
        with self.lock:
            r = self.repos.setdefault(repo, {"refs": {}, "commits": {}})
            sha = hashlib.sha1(f"{repo}:{len(r['commits'])}:{directory}".encode()).hexdigest()
            r["commits"][sha] = str(directory)
            r["refs"]["main"] = sha
            return sha

    def commit_of(self, repo: str, rev: str) -> tuple[str | None, str | None]:
        """(sha, None), or (None, the Hub's X-Error-Code)."""
        r = self.repos.get(repo)
        if r is None:
            return None, "RepoNotFound"
        rev = urllib.parse.unquote(rev)
        if rev in r["refs"]:
            return r["refs"][rev], None
        if rev in r["commits"]:
            return rev, None
        return None, "RevisionNotFound"


class HubHandler(RangeHandler):
    def _state(self) -> HubState:
        return self.server.hub

    def _json(self, obj, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str) -> None:
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _entry(self, root: str, rel: str) -> dict:
        full = os.path.join(root, rel)
        if os.path.isdir(full):
            return {"type": "directory", "path": rel, "oid": hashlib.sha1(rel.encode()).hexdigest()}
        with open(full, "rb") as f:
            oid = hashlib.sha1(f.read()).hexdigest()
        return {"type": "file", "path": rel, "size": os.path.getsize(full), "oid": oid}

    def _route(self) -> None:
        hub = self._state()
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        with hub.lock:
            hub.log.append((self.command, path))
        if m := API.match(url.path):
            sha, err = hub.commit_of(m[1], m[2] or "main")
            if err:
                return self._error(404, err)
            return self._json({"id": m[1], "sha": sha, "private": False, "siblings": []})
        if m := TREE.match(url.path):
            sha, err = hub.commit_of(m[1], m[2])
            if err:
                return self._error(404, err)
            root = hub.repos[m[1]]["commits"][sha]
            rel = urllib.parse.unquote((m[3] or "").strip("/"))
            d = os.path.join(root, rel)
            if not os.path.isdir(d):
                return self._error(404, "EntryNotFound")
            return self._json([self._entry(root, f"{rel}/{n}".strip("/")) for n in sorted(os.listdir(d))])
        if m := PATHS.match(url.path):
            sha, err = hub.commit_of(m[1], m[2])
            if err:
                return self._error(404, err)
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n).decode()
            form = urllib.parse.parse_qs(raw) if not raw.startswith("{") else json.loads(raw)
            paths = form.get("paths", [])
            root = hub.repos[m[1]]["commits"][sha]
            return self._json([self._entry(root, p) for p in paths if os.path.exists(os.path.join(root, p))])
        if m := RESOLVE.match(url.path):
            sha, err = hub.commit_of(m[1], m[2])
            if err:
                return self._error(404, err)
            if hub.html:
                page = b"<!DOCTYPE html>\n<html><head><title>Hugging Face</title></head><body>Log in</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(page)
                return
            rel = urllib.parse.unquote(m[3])
            full = os.path.join(hub.repos[m[1]]["commits"][sha], rel)
            if not os.path.isfile(full):
                return self._error(404, "EntryNotFound")
            etag = f'"{hashlib.sha1(f"{sha}/{rel}".encode()).hexdigest()}"'
            self.send_response(302)
            self.send_header("Location", f"/storage/{sha}/{urllib.parse.quote(rel)}?sig=standin")
            self.send_header("X-Repo-Commit", sha)
            self.send_header("ETag", etag)
            self.send_header("X-Linked-Etag", etag)
            self.send_header("X-Linked-Size", str(os.path.getsize(full)))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if m := STORAGE.match(url.path):
            with hub.lock:  # every fail_every-th new request fails once; its retry is served
                want = (url.path, self.headers.get("Range"))
                fresh = want not in hub.seen
                hub.seen.add(want)
                hub.storage_requests += fresh
                fail = fresh and hub.fail_every and hub.storage_requests % hub.fail_every == 0
                hub.failed += bool(fail)
            if fail:
                return self.send_error(503, "storage busy")
            repo_dirs = [r["commits"][m[1]] for r in hub.repos.values() if m[1] in r["commits"]]
            if not repo_dirs:
                return self.send_error(404, "no such object")
            self.directory = repo_dirs[0]
            self.path = "/" + urllib.parse.quote(urllib.parse.unquote(m[2]))
            f = self.send_head()
            if f:
                try:
                    if self.command != "HEAD":
                        self.copyfile(f, self.wfile)
                finally:
                    f.close()
            return
        with hub.lock:
            hub.unserved.append(path)
        self.send_error(404, "not a Hub route")

    do_GET = do_HEAD = do_POST = _route
