"""Streaming corpus planning: read, tokenize, mix and pack while the forward runs.

Why: tokenizing the whole corpus into lists before the first forward costs ~40 bytes and
5 µs per token (8 GB and a quarter of an hour at the 001 card's 200M tokens), and it was
redone on every resume. Here documents are tokenized in batches by a background pool,
mixed by token share, packed into `seq_len`-token sequences and handed out a unit at a time
through a bounded queue. Each unit carries the planner's state at its end (the mixer's RNG,
every source's document position, the document left open at the boundary); its segment
records it, so a re-run restarts from the last committed unit instead of the beginning.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import data, revisions
from .config import CorpusConfig, PipelineConfig

STATE_KEY = "plan"  # segment meta: the planner state after the unit's last sequence
ROWS_KEY = "rows_by_source"  # segment meta: {source name: rows}, what `cache_format info` sums into shares
BATCH_DOCS = 64  # documents per tokenizer call
MIX_MODES = ("tokens", "documents")


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class SourcesExhausted(data.DataError):
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
            raise data.DataError(f'corpus.mix {mode!r}: use "tokens" (weights are token shares) or "documents"')
        w = np.array(weights, dtype=float)
        if not len(w) or (w < 0).any() or w.sum() <= 0:
            raise data.DataError("corpus.sources weights must be non-negative and not all zero")
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
            raise data.DataError("corpus.sources is empty; add at least one [[corpus.sources]] table")
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
                data.iter_documents(s, cfg.seed + 1 + i, skips[i], commits.get(i, "")), tokenize, self.pool, depth
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
    size (`data.token_bound`); a mixture with a source of unknown size is not refused."""
    bounds = [(s, data.token_bound(s)) for s in c.sources if s.weight > 0]
    if not bounds or any(b is None for _, b in bounds):
        return
    most = sum(b for _, b in bounds)
    if c.tokens > most:
        size = sum(Path(s.path).expanduser().stat().st_size for s, _ in bounds)
        raise data.DataError(
            f"corpus.tokens = {c.tokens:,} is more than the corpus sources can give: "
            f"{', '.join(s.path for s, _ in bounds)} ({size:,} bytes) give at most {most:,} tokens "
            f"({data.MAX_TOKENS_PER_BYTE} a byte, an upper bound); lower --tokens or add sources"
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

    def __init__(self, cfg: PipelineConfig, tokenizer, done: set[int], segments, unit_cls, ahead: int = 2):
        self.cfg, self.tokenizer, self.unit_cls, self.ahead = cfg, tokenizer, unit_cls, ahead
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
        self.pins = revisions.pin(c.sources, segments) if self.n_missing else {}
        self.resumed_from = self.state["next_seq"] if self.state else 0
        self.error: data.DataError | None = None  # set when the sources ran out or held a bad record

    def __len__(self) -> int:
        return self.n_units

    def _generate(self) -> Iterator[Any]:
        if not self.n_missing:  # a complete cache (or adding a layer to one) reads no source at all
            return
        c = self.cfg.corpus
        left = self.n_missing
        commits = {i: p["commit"] for i, p in self.pins.items()}
        recorded = {c.sources[i].name or c.sources[i].path: p for i, p in self.pins.items()}
        planner = CorpusPlanner(
            c, self.tokenizer, data.corpus_eos(self.tokenizer), self.state, commits, c.tokenizer_threads
        )
        block: list[PackedSequence] = []
        try:
            while planner.next_seq < self.n_seq:
                try:
                    s = planner.next_sequence()
                except data.DataError as e:  # ran out, or a bad record: the run commits what it has, then says so
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

    def _unit(self, seqs: list[PackedSequence], state: dict):
        ids = [s.seq_index for s in seqs]
        rows = collections.Counter()
        for s in seqs:
            rows.update(s.rows)
        return self.unit_cls(
            key=f"corpus:{ids[0]}-{ids[-1]}",
            source="corpus",
            seq_ids=ids,
            token_ids=[s.token_ids.tolist() for s in seqs],
            records=[{"source": "corpus", "docs": json.dumps(s.docs)} for s in seqs],
            meta={STATE_KEY: state, ROWS_KEY: dict(rows)},
        )

    def __iter__(self):
        q: queue.Queue = queue.Queue(maxsize=max(1, self.ahead))
        stop = threading.Event()
        end = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    pass
            return False

        def produce():
            try:
                for u in self._generate():
                    if not put(u):
                        return
                put(end)
            except BaseException as e:  # handed to the consumer, which re-raises it
                put(e)

        t = threading.Thread(target=produce, name="harvest-plan", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
