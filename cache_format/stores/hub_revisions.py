"""Hub dataset revisions: resolved to the commit they name when a cache is opened.

Every read of a Hub cache then names that commit, so a push to the repo while a loader runs
never mixes two versions (harvest pins its hub datasets the same way). `HF_ENDPOINT` is read
at call time (huggingface_hub reads it at import), so a mirror or a test server can stand in
for huggingface.co.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote

from ..errors import RemoteError, UserError

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
