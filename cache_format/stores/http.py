"""A published cache over plain HTTP(S): read-only, and without listings.

Readers take the commit records from the `index.json` that `publish` writes; everything
else is ranged GETs through fsspec's HTTP filesystem (redirects followed, Range kept),
retried like any remote read; a copy streams each object through `requests` instead. A Hub
`…/resolve/<revision>/…` URL is pinned to the commit its revision names when it is opened
(below: `HF_ENDPOINT` is read at call time, since huggingface_hub reads it at import, so a
mirror or a test server can stand in for huggingface.co; hub.py's `hf://` addresses are pinned
the same way). A web page served in an object's place (a login or error page, a `/blob/`
URL) is refused in one line, not read as data.
"""

from __future__ import annotations

import http.client
import os
import re
import threading
from urllib.parse import unquote

from ..errors import RemoteError, UserError
from .base import ObjectInfo, ReadOnlyError, Upload
from .fsspec import FsspecLocation

_HTML = re.compile(rb"^\s*<(!doctype\s+html|html[\s>])", re.IGNORECASE)


_local = threading.local()


def _session():
    """This thread's requests session (connections are reused, never shared between threads)."""
    if not hasattr(_local, "session"):
        import requests

        _local.session = requests.Session()
    return _local.session


class _Body:
    """A streamed requests response, read into the caller's buffer.

    urllib3's `readinto` reads into a new bytes object and copies that over: every byte copied
    twice, and fresh memory to fault in for every read. The http.client response under it
    receives into the buffer itself. Either way the body is taken as sent (requests has urllib3
    leave it undecoded; the request asks for `identity`), and the checksum judges it."""

    def __init__(self, r):
        self.r = r
        fp = getattr(r.raw, "_fp", None)  # urllib3 keeps the http.client response there
        self.readinto = fp.readinto if isinstance(fp, http.client.HTTPResponse) else r.raw.readinto

    def close(self) -> None:
        self.r.close()


class HttpLocation(FsspecLocation):
    protocols = ("http", "https")
    supports_listing = False
    supports_writes = False

    def __init__(self, url, storage_options: dict | None = None):
        super().__init__(pin_resolve_url(os.fspath(url).rstrip("/")), storage_options)

    def _checked_body(self, key: str, out: bytes) -> bytes:
        if _HTML.match(bytes(out[:64])):
            raise self._web_page(key)
        return out

    def _web_page(self, key: str) -> UserError:
        return UserError(
            f"{self.url}/{key}: the server sent a web page, not the object; check the URL "
            "(on the Hub, use a /resolve/ URL, not /blob/ or /tree/) and that the cache was uploaded there"
        )

    def _open_stream(self, key: str, start: int, end: int):
        """A streamed GET through `requests`, one connection per copying thread: the bytes are
        received in that thread, beside its checksum, rather than all on fsspec's one event loop."""
        headers = {**self.fs.kwargs.get("headers", {}), "Range": f"bytes={start}-{end - 1}"}
        headers["Accept-Encoding"] = "identity"
        r = _session().get(self.path(key), headers=headers, stream=True, timeout=(30, 300))
        if r.status_code == 404:
            r.close()
            raise FileNotFoundError(self.path(key))
        r.raise_for_status()  # a 5xx: retried
        if r.headers.get("Content-Type", "").startswith("text/html"):
            r.close()
            raise self._web_page(key)
        if r.status_code != 206 and not (start == 0 and int(r.headers.get("Content-Length", -1)) == end):
            r.close()
            raise RemoteError(
                f"{self.url}/{key}: the server ignored a range request (status {r.status_code}); serve the "
                "cache with a server that honours HTTP Range"
            )
        return _Body(r)

    def exists(self, key: str) -> bool:
        """No listings to ask: a GET of the object (retried like any read) returns a body or a 404."""
        try:
            return bool(self.read(key))
        except FileNotFoundError:
            return False

    def list(self, prefix: str) -> list[str]:
        raise ReadOnlyError(f"{self.url}: HTTP has no listings; read it through its published index.json")

    def walk(self, prefix: str) -> list[ObjectInfo]:
        raise ReadOnlyError(f"{self.url}: HTTP has no listings")

    def _refuse_write(self):
        raise ReadOnlyError(f"{self.url}: HTTP caches are read-only; write to a local path or s3:// URL and publish it")

    def write(self, key: str, data: bytes) -> None:
        self._refuse_write()

    def create_exclusive(self, key: str, data: bytes) -> bool:
        self._refuse_write()

    def delete(self, keys: list[str]) -> None:
        self._refuse_write()

    def upload(self, key: str, tag: str, size: int, part: int) -> Upload:
        self._refuse_write()


# Hub dataset revisions: every read of a Hub cache names the commit its revision named when it
# was opened, so a push to the repo while a loader runs never mixes two versions.

_RESOLVE = re.compile(
    r"^(?P<origin>https?://[^/]+)/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)(?P<path>/.*)?$"
)


def endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def resolve_revision(repo_id: str, revision: str | None, at: str | None) -> str:
    """The commit sha of dataset `repo_id` at `revision` (a branch, tag or sha; None: the default
    branch), asked of the Hub at `at` (None: huggingface.co or HF_ENDPOINT); one line if there is none."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi(endpoint=at or endpoint()).dataset_info(repo_id, revision=revision).sha
    except RevisionNotFoundError:
        raise UserError(
            f"hub dataset {repo_id!r} has no revision {revision!r}; check the branch, tag or commit "
            "(see the repo's history on the Hub)"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"hub dataset {repo_id!r} does not exist, or is private (log in with `hf auth login`); check the URL"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise RemoteError(
            f"cannot resolve revision {revision or 'main'!r} of hub dataset {repo_id!r} "
            f"({type(e).__name__}: {first}); check network access and the endpoint"
        ) from None


def pin_resolve_url(url: str) -> str:
    """A Hub `…/resolve/<revision>/…` URL with its revision replaced by the commit it names now;
    any other URL as given."""
    m = _RESOLVE.match(url)
    if not m:
        return url
    rev = unquote(m["rev"])
    sha = resolve_revision(m["repo"], rev, m["origin"])
    return f"{m['origin']}/datasets/{m['repo']}/resolve/{sha}{m['path'] or ''}"
