"""The rollouts stage: generate → grade → force → store, for the SuperGPQA source.

- **Generate.** Greedy, from chat-template prompts tokenized here, so both backends see
  identical ids. Two backends behind one call, `generate(prompts, max_new_tokens, stop_ids,
  on_done)`, where `on_done(i, response_ids, finished)` is called as each prompt finishes:
  transformers' `generate` (CPU, tests, small runs) and vLLM, which cannot share this
  environment (it pins another torch/transformers): one subprocess in its own venv
  (`vllm_generate.py`) for every pending prompt, streaming each finished request back through
  a file polled here. Generation is claimed per block of questions, so several processes on
  one cache generate each rollout once.
- **Grade.** The final letter against the question's own letters (`harvest.supergpqa`).
- **Force.** A rollout without an answer gets the likeliest valid letter after the answer
  prefix (one forward), recorded as forced.
- **Store.** Sidecar files beside the cache (`<cache>.rollouts/<tag>/...jsonl`), each one
  atomic write through the store interface, keyed by everything that decides a rollout:
  generations are saved as they finish (a crash loses at most one batch), graded ones per
  work unit; a resumed run, another worker or a later layer never regenerates one.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import cache_format as cf
from cache_format.concurrency import POLL_S, Claims
from cache_format.errors import UserError
from cache_format.stores import Location

from .config import PipelineConfig, SuperGPQAConfig
from .model import resolve_path
from .supergpqa import LETTERS, NO_ANSWER, THINK_END, grade, prompt_ids, question_record

ANSWER_PREFIX = "Answer:"
STREAM_SAVE_EVERY, STREAM_SAVE_S = 8, 2.0  # a streaming backend's rollouts are saved in groups this large, or this old
OnDone = Callable[[int, list, bool], None]  # on_done(i, response_ids, finished), as each prompt finishes


@dataclass
class Rollout:
    seq_id: int
    prompt_ids: list[int]
    response_ids: list[int]
    finished: bool  # ended with an end-of-turn token (not cut by max_new_tokens)
    record: dict = field(default_factory=dict)  # question fields, generator, then grading

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def graded(self) -> bool:
        return "correct" in self.record


# ---------------------------------------------------------------------------------------
# generate


def stop_ids(tokenizer) -> list[int]:
    ids = []
    for t in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.append(tid)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


class TransformersBackend:
    """`model.generate`, greedy, batched with left padding; each batch is reported when done."""

    name = "transformers"

    def __init__(self, lm, batch_size: int):
        self.lm, self.batch_size = lm, batch_size

    def info(self) -> dict:
        import transformers

        return {
            "backend": self.name,
            "backend_version": transformers.__version__,
            "backend_params": json.dumps({"batch_size": self.batch_size}),
        }

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], on_done: OnDone) -> None:
        tok, model = self.lm.tokenizer, self.lm.model
        pad = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
        for i in range(0, len(prompts), self.batch_size):
            batch = prompts[i : i + self.batch_size]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, p in enumerate(batch):
                ids[j, width - len(p) :] = torch.tensor(p)
                mask[j, width - len(p) :] = 1
            with torch.no_grad():
                gen = model.generate(
                    input_ids=ids.to(self.lm.device),
                    attention_mask=mask.to(self.lm.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stop_ids,
                    pad_token_id=pad,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
            for j, row in enumerate(gen[:, width:].tolist()):
                resp, finished = [], False
                for t in row:
                    resp.append(t)
                    if t in stop_ids:
                        finished = True
                        break
                on_done(i + j, resp, finished)


class VLLMBackend:
    """vLLM in its own interpreter (`make vllm-env`): one subprocess for every pending prompt,
    streaming each finished request back through a file that is polled here."""

    name = "vllm"
    poll_s = 0.5

    def __init__(self, cfg: SuperGPQAConfig, model_path: str, revision: str, dtype: str):
        v = cfg.vllm
        if not Path(v.python).is_file():
            raise UserError(
                f"supergpqa.vllm.python {v.python} does not exist; run `make vllm-env` on the GPU "
                'machine or set supergpqa.backend = "transformers"'
            )
        self.python = v.python
        self.engine = {
            "model": model_path,
            "revision": revision,
            "dtype": dtype,
            "tensor_parallel_size": v.tensor_parallel_size,
            "gpu_memory_utilization": v.gpu_memory_utilization,
            "max_model_len": v.max_model_len,
            "max_num_seqs": v.max_num_seqs,
            "enforce_eager": v.enforce_eager,
        }
        self.version = ""

    def info(self) -> dict:
        return {"backend": self.name, "backend_version": self.version, "backend_params": json.dumps(self.engine)}

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], on_done: OnDone) -> None:
        script = Path(__file__).with_name("vllm_generate.py")
        if not self.engine["max_model_len"]:  # room for the longest prompt and the whole budget
            self.engine["max_model_len"] = max(len(p) for p in prompts) + max_new_tokens
        with tempfile.TemporaryDirectory(prefix="harvest-vllm-") as d:
            req, res = Path(d) / "requests.jsonl", Path(d) / "responses.jsonl"
            with open(req, "w") as f:
                for i, p in enumerate(prompts):
                    f.write(json.dumps({"id": i, "prompt_ids": p}) + "\n")
            params = {**self.engine, "max_new_tokens": max_new_tokens, "stop_ids": stop_ids}
            cmd = [self.python, str(script), "--requests", str(req), "--out", str(res), "--params", json.dumps(params)]
            proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
            done: set[int] = set()
            offset = 0
            try:
                while True:
                    exited = proc.poll() is not None
                    offset = self._drain(res, offset, done, on_done)
                    if exited:
                        break
                    time.sleep(self.poll_s)
            finally:  # a failed save or Ctrl-C here must not leave vLLM holding the GPU
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if proc.returncode != 0:
            raise UserError(
                f"the vLLM generation subprocess failed (exit {proc.returncode}) after {len(done)} of "
                f"{len(prompts)} rollouts, which are saved; see its output above, then re-run to continue"
            )
        if len(done) != len(prompts):
            raise UserError(f"the vLLM subprocess returned {len(done)} of {len(prompts)} rollouts; re-run to continue")

    def _drain(self, path: Path, offset: int, done: set[int], on_done: OnDone) -> int:
        """Hand over every complete line written since `offset`; returns the new offset."""
        if not path.exists():
            return offset
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].splitlines():
            r = json.loads(line)
            if "vllm_version" in r:
                self.version = r["vllm_version"]
                self.engine.update(r.get("engine", {}))
            elif r["id"] not in done:
                done.add(r["id"])
                on_done(r["id"], r["response_ids"], r["finished"])
        return offset + end


def make_backend(cfg: SuperGPQAConfig, lm_factory, model_cfg):
    """The generation backend `supergpqa.backend` names (SuperGPQAConfig has checked the name)."""
    if cfg.backend == "vllm":
        path, _ = resolve_path(model_cfg)
        return VLLMBackend(cfg, path, model_cfg.revision, model_cfg.dtype)
    return TransformersBackend(lm_factory(), cfg.generate_batch_size)


def generate_rollouts(
    questions: list[tuple[int, dict]],
    backend,
    tokenizer,
    cfg: SuperGPQAConfig,
    save: Callable[[list[Rollout]], None],
    progress: bool = True,
    bar=None,
) -> list[Rollout]:
    """Generate (ungraded) rollouts for (seq_id, question) pairs, saving them as they finish.

    `save` receives each finished group: a batch of a backend that generates in batches
    (transformers), else (vLLM streams) every `STREAM_SAVE_EVERY` rollouts or `STREAM_SAVE_S`
    seconds, whichever comes first. A progress bar shows questions done, generated tokens/s and an ETA
    (`bar`: one the caller keeps across several calls).
    """
    prompts = [prompt_ids(tokenizer, q, cfg.enable_thinking, cfg.prompt_format) for _, q in questions]
    made: list[Rollout] = []
    pending: list[Rollout] = []
    own_bar = bar is None
    bar = bar if bar is not None else generation_bar(len(questions), progress)
    stats = {"tokens": 0, "t0": time.perf_counter(), "saved": time.perf_counter()}
    batch = getattr(backend, "batch_size", None)

    def on_done(i: int, resp: list, finished: bool) -> None:
        seq_id, q = questions[i]
        r = Rollout(seq_id, prompts[i], list(resp), bool(finished), {**question_record(q)})
        pending.append(r)
        made.append(r)
        stats["tokens"] += len(resp)
        bar.update(1)
        bar.set_postfix_str(f"{stats['tokens'] / max(1e-6, time.perf_counter() - stats['t0']):.0f} tok/s")
        group_done = len(pending) >= batch if batch else streamed_enough()  # a whole batch, or enough streamed
        if group_done:
            flush()

    def streamed_enough() -> bool:
        return len(pending) >= STREAM_SAVE_EVERY or time.perf_counter() - stats["saved"] > STREAM_SAVE_S

    def flush() -> None:
        if pending:
            info = backend.info()
            for r in pending:
                r.record.update(info)
            save(list(pending))
            pending.clear()
        stats["saved"] = time.perf_counter()

    try:
        backend.generate(prompts, cfg.max_new_tokens, stop_ids(tokenizer), on_done)
    finally:
        flush()  # whatever finished before a crash is kept
        if own_bar:
            bar.close()
    return made


def generation_bar(total: int, progress: bool = True):
    """The generation progress bar: questions done, generated tokens/s, an ETA."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="q",
        desc="generate",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=1.0,
    )


def rollout_tag(cfg: PipelineConfig) -> str:
    """Sidecar files are keyed by what decides a rollout, so changed settings never reuse them."""
    sel = json.dumps(
        [cfg.source_selection(), cfg.model.name_or_path, cfg.model.revision, cfg.model.dtype], sort_keys=True
    )
    return hashlib.sha256(sel.encode()).hexdigest()[:12]


def generate_missing(
    pairs: list[tuple[int, dict]], cfg: PipelineConfig, cache_url: str, lm_factory, tokenizer, progress: bool = True
) -> int:
    """Generate the rollouts of (seq_id, question) `pairs` that no sidecar holds yet, saving them
    as they finish; returns how many this process generated.

    Questions are generated in fixed blocks of `generate_batch_size` seq_ids, each claimed first
    (cache_format.concurrency): with several processes on one cache every rollout is generated once,
    a block another live process holds is left to it, and every batch is the same whichever
    process runs it (so are its greedy outputs). The transformers backend takes a block at a
    time (so a second process helps); vLLM takes every free block at once (one subprocess)."""
    tag = rollout_tag(cfg)
    stored = load_all_rollouts(cache_url, tag)
    size = max(1, cfg.supergpqa.generate_batch_size)
    blocks: dict[int, list] = {}
    for sid, q in pairs:
        if sid not in stored:
            blocks.setdefault(sid // size, []).append((sid, q))
    if not blocks:
        return 0
    claims = Claims(Location(cache_url), f"rollouts-{tag}")  # in the cache, per tag: one process per block
    every_block = cfg.supergpqa.backend == "vllm"
    backend, made, todo = None, 0, iter(sorted(blocks.items()))
    bar = generation_bar(sum(len(v) for v in blocks.values()), progress)
    try:
        while True:
            group, held = [], []
            for b, pairs in todo:
                c = claims.take(f"block-{b}")
                if c is None:  # another process is generating it
                    bar.total -= len(pairs)
                    continue
                group += pairs
                held.append(c)
                if not every_block:
                    break
            if not group:
                return made
            try:
                stored = load_all_rollouts(cache_url, tag)  # generated since we looked? then not again
                missing = [(sid, q) for sid, q in group if sid not in stored]
                bar.total -= len(group) - len(missing)
                if missing:
                    backend = backend or make_backend(cfg.supergpqa, lm_factory, cfg.model)
                    generate_rollouts(
                        missing,
                        backend,
                        tokenizer,
                        cfg.supergpqa,
                        lambda rs: save_generated(cache_url, tag, rs),
                        bar=bar,
                    )
                    made += len(missing)
            finally:
                for c in held:
                    c.release()
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------
# grade, and force an answer where none was given


def grade_rollout(r: Rollout, tokenizer, cfg: SuperGPQAConfig, lm_factory=None) -> Rollout:
    """Grade in place; with `force_answer`, a rollout without an answer gets the likeliest letter.

    The record says why an answer was missing (`missing`: thinking_unclosed or no_answer)
    and whether the letter was `forced`.
    """
    text = tokenizer.decode(r.response_ids, skip_special_tokens=False)
    n = int(r.record["n_options"])
    g = grade(text, n, r.record["gold"], cfg.enable_thinking)
    rec = {
        "parsed": g.parsed,
        "correct": g.correct,
        "truncated": g.truncated,
        "missing": g.missing,
        "finished": r.finished,
        "forced": False,
        "response_text": text,
    }
    if g.parsed is None and cfg.force_answer:
        letter, r.response_ids = force_answer(lm_factory(), r, n, cfg.enable_thinking)
        rec.update(parsed=letter, correct=letter == r.record["gold"], forced=True)
    r.record.update(rec)
    return r


def force_answer(lm, rollout: Rollout, n_options: int, thinking: bool) -> tuple[str, list[int]]:
    """Append the answer prefix and take the most likely valid letter (one forward pass).

    Returns the letter and the new response ids (closing `</think>` if the thinking never
    closed, then `Answer: X`), so the captured sequence contains the forced answer.
    """
    tok = lm.tokenizer
    text = tok.decode(rollout.response_ids, skip_special_tokens=False)
    stops = set(stop_ids(tok))
    resp = [t for t in rollout.response_ids if t not in stops]
    suffix_text = ("" if (THINK_END in text or not thinking) else f"\n{THINK_END}\n\n") + f"\n{ANSWER_PREFIX}"
    suffix = list(tok(suffix_text, add_special_tokens=False)["input_ids"])
    prefix = rollout.prompt_ids + resp + suffix
    letters = LETTERS[:n_options]
    cands = []
    for L in letters:
        ids = list(tok(suffix_text + " " + L, add_special_tokens=False)["input_ids"])
        if ids[: len(suffix)] == suffix:
            cands.append(ids[len(suffix) :])
        else:
            cands.append(list(tok(" " + L, add_special_tokens=False)["input_ids"]))
    with torch.no_grad():
        # logits_to_keep=1: only the last position goes through the LM head (a 32k-token
        # rollout over a 248k vocabulary would otherwise materialize 32 GB of logits)
        logits = (
            lm.model(input_ids=torch.tensor([prefix], device=lm.device), use_cache=False, logits_to_keep=1)
            .logits[0, -1]
            .float()
        )
    logp = torch.log_softmax(logits, -1)
    scores = [logp[c[0]].item() for c in cands]
    best = max(range(len(letters)), key=lambda i: scores[i])
    return letters[best], resp + suffix + cands[best]


def outcome_counts(records: list[dict]) -> dict[str, int]:
    """How a set of graded rollouts ended: correct, wrong, forced, and why answers were missing."""
    return {
        "rollouts": len(records),
        "correct": sum(bool(r.get("correct")) for r in records),
        "finished": sum(bool(r.get("finished")) for r in records),
        "thinking_unclosed": sum(r.get("missing") == "thinking_unclosed" for r in records),
        "no_answer": sum(r.get("missing") == NO_ANSWER for r in records),
        "forced": sum(bool(r.get("forced")) for r in records),
    }


# ---------------------------------------------------------------------------------------
# store: sidecar files beside the cache


def rollouts_dir(cache_url: str) -> str:
    return cache_url.rstrip("/") + ".rollouts"


def _location(cache_url: str) -> Location:
    return Location(rollouts_dir(cache_url))


def save_rollouts(cache_url: str, key: str, rollouts: list[Rollout]) -> None:
    """Write one sidecar file `key`.jsonl atomically (temp + rename locally; one PUT remotely)."""
    body = "".join(json.dumps(asdict(r)) + "\n" for r in rollouts).encode()
    _location(cache_url).write(f"{key}.jsonl", body)


def save_generated(cache_url: str, tag: str, rollouts: list[Rollout]) -> None:
    """One file per finished group, named uniquely: groups from several workers never collide."""
    first = min(r.seq_id for r in rollouts)
    save_rollouts(cache_url, f"{tag}/generated/{first:08d}-{uuid.uuid4().hex[:8]}", rollouts)


def load_all_rollouts(cache_url: str, tag: str) -> dict[int, Rollout]:
    """Every stored rollout under `tag`, by seq_id: graded ones win over bare generations."""
    loc = _location(cache_url)
    out: dict[int, Rollout] = {}
    if not loc.exists(tag):
        return out
    for key in sorted(o.key for o in loc.walk(tag) if o.key.endswith(".jsonl")):
        for line in loc.read(key).decode().splitlines():
            if line.strip():
                r = Rollout(**json.loads(line))
                if r.graded or r.seq_id not in out:
                    out[r.seq_id] = r
    return out


# ---------------------------------------------------------------------------------------
# a work unit's rollouts, and the roles and labels of their tokens


def unit_rollouts(
    key: str, pairs: list[tuple[int, dict]], cfg: PipelineConfig, cache_url: str, lm_factory, tokenizer
) -> list[Rollout]:
    """The graded rollouts of one work unit's (seq_id, question) `pairs`: stored ones are reused,
    missing ones generated (or waited for, while another process generates them), ungraded ones
    graded (forcing an answer needs the model) and saved under the unit's `key`."""
    tag = rollout_tag(cfg)
    while True:
        generate_missing(pairs, cfg, cache_url, lm_factory, tokenizer, progress=False)
        stored = load_all_rollouts(cache_url, tag)
        if all(s in stored for s, _ in pairs):
            break
        time.sleep(POLL_S)  # another process holds their generation: it saves them, or dies and we take over
    rs = [stored[s] for s, _ in pairs]
    if not all(r.graded for r in rs):
        rs = [r if r.graded else grade_rollout(r, tokenizer, cfg.supergpqa, lm_factory) for r in rs]
        save_rollouts(cache_url, f"{tag}/graded/{key}", rs)
    return rs


def sequence_record(r: Rollout) -> dict:
    """The row a graded rollout adds to the cache's sequences table (token ids aside)."""
    return {
        "source": "supergpqa",
        "prompt_len": len(r.prompt_ids),
        **{k: ("" if v is None else v) for k, v in r.record.items()},
    }


def rows_of(
    tokenizer, token_ids: list[int], prompt_len: int, correct: bool, thinking: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Roles and labels of a rollout's tokens (prompt, then thinking until `</think>`, then answer):
    response tokens carry the rollout's label, prompt tokens none."""
    response = token_ids[prompt_len:]
    n_p, n_r = prompt_len, len(response)
    roles = np.empty(n_p + n_r, np.int8)
    roles[:n_p] = cf.ROLE_PROMPT
    end = tokenizer.convert_tokens_to_ids(THINK_END)
    split = n_r
    if not thinking:
        split = 0
    elif isinstance(end, int) and end >= 0 and end in response:
        split = response.index(end)
    roles[n_p : n_p + split] = cf.ROLE_THINKING
    roles[n_p + split :] = cf.ROLE_ANSWER
    labels = np.full(n_p + n_r, cf.LABEL_NONE, np.int8)
    labels[n_p:] = cf.LABEL_CORRECT if correct else cf.LABEL_WRONG
    return roles, labels
