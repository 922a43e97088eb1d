"""Greedy SuperGPQA rollouts: generate, grade, optionally force an answer.

Two backends behind one call, `generate(prompts) -> [(response_ids, finished)]`:
transformers' `generate` (CPU, tests, small runs) and vLLM, which cannot share this
environment (it pins another torch/transformers) and so runs as a subprocess in its own
venv, reads token-id prompts from a file, writes responses to a file and exits before the
capture model is loaded. Prompts are tokenized here, so both backends see identical ids.
Rollouts are stored once (a sidecar file per work unit, then the cache's sequences table)
and never regenerated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cache_format.config import SuperGPQAConfig
from cache_format.errors import UserError

from . import data
from .grading import LETTERS, THINK_END, grade

ANSWER_PREFIX = "Answer:"


@dataclass
class Rollout:
    seq_id: int
    prompt_ids: list[int]
    response_ids: list[int]
    finished: bool  # ended with an end-of-turn token (not cut by max_new_tokens)
    record: dict = field(default_factory=dict)  # question fields + grading

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


class TransformersBackend:
    """`model.generate`, greedy, batched with left padding."""

    name = "transformers"

    def __init__(self, lm, batch_size: int = 8):
        self.lm, self.batch_size = lm, batch_size

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> list[tuple[list[int], bool]]:
        tok, model = self.lm.tokenizer, self.lm.model
        pad = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
        out: list[tuple[list[int], bool]] = []
        for i in range(0, len(prompts), self.batch_size):
            batch = prompts[i: i + self.batch_size]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, p in enumerate(batch):
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            with torch.no_grad():
                gen = model.generate(input_ids=ids.to(self.lm.device), attention_mask=mask.to(self.lm.device),
                                     max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                     pad_token_id=pad, temperature=None, top_p=None, top_k=None)
            for row in gen[:, width:].tolist():
                resp, finished = [], False
                for t in row:
                    if t in stop_ids:
                        resp.append(t)
                        finished = True
                        break
                    resp.append(t)
                out.append((resp, finished))
        return out


class VLLMBackend:
    """vLLM in its own interpreter (`make vllm-env`): prompts in, responses out, via files."""

    name = "vllm"

    def __init__(self, python: str, model_path: str, revision: str, dtype: str, extra: dict | None = None):
        if not Path(python).is_file():
            raise UserError(f"supergpqa.vllm_python {python} does not exist; run `make vllm-env` on the GPU "
                            "machine or set supergpqa.backend = \"transformers\"")
        self.python, self.model_path, self.revision, self.dtype = python, model_path, revision, dtype
        self.extra = extra or {}

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> list[tuple[list[int], bool]]:
        script = Path(__file__).with_name("vllm_generate.py")
        with tempfile.TemporaryDirectory(prefix="harvest-vllm-") as d:
            req, res = Path(d) / "requests.jsonl", Path(d) / "responses.jsonl"
            with open(req, "w") as f:
                for i, p in enumerate(prompts):
                    f.write(json.dumps({"id": i, "prompt_ids": p}) + "\n")
            params = {"model": self.model_path, "revision": self.revision, "dtype": self.dtype,
                      "max_new_tokens": max_new_tokens, "stop_ids": stop_ids, **self.extra}
            cmd = [self.python, str(script), "--requests", str(req), "--out", str(res), "--params", json.dumps(params)]
            proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
            if proc.returncode != 0:
                raise UserError(f"the vLLM generation subprocess failed (exit {proc.returncode}); see its output "
                                f"above, or set supergpqa.backend = \"transformers\"")
            got = {}
            with open(res) as f:
                for line in f:
                    r = json.loads(line)
                    got[r["id"]] = (r["response_ids"], r["finished"])
        return [got[i] for i in range(len(prompts))]


def make_backend(cfg: SuperGPQAConfig, lm_factory, model_cfg) -> object:
    if cfg.backend == "transformers":
        return TransformersBackend(lm_factory(), cfg.generate_batch_size)
    if cfg.backend == "vllm":
        from .model import resolve_path

        path, _ = resolve_path(model_cfg)
        return VLLMBackend(cfg.vllm_python, path, model_cfg.revision, model_cfg.dtype)
    raise UserError(f"supergpqa.backend {cfg.backend!r} is unknown; use transformers or vllm")


def stop_ids(tokenizer) -> list[int]:
    ids = []
    for t in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.append(tid)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def force_answer(lm, rollout: Rollout, n_options: int, thinking: bool) -> tuple[str, list[int]]:
    """Append the answer prefix and take the most likely valid letter (one forward pass).

    Returns the letter and the suffix token ids (closing `</think>` if the thinking never
    closed, then `Answer: X`), which are appended to the response so the captured sequence
    contains the forced answer; the rollout records `forced = True`.
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
        cands.append(ids[len(suffix):] if ids[: len(suffix)] == suffix else list(tok(" " + L, add_special_tokens=False)["input_ids"]))
    with torch.no_grad():
        # score each candidate's first token from one forward
        # logits_to_keep=1: only the last position goes through the LM head (a 16k-token
        # rollout over a 248k vocabulary would otherwise materialize 16 GB of logits)
        logits = lm.model(input_ids=torch.tensor([prefix], device=lm.device), use_cache=False,
                          logits_to_keep=1).logits[0, -1].float()
    logp = torch.log_softmax(logits, -1)
    scores = [logp[c[0]].item() for c in cands]
    best = max(range(len(letters)), key=lambda i: scores[i])
    return letters[best], resp + suffix + cands[best]


def make_rollouts(questions: list[tuple[int, dict]], backend, tokenizer, cfg: SuperGPQAConfig,
                  lm_factory=None) -> list[Rollout]:
    """Generate and grade rollouts for (seq_id, question) pairs."""
    prompts = [data.prompt_ids(tokenizer, q, cfg.enable_thinking) for _, q in questions]
    stops = stop_ids(tokenizer)
    outs = backend.generate(prompts, cfg.max_new_tokens, stops)
    rollouts = []
    for (seq_id, q), p, (resp, finished) in zip(questions, prompts, outs):
        text = tokenizer.decode(resp, skip_special_tokens=False)
        g = grade(text, len(q["options"]), q["answer_letter"], cfg.enable_thinking)
        r = Rollout(seq_id, p, list(resp), finished, {**data.question_record(q)})
        rec = {"parsed": g.parsed, "correct": g.correct, "truncated": g.truncated, "finished": finished,
               "forced": False, "response_text": text}
        if g.parsed is None and cfg.force_answer:
            letter, new_resp = force_answer(lm_factory(), r, len(q["options"]), cfg.enable_thinking)
            r.response_ids = new_resp
            rec.update(parsed=letter, correct=letter == q["answer_letter"], forced=True)
        r.record.update(rec)
        rollouts.append(r)
    return rollouts


# ---------------------------------------------------------------------------------------
# storage: one sidecar file per work unit, so a crash after generation never regenerates


def rollouts_dir(cache_url: str) -> str:
    return cache_url.rstrip("/") + ".rollouts"


def save_rollouts(cache_url: str, key: str, rollouts: list[Rollout]) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(rollouts_dir(cache_url))
    final = f"{root}/{key}.jsonl"
    fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
    body = "".join(json.dumps(asdict(r)) + "\n" for r in rollouts).encode()
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        tmp = f"{final}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, final)
    else:
        fs.pipe_file(final, body)  # object stores publish a PUT atomically


def load_all_rollouts(cache_url: str, tag: str) -> dict[int, Rollout]:
    """Every stored rollout under `tag`, by seq_id, whatever unit first generated it."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(rollouts_dir(cache_url))
    out: dict[int, Rollout] = {}
    if not fs.exists(f"{root}/{tag}"):
        return out
    for path in sorted(fs.glob(f"{root}/{tag}/*.jsonl")):
        for line in fs.cat_file(path).decode().splitlines():
            if line.strip():
                r = Rollout(**json.loads(line))
                out[r.seq_id] = r
    return out


def load_rollouts(cache_url: str, key: str) -> list[Rollout] | None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(rollouts_dir(cache_url))
    path = f"{root}/{key}.jsonl"
    if not fs.exists(path):
        return None
    return [Rollout(**json.loads(line)) for line in fs.cat_file(path).decode().splitlines() if line.strip()]
