"""A published cache in a Hugging Face Hub dataset repo, at `hf://datasets/<org>/<repo>[@<revision>]/<path>`,
read through huggingface_hub's own fsspec filesystem (HfFileSystem).

The Hub's other address, `https://huggingface.co/datasets/<org>/<repo>/resolve/<revision>/<path>`,
is read by the HTTP backend (http.py: the Hub redirects to its storage, which serves Range).
At both, the revision is pinned to its commit when the cache is opened (http.py's
`resolve_revision`) and
reads go through the published `index.json`, never the Hub's tree listings. The Hub is written
with its own tools (`hf upload-large-folder`), so both addresses are read-only here.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote

from ..errors import UserError
from .http import HttpLocation, endpoint, resolve_revision

_HF = re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>[^/]+))?(?P<path>/.*)?$")


class HubLocation(HttpLocation):
    """`hf://datasets/<org>/<repo>[@<revision>]/<path>` through HfFileSystem, pinned to a commit."""

    protocols = ("hf",)
    _open_stream = None  # HfFileSystem is not async: a copy reads range by range

    def __init__(self, url, storage_options: dict | None = None):
        url = os.fspath(url).rstrip("/")
        m = _HF.match(url)
        if not m:
            raise UserError(
                f"{url}: a Hub cache URL is hf://datasets/<org>/<repo>[@<revision>]/<path> "
                "(models and spaces do not hold caches)"
            )
        opts = dict(storage_options or {})
        opts.setdefault("endpoint", endpoint())
        rev = unquote(m["rev"]) if m["rev"] else None
        sha = resolve_revision(m["repo"], rev, opts["endpoint"])
        self.repo_id, self.revision, self.commit = m["repo"], rev or "main", sha
        super().__init__(f"hf://datasets/{m['repo']}@{sha}{m['path'] or ''}", opts)

    def _cat_range(self, key: str, start: int, end: int) -> bytes:
        # exactly the range: HfFileSystem's files otherwise read ahead a whole block per request
        with self.fs.open(self.path(key), "rb", block_size=end - start, cache_type="none") as f:
            f.seek(start)
            return f.read(end - start)

    def _refuse_write(self):
        raise UserError(
            f"{self.url}: Hub caches are read-only here; publish a local cache (`python -m "
            "cache_format publish DIR`) and upload it with `hf upload-large-folder`"
        )
