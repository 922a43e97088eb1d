"""The two sources: SuperGPQA questions and packed corpus text.

Both are deterministic given their seed, so that a re-run (resume), another worker, or a
layer added later sees exactly the same sequences.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from cache_format.config import CorpusConfig, CorpusSource, SuperGPQAConfig
from cache_format.errors import UserError

from . import tiny
from .grading import LETTERS

QUESTION_FIELDS = ("uuid", "question", "options", "answer_letter")
SOURCES = ("supergpqa", "corpus")


class DataError(UserError):
    """A dataset or corpus source is missing, unreadable, or lacks required fields."""


def check_source(name: str) -> str:
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; use --source supergpqa or --source corpus")
    return name


# ---------------------------------------------------------------------------------------
# SuperGPQA


def _read_records(path: str, split: str = "train", what: str = "dataset", revision: str | None = None) -> list[dict]:
    """Rows of a local .jsonl/.json/.parquet file, or of a hub dataset split at `revision`."""
    p = Path(path).expanduser()
    if p.suffix in (".jsonl", ".json", ".parquet") or p.exists():
        if not p.is_file():
            raise DataError(f"{what} file {path} does not exist; fix the path")
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(p).to_pylist()
        rows = []
        with open(p) as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise DataError(f"{path}:{i + 1}: not valid JSON; the file must be JSON lines") from None
        return rows
    try:
        import datasets

        return list(datasets.load_dataset(path, split=split, revision=revision or None))
    except Exception as e:  # the hub raises many types; the user needs one line
        raise DataError(f"cannot load dataset {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                        "give a local .jsonl/.parquet path or check network access") from None


def load_questions(cfg: SuperGPQAConfig) -> list[dict]:
    """All questions, validated against SuperGPQA's schema (options A–J, gold letter)."""
    path = str(tiny.assets() / "questions.jsonl") if cfg.dataset == tiny.TINY_NAME else cfg.dataset
    rows = _read_records(path, cfg.split, revision=cfg.revision)
    for i, r in enumerate(rows):
        missing = [k for k in QUESTION_FIELDS if k not in r]
        if missing:
            raise DataError(f"{cfg.dataset}: record {i} lacks field(s) {', '.join(missing)}; "
                            f"questions need {', '.join(QUESTION_FIELDS)} (SuperGPQA schema)")
        opts = list(r["options"])
        if not 2 <= len(opts) <= len(LETTERS):
            raise DataError(f"{cfg.dataset}: record {i} has {len(opts)} options; SuperGPQA questions have 2..10 (A-J)")
        if r["answer_letter"] not in LETTERS[: len(opts)]:
            raise DataError(f"{cfg.dataset}: record {i} answer_letter {r['answer_letter']!r} is not one of its options")
    return rows


def select_questions(rows: list[dict], n: int, seed: int) -> list[dict]:
    """N questions by seed: a seeded permutation's first N (stable for a growing N)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[: min(n, len(rows))]]


# SuperGPQA's official zero-shot prompt (its eval's `zero-shot` template): instruction first,
# then the question and `A) option` lines. The letter list is fixed at A-J, as there.
SUPERGPQA_INSTRUCTION = ("Answer the following multiple choice question. There is only one correct answer. "
                         "The last line of your response should be in the format 'Answer: $LETTER' (without quotes), "
                         "where LETTER is one of A, B, C, D, E, F, G, H, I, or J.")


def format_question(q: dict, prompt_format: str = "supergpqa") -> str:
    """The user turn: `supergpqa` (official zero-shot) or `answer-line` (this project's first format)."""
    if prompt_format == "supergpqa":
        opts = "\n".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(q["options"]))
        return f"{SUPERGPQA_INSTRUCTION}\n\n{q['question']}\n{opts}"
    opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(q["options"]))
    letters = LETTERS[: len(q["options"])]
    return (f"{q['question']}\n\n{opts}\n\n"
            f"Answer with the letter of the correct option ({letters[0]}-{letters[-1]}) "
            f"on the last line as 'Answer: X'.")


def prompt_ids(tokenizer, q: dict, enable_thinking: bool, prompt_format: str = "supergpqa") -> list[int]:
    """The chat-template generation prefix (`<think>` included when thinking is on)."""
    msgs = [{"role": "user", "content": format_question(q, prompt_format)}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def question_record(q: dict) -> dict:
    """The source fields a sequence row carries: every column of the dataset, plus `gold`.

    Lists and tables (`options`) are stored as JSON text, so that every row of the sequences
    table has one type per column whatever the dataset holds.
    """
    rec = {k: (json.dumps(v) if isinstance(v, (list, dict, tuple)) else ("" if v is None else v))
           for k, v in q.items()}
    rec.update(uuid=str(q["uuid"]), gold=str(q["answer_letter"]), n_options=len(q["options"]))
    for k in ("discipline", "field", "subfield", "difficulty"):
        rec[k] = str(q.get(k, ""))
    return rec


# ---------------------------------------------------------------------------------------
# corpus


def _texts_of(src: CorpusSource, seed: int) -> Iterator[str]:
    """Documents of one source, in a seeded order for local files, streamed for the hub."""
    if src.path == tiny.TINY_NAME:
        docs = [d.strip() for d in (tiny.assets() / "corpus.txt").read_text().split("\n\n") if d.strip()]
        rng = random.Random(seed)
        while True:  # the bundled corpus is small: cycle it in fresh seeded orders
            order = list(range(len(docs)))
            rng.shuffle(order)
            for i in order:
                yield docs[i]
    p = Path(src.path).expanduser()
    if p.suffix == ".txt" or (p.exists() and p.suffix not in (".jsonl", ".json", ".parquet")):
        if not p.is_file():
            raise DataError(f"corpus source {src.name!r}: file {src.path} does not exist; fix corpus.sources path")
        for d in p.read_text().split("\n\n"):
            if d.strip():
                yield d.strip()
        return
    if p.suffix in (".jsonl", ".json", ".parquet"):
        rows = _read_records(src.path, src.split, what=f"corpus source {src.name!r}")
        for i, r in enumerate(rows):
            yield _field_text(r, src, i)
        return
    try:
        import datasets

        ds = datasets.load_dataset(src.path, src.subset or None, split=src.split, streaming=True)
        ds = ds.shuffle(seed=seed, buffer_size=10_000)
    except Exception as e:
        raise DataError(f"corpus source {src.name!r}: cannot stream {src.path!r} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); check the id or use a local file") from None
    for i, r in enumerate(ds):
        yield _field_text(r, src, i)


def _field_text(r: dict, src: CorpusSource, i: int) -> str:
    if src.text_field not in r:
        raise DataError(f"corpus source {src.name!r}: record {i} has no field {src.text_field!r}; "
                        f"set text_field (fields: {', '.join(sorted(r))})")
    v = r[src.text_field]
    if isinstance(v, list):  # chat-style conversations: join the turns' text
        v = "\n\n".join(t.get("value") or t.get("content") or "" if isinstance(t, dict) else str(t) for t in v)
    return str(v)


@dataclass
class PackedSequence:
    seq_index: int
    token_ids: list[int]
    docs: list[tuple[str, int]]  # (source name, document index) of every piece in it


def pack_corpus(cfg: CorpusConfig, tokenizer, eos_id: int) -> Iterator[PackedSequence]:
    """Fixed-length sequences from a weighted mixture, documents separated by EOS.

    Deterministic by `cfg.seed`: the source of each next document is a seeded weighted draw,
    and each source's documents come in a seeded order. Documents are split across sequence
    boundaries (standard packing), so no token is wasted on padding.
    """
    if not cfg.sources:
        raise DataError("corpus.sources is empty; add at least one [[corpus.sources]] table")
    weights = np.array([s.weight for s in cfg.sources], dtype=float)
    if (weights < 0).any() or weights.sum() <= 0:
        raise DataError("corpus.sources weights must be non-negative and not all zero")
    weights = weights / weights.sum()
    rng = np.random.default_rng(cfg.seed)
    streams = [_texts_of(s, cfg.seed + 1 + i) for i, s in enumerate(cfg.sources)]
    doc_counts = [0] * len(streams)
    live = list(range(len(streams)))
    buf: list[int] = []
    owners: list[tuple[str, int]] = []
    n = 0
    while live:
        w = weights[live] / weights[live].sum()
        k = live[int(rng.choice(len(live), p=w))]
        try:
            text = next(streams[k])
        except StopIteration:
            live.remove(k)
            continue
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos_id]
        owners.append((cfg.sources[k].name or cfg.sources[k].path, doc_counts[k]))
        doc_counts[k] += 1
        buf.extend(ids)
        while len(buf) >= cfg.seq_len:
            yield PackedSequence(n, buf[: cfg.seq_len], list(owners))
            n += 1
            buf = buf[cfg.seq_len:]
            owners = owners[-1:] if buf else []


def corpus_eos(tokenizer) -> int:
    """The document separator: `<|endoftext|>` where the vocabulary has it (Qwen), else EOS."""
    tid = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
        return tid
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to separate packed documents; set model.tokenizer")
    return int(tokenizer.eos_token_id)
