"""The two sources: SuperGPQA questions and packed corpus text.

Both are deterministic given their seed, so that a re-run (resume), another worker, or a
layer added later sees exactly the same sequences.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

from cache_format.errors import UserError

from . import tiny
from .config import CorpusSource, SuperGPQAConfig
from .grading import LETTERS

QUESTION_FIELDS = ("uuid", "question", "options", "answer_letter")


class DataError(UserError):
    """A dataset or corpus source is missing, unreadable, or lacks required fields."""


# ---------------------------------------------------------------------------------------
# SuperGPQA


def _read_records(
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
        return [(f"{path}:{i}", r) for i, r in _json_lines(p)]
    try:
        import datasets

        rows = list(datasets.load_dataset(path, split=split, revision=revision or None))
    except Exception as e:  # the hub raises many types; the user needs one line
        raise DataError(
            f"cannot load dataset {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "give a local .jsonl/.parquet path or check network access"
        ) from None
    return [(f"{path} ({split}) row {i}", r) for i, r in enumerate(rows)]


def _utf8_lines(p: Path) -> Iterator[tuple[int, str]]:
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


def _json_lines(p: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSON-lines file."""
    for i, line in _utf8_lines(p):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{p}:{i}: not valid JSON; the file must be JSON lines") from None
        if not isinstance(r, dict):
            raise DataError(
                f"{p}:{i}: a JSON {_json_type(r)} where an object was expected; every line must be one "
                'object, like {"text": "..."}'
            )
        yield i, r


def _json_type(v) -> str:
    """A value's type as JSON names it."""
    if v is None:
        return "null"
    kinds = ((bool, "boolean"), ((int, float), "number"), (str, "string"), ((list, tuple), "array"), (dict, "object"))
    return next((name for t, name in kinds if isinstance(v, t)), type(v).__name__)


def _a(v) -> str:
    """'null', 'a number', 'an object': a value's JSON type for a sentence."""
    t = _json_type(v)
    return t if t == "null" else f"{'an' if t[0] in 'aeiou' else 'a'} {t}"


def load_questions(cfg: SuperGPQAConfig, commit: str | None = None) -> list[dict]:
    """All questions, validated against SuperGPQA's schema (options A–J, gold letter); a hub
    dataset is read at `commit` (the cache's pin) when given, else at `cfg.revision`."""
    path = str(tiny.assets() / "questions.jsonl") if cfg.dataset == tiny.TINY_NAME else cfg.dataset
    rows = _read_records(path, cfg.split, revision=commit or cfg.revision)
    for where, r in rows:
        _check_question(where, r)
    return [r for _, r in rows]


def _check_question(where: str, r: dict) -> None:
    """One line naming the record and field for a question a run could not use."""
    missing = [k for k in QUESTION_FIELDS if k not in r]
    if missing:
        raise DataError(
            f"{where}: lacks field(s) {', '.join(missing)}; questions need "
            f"{', '.join(QUESTION_FIELDS)} (SuperGPQA schema)"
        )
    if isinstance(r["uuid"], bool) or not isinstance(r["uuid"], (str, int)) or r["uuid"] == "":
        raise DataError(f"{where}: uuid is {r['uuid']!r}; every question needs an id (a string)")
    if not isinstance(r["question"], str) or not r["question"].strip():
        raise DataError(f"{where}: question is {r['question']!r:.40}; it must be the question's text")
    opts = r["options"]
    if not isinstance(opts, (list, tuple)):
        raise DataError(
            f"{where}: options is {_a(opts)} ({opts!r:.40}); it must be a list of 2..10 answer "
            'strings, like ["4", "5", "6"]'
        )
    if not 2 <= len(opts) <= len(LETTERS):
        raise DataError(f"{where}: has {len(opts)} options; SuperGPQA questions have 2..10 (A-J)")
    bad = next((i for i, o in enumerate(opts) if not isinstance(o, str)), None)
    if bad is not None:
        raise DataError(f"{where}: option {LETTERS[bad]} is {_a(opts[bad])}; options must be strings")
    if r["answer_letter"] not in tuple(LETTERS[: len(opts)]):
        raise DataError(f"{where}: answer_letter {r['answer_letter']!r} is not one of its options")


def select_questions(rows: list[dict], n: int, seed: int) -> list[dict]:
    """N questions by seed: a seeded permutation's first N (stable for a growing N)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[: min(n, len(rows))]]


def question_record(q: dict) -> dict:
    """The source fields a sequence row carries: every column of the dataset, plus `gold`.

    Lists and tables (`options`) are stored as JSON text, so that every row of the sequences
    table has one type per column whatever the dataset holds.
    """
    rec = {k: (json.dumps(v) if isinstance(v, (list, dict, tuple)) else ("" if v is None else v)) for k, v in q.items()}
    rec.update(uuid=str(q["uuid"]), gold=str(q["answer_letter"]), n_options=len(q["options"]))
    for k in ("discipline", "field", "subfield", "difficulty"):
        rec[k] = str(q.get(k, ""))
    return rec


# ---------------------------------------------------------------------------------------
# corpus: every reader streams (nothing holds a whole file) and can skip documents by count


def iter_documents(src: CorpusSource, seed: int, skip: int = 0, revision: str = "") -> Iterator[str]:
    """Documents of one source after the first `skip`, in a fixed order for the seed.

    Local files keep their order; the hub is streamed through a seeded shuffle buffer, so a
    resume replays (reads, never tokenizes) the documents it skips; `builtin:tiny` cycles.
    """
    if src.path == tiny.TINY_NAME:
        docs = [d.strip() for d in (tiny.assets() / "corpus.txt").read_text().split("\n\n") if d.strip()]
        yield from itertools.islice(_cycle_shuffled(docs, seed), skip, None)
        return
    p = Path(src.path).expanduser()
    if p.suffix in (".txt", ".jsonl", ".json", ".parquet") or p.exists():
        if not p.is_file():
            raise DataError(f"corpus source {src.name!r}: file {src.path} does not exist; fix corpus.sources path")
        if src.revision:
            raise DataError(
                f"corpus source {src.name!r}: revision {src.revision!r} applies to hub datasets only; "
                "remove it for the local file"
            )
        if p.suffix == ".parquet":
            yield from _parquet_texts(p, src, skip)
        elif p.suffix in (".jsonl", ".json"):
            yield from itertools.islice(_jsonl_texts(p, src), skip, None)
        else:
            yield from itertools.islice(_txt_docs(p), skip, None)
        return
    try:
        import datasets

        ds = datasets.load_dataset(
            src.path, src.subset or None, split=src.split, streaming=True, revision=revision or src.revision or None
        )
        ds = ds.shuffle(seed=seed, buffer_size=10_000)
    except Exception as e:
        raise DataError(
            f"corpus source {src.name!r}: cannot stream {src.path!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "check the id or use a local file"
        ) from None
    where = f"corpus source {src.name!r} ({src.path}) record"
    for i, r in enumerate(itertools.islice(ds, skip, None)):
        yield _field_text(r, src, f"{where} {skip + i}")


MAX_TOKENS_PER_BYTE = 4


def token_bound(src: CorpusSource) -> int | None:
    """The most tokens a local text source can give, from its size alone, so that a --tokens it
    cannot reach is refused before any planning; None where no size bounds it: `builtin:tiny`
    cycles, a hub stream's size is unknown before reading it, and parquet's sizes are of its
    encoding (a dictionary-encoded column is far smaller than its text).

    Why 4 a byte: a byte-level BPE (Qwen's) emits at most one token per byte of its normalized
    text, NFC normalization at most triples a text's bytes, and each document adds one EOS for
    at least two bytes of the file (text bytes never exceed the file's, JSON escapes included).
    Real text gives about 0.25, so this catches only the impossible; a run that asks for more
    than a source really holds still commits what it gave and ends in one line.
    """
    p = Path(src.path).expanduser()
    if src.path == tiny.TINY_NAME or p.suffix == ".parquet" or not p.is_file():
        return None
    return MAX_TOKENS_PER_BYTE * p.stat().st_size


def _cycle_shuffled(docs: list[str], seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    while True:  # the bundled corpus is small: cycle it in fresh seeded orders
        order = list(range(len(docs)))
        rng.shuffle(order)
        for i in order:
            yield docs[i]


def _txt_docs(p: Path) -> Iterator[str]:
    """Documents separated by blank lines, read line by line."""
    lines: list[str] = []
    for _, line in _utf8_lines(p):
        if line.strip("\n"):
            lines.append(line)
            continue
        doc = "".join(lines).strip()
        lines = []
        if doc:
            yield doc
    doc = "".join(lines).strip()
    if doc:
        yield doc


def _jsonl_texts(p: Path, src: CorpusSource) -> Iterator[str]:
    for i, r in _json_lines(p):
        yield _field_text(r, src, f"{p}:{i}")


def _parquet_texts(p: Path, src: CorpusSource, skip: int) -> Iterator[str]:
    """One column in record batches; whole row groups before `skip` are not even read."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(p)
    if src.text_field not in f.schema_arrow.names:
        raise DataError(
            f"corpus source {src.name!r}: {p} has no column {src.text_field!r}; "
            f"set text_field (columns: {', '.join(f.schema_arrow.names)})"
        )
    groups, n = [], 0
    for g in range(f.num_row_groups):
        rows = f.metadata.row_group(g).num_rows
        if n + rows <= skip:
            n += rows
            continue
        groups.append(g)
    i = n
    for batch in f.iter_batches(batch_size=1024, row_groups=groups, columns=[src.text_field]):
        for v in batch.column(0).to_pylist():
            if i >= skip:
                yield _field_text({src.text_field: v}, src, f"{p} row {i}")
            i += 1


def _field_text(r: dict, src: CorpusSource, where: str) -> str:
    """A record's text: its `text_field`, a string (or chat turns, joined). Anything else,
    null included, is one line naming the record: storing "None" or a number's digits as a
    document would put text in the cache that the source never held."""
    if src.text_field not in r:
        raise DataError(
            f"{where} has no field {src.text_field!r}; set text_field of corpus source {src.name!r} "
            f"(fields: {', '.join(sorted(r))})"
        )
    v = r[src.text_field]
    if isinstance(v, list):  # chat-style conversations: join the turns' text
        turns = []
        for t in v:
            text = (t.get("value") or t.get("content") or "") if isinstance(t, dict) else t
            if not isinstance(text, str):
                raise DataError(f"{where}: a turn of {src.text_field!r} is {_a(text)}, not text")
            turns.append(text)
        v = "\n\n".join(turns)
    if not isinstance(v, str):
        raise DataError(f"{where}: {src.text_field!r} is {_a(v)}, not text; give the record text or remove it")
    return v


def corpus_eos(tokenizer) -> int:
    """The document separator: `<|endoftext|>` where the vocabulary has it (Qwen), else EOS."""
    tid = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
        return tid
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to separate packed documents; set model.tokenizer")
    return int(tokenizer.eos_token_id)
