"""The corpus stage: read → tokenize → mix → pack, streaming, into work units.

- **Read.** Every reader streams (nothing holds a whole file) and can skip documents by
  count: `.txt` (documents separated by blank lines) and `.jsonl` line by line, parquet by
  record batches of its one text column, hub datasets with `datasets` streaming through a
  seeded shuffle buffer, `builtin:tiny` cycling. Hub revisions are resolved to a commit at
  first use and recorded in every segment, so a resume reads the same dataset version.
- **Tokenize.** Documents are tokenized in batches by a background pool, each followed by
  the separator (`<|endoftext|>` where the vocabulary has it, else EOS).
- **Mix.** Weights are token shares (or per-document draw odds), drawn by a seeded generator.
- **Pack.** Documents fill `seq_len`-token sequences across boundaries, no padding.

Why streaming: tokenizing the whole corpus into lists before the first forward costs ~40
bytes and 5 µs per token (8 GB and a quarter of an hour at the 001 card's 200M tokens), and
it was redone on every resume. Here units are handed out one at a time through a bounded
queue while the forward runs. Each unit carries the planner's state at its end (the mixer's
RNG, every source's document position, the document left open at the boundary); its segment
records it, so a re-run restarts from the last committed unit instead of the beginning.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache_format.concurrency import QueueThread
from cache_format.errors import UserError

from .config import TINY_NAME, CorpusConfig, CorpusSource, PipelineConfig, tiny_assets
from .records import (
    LOCAL_SUFFIXES,
    DataError,
    a_json_type,
    is_hub_path,
    json_lines,
    resolve_revision,
    utf8_lines,
)
from .units import Unit

STATE_KEY = "plan"  # segment meta: the planner state after the unit's last sequence
ROWS_KEY = "rows_by_source"  # segment meta: {source name: rows}, what `cache_format info` sums into shares
BATCH_DOCS = 64  # documents per tokenizer call
MIX_MODES = ("tokens", "documents")


# ---------------------------------------------------------------------------------------
# read: every reader streams and can skip documents by count


def iter_documents(src: CorpusSource, seed: int, skip: int = 0, revision: str = "") -> Iterator[str]:
    """Documents of one source after the first `skip`, in a fixed order for the seed.

    Local files keep their order; the hub is streamed through a seeded shuffle buffer, so a
    resume replays (reads, never tokenizes) the documents it skips; `builtin:tiny` cycles.
    """
    if src.path == TINY_NAME:
        docs = [d.strip() for d in (tiny_assets() / "corpus.txt").read_text().split("\n\n") if d.strip()]
        yield from itertools.islice(_cycle_shuffled(docs, seed), skip, None)
        return
    p = Path(src.path).expanduser()
    if p.suffix in LOCAL_SUFFIXES or p.exists():
        if not p.is_file():
            raise DataError(f"corpus source {src.name!r}: file {src.path} does not exist; fix corpus.sources path")
        hub_only = next((k for k in ("revision", "subset") if getattr(src, k)), None)
        if hub_only:
            raise DataError(
                f"corpus source {src.name!r}: {hub_only} {getattr(src, hub_only)!r} applies to hub datasets only; "
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
    if src.path == TINY_NAME or p.suffix == ".parquet" or not p.is_file():
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
    for _, line in utf8_lines(p):
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
    for i, r in json_lines(p):
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
                raise DataError(f"{where}: a turn of {src.text_field!r} is {a_json_type(text)}, not text")
            turns.append(text)
        v = "\n\n".join(turns)
    if not isinstance(v, str):
        raise DataError(f"{where}: {src.text_field!r} is {a_json_type(v)}, not text; give the record text or remove it")
    return v


def corpus_eos(tokenizer) -> int:
    """The document separator: `<|endoftext|>` where the vocabulary has it (Qwen), else EOS."""
    tid = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
        return tid
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to separate packed documents; set model.tokenizer")
    return int(tokenizer.eos_token_id)


# ---------------------------------------------------------------------------------------
# hub revisions: pinned at first use, kept by a resume


def recorded_revisions(segments) -> dict[str, dict]:
    """{source name: {requested, commit}} from the committed segments (the latest wins)."""
    out: dict[str, dict] = {}
    for s in segments:
        out.update((s.meta.get(STATE_KEY) or {}).get("revisions") or {})
    return out


def pin_revisions(sources: list[CorpusSource], segments) -> dict[int, dict]:
    """{source index: {requested, commit}} for every hub source; refuses an explicit change."""
    old = recorded_revisions(segments)
    out = {}
    for i, src in enumerate(sources):
        if not is_hub_path(src.path):
            continue
        name = src.name or src.path
        rec = old.get(name)
        if rec is None:
            out[i] = {"requested": src.revision, "commit": resolve_revision(src.path, src.revision)}
        elif src.revision in ("", rec["requested"], rec["commit"]):
            out[i] = rec
        else:
            raise UserError(
                f"corpus source {name!r} was harvested at revision {rec['requested'] or 'main'!r} "
                f"(commit {rec['commit'][:12]}), not {src.revision!r}; drop the revision to resume "
                "or use another --cache"
            )
    return out


# ---------------------------------------------------------------------------------------
# tokenize, mix, pack


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class SourcesExhausted(DataError):
    """Every corpus source ended before the run's --tokens."""


class TokenizedStream:
    """One source's documents, tokenized ahead in batches on a shared pool, handed out in order."""

    def __init__(self, docs: Iterator[str], tokenize: Callable, pool: ThreadPoolExecutor, depth: int):
        self.docs, self.tokenize, self.pool, self.depth = docs, tokenize, pool, depth
        self.pending: collections.deque = collections.deque()
        self.ready: collections.deque = collections.deque()
        self.exhausted = False

    def _fill(self) -> None:
        while not self.exhausted and len(self.pending) < self.depth:
            batch = list(itertools.islice(self.docs, BATCH_DOCS))
            if not batch:
                self.exhausted = True
                return
            self.pending.append(self.pool.submit(self.tokenize, batch))

    def __next__(self) -> np.ndarray:
        if not self.ready:
            self._fill()
            if not self.pending:
                raise StopIteration
            self.ready.extend(self.pending.popleft().result())
            self._fill()
        return self.ready.popleft()


def batch_tokenizer(tokenizer, eos: int) -> Callable[[list[str]], list[np.ndarray]]:
    """One call per batch of texts, each followed by `eos`; one tokenizer copy per pool thread.

    A fast tokenizer is called through its Rust backend's `encode_batch_fast` (the same ids as
    `tokenizer(list_of_texts)`, without the character offsets nobody here reads: 1.6x faster
    measured, and the GIL is released while it runs). Others go through `tokenizer(texts)`.
    """
    import copy

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if hasattr(backend, "encode_batch_fast") else None
    local = threading.local()

    def tokenize(texts: list[str]) -> list[np.ndarray]:
        tok = getattr(local, "tok", None)
        if spec is not None:
            if tok is None:
                from tokenizers import Tokenizer

                tok = local.tok = Tokenizer.from_str(spec)
            encoded = tok.encode_batch_fast(texts, add_special_tokens=False)
            return [np.array([*e.ids, eos], dtype=np.int32) for e in encoded]
        if tok is None:  # the python tokenizers reconfigure themselves per call: not shareable
            tok = local.tok = copy.deepcopy(tokenizer)
        return [np.array([*ids, eos], dtype=np.int32) for ids in tok(texts, add_special_tokens=False)["input_ids"]]

    return tokenize


class Mixer:
    """Which source the next document comes from; seeded, with a state that resumes exactly.

    `tokens`: a source that has taken more than its share of the tokens so far is not drawn
    until the others catch up, and the eligible ones are drawn by weight, so token shares
    stay within one document of the weights. `documents`: a plain weighted draw per document.
    """

    def __init__(self, weights: list[float], mode: str, seed: int, state: dict | None = None):
        if mode not in MIX_MODES:
            raise DataError(f'corpus.mix {mode!r}: use "tokens" (weights are token shares) or "documents"')
        w = np.array(weights, dtype=float)
        if not len(w) or (w < 0).any() or w.sum() <= 0:
            raise DataError("corpus.sources weights must be non-negative and not all zero")
        self.weights, self.mode = w, mode
        self.rng = np.random.default_rng(seed)
        self.taken = [0] * len(w)
        self.live = [k for k in range(len(w)) if w[k] > 0]
        if state:
            self.rng.bit_generator.state = state["rng"]
            self.taken, self.live = list(state["taken"]), list(state["live"])

    def pick(self) -> int:
        w = self.weights[self.live] / self.weights[self.live].sum()
        if self.mode == "documents":
            return self.live[int(self.rng.choice(len(self.live), p=w))]
        total = sum(self.taken[k] for k in self.live)
        ok = [i for i, k in enumerate(self.live) if self.taken[k] <= w[i] * total]
        p = w[ok] / w[ok].sum()
        return self.live[ok[int(self.rng.choice(len(ok), p=p))]]

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "taken": list(self.taken), "live": list(self.live)}


@dataclass
class PackedSequence:
    seq_index: int
    token_ids: np.ndarray  # int32, seq_len
    docs: list[tuple[str, int]]  # (source name, document index) of every piece in it
    rows: dict[str, int]  # tokens of this sequence by source name


class CorpusPlanner:
    """Packed sequences from the mixture, and after any of them the state to restart there."""

    def __init__(
        self,
        cfg: CorpusConfig,
        tokenizer,
        eos: int,
        state: dict | None = None,
        commits: dict[int, str] | None = None,
        threads: int = 0,
    ):
        if not cfg.sources:
            raise DataError("corpus.sources is empty; add at least one [[corpus.sources]] table")
        st = state or {}
        self.seq_len = cfg.seq_len
        self.names = [s.name or s.path for s in cfg.sources]
        self.mixer = Mixer([s.weight for s in cfg.sources], cfg.mix, cfg.seed, st.get("mixer"))
        self.next_seq = int(st.get("next_seq", 0))
        self.docs = list(st.get("docs", [0] * len(cfg.sources)))  # documents drawn per source
        opened = st.get("open")  # [source, document index, tokens of it already packed] or None
        skips = list(self.docs)
        if opened:
            skips[opened[0]] = opened[1]
        self.pool = ThreadPoolExecutor(threads or default_threads(), thread_name_prefix="harvest-tokenize")
        tokenize = batch_tokenizer(tokenizer, eos)
        depth = 2 * (threads or default_threads())
        commits = commits or {}
        self.streams = [
            TokenizedStream(
                iter_documents(s, cfg.seed + 1 + i, skips[i], commits.get(i, "")), tokenize, self.pool, depth
            )
            for i, s in enumerate(cfg.sources)
        ]
        self.cur: tuple[int, int, np.ndarray] | None = None  # the open document: source, index, ids
        self.off = 0
        if opened:
            k, idx, off = opened
            self.cur, self.off = (k, idx, next(self.streams[k])), off

    def _draw(self) -> None:
        while self.mixer.live:
            k = self.mixer.pick()
            try:
                ids = next(self.streams[k])
            except StopIteration:
                self.mixer.live.remove(k)
                continue
            self.cur, self.off = (k, self.docs[k], ids), 0
            self.docs[k] += 1
            self.mixer.taken[k] += len(ids)
            return
        raise SourcesExhausted(
            f"the corpus sources ran out after {self.next_seq} sequences of {self.seq_len} "
            "tokens; lower --tokens or add sources"
        )

    def next_sequence(self) -> PackedSequence:
        chunks, docs, rows = [], [], collections.Counter()
        need = self.seq_len
        while need:
            if self.cur is None or self.off == len(self.cur[2]):
                self._draw()
            k, idx, ids = self.cur
            take = min(need, len(ids) - self.off)
            chunks.append(ids[self.off : self.off + take])
            docs.append((self.names[k], idx))
            rows[self.names[k]] += take
            self.off += take
            need -= take
        self.next_seq += 1
        return PackedSequence(self.next_seq - 1, np.concatenate(chunks), docs, dict(rows))

    def state(self) -> dict:
        """JSON-able; `CorpusPlanner(..., state=...)` continues with the next sequence."""
        opened = None
        if self.cur is not None and self.off < len(self.cur[2]):
            opened = [self.cur[0], self.cur[1], self.off]
        return {"next_seq": self.next_seq, "mixer": self.mixer.state(), "docs": list(self.docs), "open": opened}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def check_tokens(c: CorpusConfig) -> None:
    """Refuse, before any planning or writing, a `corpus.tokens` the sources cannot give by their
    size (`token_bound`); a mixture with a source of unknown size is not refused."""
    bounds = [(s, token_bound(s)) for s in c.sources if s.weight > 0]
    if not bounds or any(b is None for _, b in bounds):
        return
    most = sum(b for _, b in bounds)
    if c.tokens > most:
        size = sum(Path(s.path).expanduser().stat().st_size for s, _ in bounds)
        raise DataError(
            f"corpus.tokens = {c.tokens:,} is more than the corpus sources can give: "
            f"{', '.join(s.path for s, _ in bounds)} ({size:,} bytes) give at most {most:,} tokens "
            f"({MAX_TOKENS_PER_BYTE} a byte, an upper bound); lower --tokens or add sources"
        )


def pack_corpus(cfg: CorpusConfig, tokenizer, eos: int, state: dict | None = None) -> Iterator[PackedSequence]:
    """Every packed sequence of the mixture in order, until the sources run out."""
    p = CorpusPlanner(cfg, tokenizer, eos, state)
    try:
        while True:
            try:
                yield p.next_sequence()
            except SourcesExhausted:
                return
    finally:
        p.close()


def resume_state(segments, done: set[int]) -> dict | None:
    """The state recorded at the end of the longest run of committed sequences from 0."""
    prefix = 0
    while prefix in done:
        prefix += 1
    best = None
    for s in segments:
        st = s.meta.get(STATE_KEY)
        if st and st["next_seq"] <= prefix and (best is None or st["next_seq"] > best["next_seq"]):
            best = st
    return best


class PlannedUnits:
    """The units a corpus run still needs, planned in a background thread as the run consumes
    them (at most `ahead` units wait). `len()` and `n_tokens` are known without tokenizing."""

    def __init__(self, cfg: PipelineConfig, tokenizer, done: set[int], segments, ahead: int = 2):
        self.cfg, self.tokenizer, self.ahead = cfg, tokenizer, ahead
        c = cfg.corpus
        self.n_seq = -(-c.tokens // c.seq_len)
        self.per = max(1, cfg.harvest.segment_sequences)
        self.done = done
        # Counted from what the cache holds, never by walking range(n_seq): planning time and
        # memory stay flat in --tokens (a list over range(n_seq) was 300 MiB at 1e9 tokens).
        held = collections.Counter(i // self.per for i in done if 0 <= i < self.n_seq)
        full = sum(1 for u, n in held.items() if n == min(self.per, self.n_seq - u * self.per))
        self.n_units = -(-self.n_seq // self.per) - full
        self.n_missing = self.n_seq - sum(held.values())
        self.n_tokens = self.n_missing * c.seq_len
        self.state = resume_state(segments, done) if self.n_missing else None
        self.pins = pin_revisions(c.sources, segments) if self.n_missing else {}
        self.resumed_from = self.state["next_seq"] if self.state else 0
        self.error: DataError | None = None  # set when the sources ran out or held a bad record

    def __len__(self) -> int:
        return self.n_units

    def _generate(self) -> Iterator[Unit]:
        if not self.n_missing:  # a complete cache (or adding a layer to one) reads no source at all
            return
        c = self.cfg.corpus
        left = self.n_missing
        commits = {i: p["commit"] for i, p in self.pins.items()}
        recorded = {c.sources[i].name or c.sources[i].path: p for i, p in self.pins.items()}
        planner = CorpusPlanner(c, self.tokenizer, corpus_eos(self.tokenizer), self.state, commits, c.tokenizer_threads)
        block: list[PackedSequence] = []
        try:
            while planner.next_seq < self.n_seq:
                try:
                    s = planner.next_sequence()
                except DataError as e:  # ran out, or a bad record: the run commits what it has, then says so
                    self.error = e
                    return
                if s.seq_index not in self.done:
                    block.append(s)
                if (s.seq_index + 1) % self.per and s.seq_index + 1 < self.n_seq:
                    continue
                if block:
                    left -= len(block)
                    yield self._unit(block, {**planner.state(), "revisions": recorded})
                block = []
                if not left:  # nothing after this is missing: stop streaming
                    return
        finally:
            planner.close()

    def _unit(self, seqs: list[PackedSequence], state: dict) -> Unit:
        ids = [s.seq_index for s in seqs]
        rows = collections.Counter()
        for s in seqs:
            rows.update(s.rows)
        return Unit(
            key=f"corpus:{ids[0]}-{ids[-1]}",
            source="corpus",
            seq_ids=ids,
            token_ids=[s.token_ids.tolist() for s in seqs],
            records=[{"source": "corpus", "docs": json.dumps(s.docs)} for s in seqs],
            meta={STATE_KEY: state, ROWS_KEY: dict(rows)},
        )

    def __iter__(self) -> Iterator[Unit]:
        """The units, planned on a thread up to `ahead` units ahead of the consumer."""

        def produce(qt: QueueThread) -> None:
            for u in self._generate():
                if not qt.put(u):
                    return

        with QueueThread.producer(produce, self.ahead, "harvest-plan") as qt:
            yield from qt
