"""Where a source's records come from: a user's local file or a hub dataset pinned to a commit.

Both sources read through here: SuperGPQA's questions (`harvest.supergpqa`) and the corpus's
documents (`harvest.corpus`). A record a run could not use is refused in one line naming the
file and line (or row), never skipped: the cache records which records it holds. A hub
dataset changes upstream, so it is resolved to a commit at first use and the cache records
it; a resume reads that commit, never a newer version.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from cache_format.errors import UserError

from .config import TINY_NAME

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


class DataError(UserError):
    """A dataset or corpus source is missing, unreadable, or lacks required fields."""


def read_records(
    path: str, split: str = "train", what: str = "dataset", revision: str | None = None
) -> list[tuple[str, dict]]:
    """(where, row) of every row of a local .jsonl/.json/.parquet file, or of a hub dataset
    split at `revision`; `where` names the file and line (or row) for messages."""
    p = Path(path).expanduser()
    if p.suffix in (".jsonl", ".json", ".parquet") or p.exists():
        if not p.is_file():
            raise DataError(f"{what} file {path} does not exist; fix the path")
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            return [(f"{path} row {i}", r) for i, r in enumerate(pq.read_table(p).to_pylist())]
        return [(f"{path}:{i}", r) for i, r in json_lines(p)]
    try:
        import datasets

        rows = list(datasets.load_dataset(path, split=split, revision=revision or None))
    except Exception as e:  # the hub raises many types; the user needs one line
        raise DataError(
            f"cannot load dataset {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "give a local .jsonl/.parquet path or check network access"
        ) from None
    return [(f"{path} ({split}) row {i}", r) for i, r in enumerate(rows)]


def utf8_lines(p: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file, which must be UTF-8.

    A byte that is not UTF-8 is refused in one line naming the file, line and column rather
    than skipped: such a file is most often in another encoding (or not text at all), where
    skipping would silently drop or garble much of the corpus, and the cache records which
    documents it holds. The fix is one command, the user's to choose (see docs/harvest.md).
    """
    with open(p, encoding="utf-8", errors="surrogateescape") as f:  # bad bytes become U+DC80..U+DCFF
        for i, line in enumerate(f, 1):
            if not line.isascii():
                bad = _NOT_UTF8.search(line)
                if bad:
                    raise DataError(
                        f"{p}:{i}: byte 0x{ord(bad.group()) - 0xDC00:02x} at column {bad.start() + 1} is not UTF-8; "
                        "convert the file (iconv -f LATIN1 -t UTF-8, or iconv -f UTF-8 -t UTF-8 -c to drop bad bytes)"
                    )
            yield i, line


_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def json_lines(p: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSON-lines file."""
    for i, line in utf8_lines(p):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{p}:{i}: not valid JSON; the file must be JSON lines") from None
        if not isinstance(r, dict):
            raise DataError(
                f"{p}:{i}: a JSON {json_type(r)} where an object was expected; every line must be one "
                'object, like {"text": "..."}'
            )
        yield i, r


def json_type(v) -> str:
    """A value's type as JSON names it."""
    if v is None:
        return "null"
    kinds = ((bool, "boolean"), ((int, float), "number"), (str, "string"), ((list, tuple), "array"), (dict, "object"))
    return next((name for t, name in kinds if isinstance(v, t)), type(v).__name__)


def a_json_type(v) -> str:
    """'null', 'a number', 'an object': a value's JSON type for a sentence."""
    t = json_type(v)
    return t if t == "null" else f"{'an' if t[0] in 'aeiou' else 'a'} {t}"


# ---------------------------------------------------------------------------------------
# hub datasets: resolved to a commit at first use, recorded, reused on resume


def is_hub_path(path: str) -> bool:
    p = Path(path).expanduser()
    return path != TINY_NAME and p.suffix not in LOCAL_SUFFIXES and not p.exists()


def pin_dataset(path: str, requested: str, recorded: dict | None) -> dict | None:
    """{requested, commit} of a hub dataset (None for a local file): what the cache recorded,
    else resolved now. A different requested revision is refused by the source selection."""
    if not is_hub_path(path):
        return None
    if recorded and recorded.get("commit"):
        return recorded
    return {"requested": requested, "commit": resolve_revision(path, requested)}


def resolve_revision(path: str, revision: str) -> str:
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
