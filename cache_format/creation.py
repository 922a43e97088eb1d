"""Creating a cache root so that a kill at any point leaves nothing, or a cache that the same
command finishes on re-run. `create_cache` and `sync` (a new destination) both go through
`make_root`.

The order:

1. `zarr.json`, created exclusively: the point of no return. Nothing is written before it,
   so a kill before it leaves nothing (an empty directory, or one holding only a store's
   temporary files, counts as nothing).
2. The tokenizer files that zarr.json names, each checked against its digest there.
3. The root commit record `commits/0000000000.json`, created exclusively. It is a pure
   function of zarr.json, so whoever writes it writes the same bytes.

A root with zarr.json but no commit record is *unfinished*. Readers refuse it in one line
that says to re-run the command that created it; that command (harvest, import, sync,
`create_cache`) finishes it here: it writes the tokenizer files still missing, from bytes
that must match zarr.json's digests, then the root record. Finishing is idempotent, so two
processes creating one cache at the same moment agree on it: one creates zarr.json, and
both finish the same root.
"""

from __future__ import annotations

from collections.abc import Callable

from . import commits, layout, provenance
from .errors import UserError
from .stores import Location

CREATED, FINISHED, EXISTED = "created", "finished", "existed"


class CacheExistsError(UserError):
    """The location already holds a (finished) cache."""


def root_document(attrs: dict) -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": {provenance.FORMAT_NAME: attrs}}


def same_settings(a: dict, b: dict) -> bool:
    """Whether two roots were asked for with the same settings (provenance records when and where)."""
    return {k: v for k, v in a.items() if k != "provenance"} == {k: v for k, v in b.items() if k != "provenance"}


def make_root(loc: Location, attrs: dict, tokenizer_bytes: Callable[[str], bytes | None]) -> tuple[dict, str]:
    """Create a cache root with `attrs` at `loc`, or finish an unfinished one (whoever began it).

    `tokenizer_bytes(name)` gives a tokenizer file's bytes (None if unknown). Returns the root
    attributes now at `loc` and CREATED, FINISHED (it was unfinished) or EXISTED (a finished
    cache was there: nothing was written)."""
    status = None
    if not loc.exists(commits.ROOT_META):
        # non-empty only counts once zarr.json is still absent: nothing else is written before it,
        # so a directory another creator has just begun filling holds zarr.json already
        if loc.is_nonempty_dir() and not loc.exists(commits.ROOT_META):
            raise UserError(
                f"{loc.url} is a non-empty directory that is not a cache; choose a new or empty location "
                "(nothing there was changed)"
            )
        if loc.create_exclusive(commits.ROOT_META, commits.dumps(root_document(attrs))):
            status, root = CREATED, attrs
    if status is None:  # there already, or another process created it a moment ago
        root = commits.read_root(loc)  # a foreign zarr.json: "not a cache"
        names, _ = commits.list_commits(loc)
        if names or root.get("format_version", 1) < 2:
            return root, EXISTED
        status = FINISHED
    _write_tokenizer(loc, root, tokenizer_bytes, check_existing=status == FINISHED)
    loc.create_exclusive(f"{commits.COMMITS}/{commits.ROOT_RECORD}", commits.dumps(commits.root_record(root)))
    return root, status


def _write_tokenizer(loc: Location, root: dict, tokenizer_bytes, check_existing: bool) -> None:
    for name, want in root.get("tokenizer", {}).items():
        key = layout.tokenizer_key(name)
        if check_existing:
            try:
                if commits.digest(loc.read(key)) == want[commits.DIGEST]:
                    continue
            except FileNotFoundError:
                pass
        data = tokenizer_bytes(name)
        if data is None or len(data) != want["size"] or commits.digest(data) != want[commits.DIGEST]:
            raise UserError(
                f"{loc.url}: its creation stopped before tokenizer file {name} was written, and this command "
                "has another tokenizer; re-run the command that created it, or delete the unfinished cache"
            )
        loc.write(key, data)
