"""Hub dataset revisions: resolved to a commit at first use, reused on resume.

Why: a streamed hub dataset changes upstream; a resume that read the new version would mix
two versions in one cache. Every corpus segment records {source name: {requested, commit}}
(under its planner state); a re-run takes the commit from there, and only a revision that
explicitly names something else is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

from cache_format.errors import UserError

from . import tiny
from .config import CorpusSource


def is_hub_path(path: str) -> bool:
    p = Path(path).expanduser()
    return path != tiny.TINY_NAME and p.suffix not in (".txt", ".jsonl", ".json", ".parquet") and not p.exists()


def is_hub(src: CorpusSource) -> bool:
    return is_hub_path(src.path)


def pin_dataset(path: str, requested: str, recorded: dict | None) -> dict | None:
    """{requested, commit} of a hub dataset (None for a local file): what the cache recorded,
    else resolved now. A different requested revision is refused by the source selection."""
    if not is_hub_path(path):
        return None
    if recorded and recorded.get("commit"):
        return recorded
    return {"requested": requested, "commit": resolve(path, requested)}


def resolve(path: str, revision: str) -> str:
    """The commit sha of a hub dataset at `revision` ("" = default branch).

    `HF_ENDPOINT` is read at call time (huggingface_hub reads it at import), so a test or a
    mirror can point it elsewhere.
    """
    from huggingface_hub import HfApi

    try:
        return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).dataset_info(path, revision=revision or None).sha
    except Exception as e:  # the hub raises many types; the user needs one line
        raise UserError(
            f"cannot resolve the revision {revision or 'main'!r} of hub dataset {path!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
            "check the id and network access, or use a local file"
        ) from None


def recorded(segments) -> dict[str, dict]:
    """{source name: {requested, commit}} from the committed segments (the latest wins)."""
    out: dict[str, dict] = {}
    for s in segments:
        out.update((s.meta.get("plan") or {}).get("revisions") or {})
    return out


def pin(sources: list[CorpusSource], segments) -> dict[int, dict]:
    """{source index: {requested, commit}} for every hub source; refuses an explicit change."""
    old = recorded(segments)
    out = {}
    for i, src in enumerate(sources):
        if not is_hub(src):
            continue
        name = src.name or src.path
        rec = old.get(name)
        if rec is None:
            out[i] = {"requested": src.revision, "commit": resolve(src.path, src.revision)}
        elif src.revision in ("", rec["requested"], rec["commit"]):
            out[i] = rec
        else:
            raise UserError(
                f"corpus source {name!r} was harvested at revision {rec['requested'] or 'main'!r} "
                f"(commit {rec['commit'][:12]}), not {src.revision!r}; drop the revision to resume "
                "or use another --cache"
            )
    return out
