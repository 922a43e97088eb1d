"""Greedy SuperGPQA rollouts: generate (saving as they finish), grade, force missing answers.

Two backends behind one call, `generate(prompts, max_new_tokens, stop_ids, on_done)`, where
`on_done(i, response_ids, finished)` is called as each prompt finishes: transformers'
`generate` here (CPU, tests, small runs) and vLLM (`vllm_backend.py`), which runs as a
subprocess in its own venv. Prompts are tokenized here, so both backends see identical ids.

Generations are saved as they finish (sidecar files beside the cache, `rollout_store.py`),
so a crash loses at most one generation batch and a re-run continues; grading and forced
answers are saved per work unit once the capture model is loaded. Nothing stored is ever
regenerated.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import SuperGPQAConfig
from .supergpqa import LETTERS, NO_ANSWER, THINK_END, grade, prompt_ids, question_record
from .vllm_backend import OnDone, VLLMBackend

ANSWER_PREFIX = "Answer:"


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


class TransformersBackend:
    """`model.generate`, greedy, batched with left padding; each batch is reported when done."""

    name = "transformers"

    def __init__(self, lm, batch_size: int = 8):
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


def make_backend(cfg: SuperGPQAConfig, lm_factory, model_cfg):
    """The generation backend `supergpqa.backend` names (SuperGPQAConfig has checked the name)."""
    if cfg.backend == "vllm":
        from .model import resolve_path

        path, _ = resolve_path(model_cfg)
        return VLLMBackend(cfg, path, model_cfg.revision, model_cfg.dtype)
    return TransformersBackend(lm_factory(), cfg.generate_batch_size)


def stop_ids(tokenizer) -> list[int]:
    ids = []
    for t in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.append(tid)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


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

    `save` receives each finished group: a transformers batch, or what vLLM streamed back
    since the last poll. A progress bar shows questions done, generated tokens/s and an ETA
    (`bar`: one the caller keeps across several calls).
    """
    prompts = [prompt_ids(tokenizer, q, cfg.enable_thinking, cfg.prompt_format) for _, q in questions]
    made: list[Rollout] = []
    pending: list[Rollout] = []
    own_bar = bar is None
    bar = bar if bar is not None else generation_bar(len(questions), progress)
    stats = {"tokens": 0, "t0": time.perf_counter(), "saved": time.perf_counter()}
    group = getattr(backend, "batch_size", 8)

    def on_done(i: int, resp: list, finished: bool) -> None:
        seq_id, q = questions[i]
        r = Rollout(seq_id, prompts[i], list(resp), bool(finished), {**question_record(q)})
        pending.append(r)
        made.append(r)
        stats["tokens"] += len(resp)
        bar.update(1)
        bar.set_postfix_str(f"{stats['tokens'] / max(1e-6, time.perf_counter() - stats['t0']):.0f} tok/s")
        if len(pending) >= group or time.perf_counter() - stats["saved"] > 2.0:
            flush()

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
