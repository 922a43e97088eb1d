"""SuperGPQA, the benchmark the rollouts come from: its questions, the prompt, and grading.

- **Questions** are read from the hub (`m-a-p/SuperGPQA`) or a local file in its schema,
  checked (options A-J, a gold letter among them), and drawn by seed: a seeded
  permutation's first N, so a larger N extends a smaller run.
- **The prompt** is SuperGPQA's official zero-shot prompt (or this project's first format),
  as the user turn of the model's chat template. The tiny model is trained on the same
  rendering (`harvest.tiny`), so both ask a question the same way.
- **Grading** finds the final answer letter close to SuperGPQA's own extraction
  (`extract_option_labels` in its eval), with three deliberate differences, listed in
  docs/harvest.md:

  - only the question's own letters count (a 4-option question never "answers" E);
  - the answer is looked for after `</think>`: the thinking is where a model says "maybe A...";
  - a bare capital in prose ("I think", "A friend") is never an answer.

  Strong patterns (`Answer: X`, `\\boxed{X}`, `\\boxed{X. text}`, `The correct option is X`)
  win over weak ones (`option C`, a line that is just a letter, `(D)`); within a strength the
  last match wins, as models restate their answer at the end.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from .config import TINY_NAME, SuperGPQAConfig, tiny_assets
from .records import DataError, a_json_type, read_records

LETTERS = "ABCDEFGHIJ"
QUESTION_FIELDS = ("uuid", "question", "options", "answer_letter")


# ---------------------------------------------------------------------------------------
# questions


def load_questions(cfg: SuperGPQAConfig, commit: str | None = None) -> list[dict]:
    """All questions, validated against SuperGPQA's schema (options A–J, gold letter); a hub
    dataset is read at `commit` (the cache's pin) when given, else at `cfg.revision`."""
    path = str(tiny_assets() / "questions.jsonl") if cfg.dataset == TINY_NAME else cfg.dataset
    rows = read_records(path, cfg.split, revision=commit or cfg.revision)
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
            f"{where}: options is {a_json_type(opts)} ({opts!r:.40}); it must be a list of 2..10 answer "
            'strings, like ["4", "5", "6"]'
        )
    if not 2 <= len(opts) <= len(LETTERS):
        raise DataError(f"{where}: has {len(opts)} options; SuperGPQA questions have 2..10 (A-J)")
    bad = next((i for i, o in enumerate(opts) if not isinstance(o, str)), None)
    if bad is not None:
        raise DataError(f"{where}: option {LETTERS[bad]} is {a_json_type(opts[bad])}; options must be strings")
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
# the prompt

# SuperGPQA's official zero-shot prompt (its eval's `zero-shot` template): instruction first,
# then the question and `A) option` lines. The letter list is fixed at A-J, as there.
SUPERGPQA_INSTRUCTION = (
    "Answer the following multiple choice question. There is only one correct answer. "
    "The last line of your response should be in the format 'Answer: $LETTER' (without quotes), "
    "where LETTER is one of A, B, C, D, E, F, G, H, I, or J."
)


def format_question(q: dict, prompt_format: str = "supergpqa") -> str:
    """The user turn: `supergpqa` (official zero-shot) or `answer-line` (this project's first format)."""
    if prompt_format == "supergpqa":
        opts = "\n".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(q["options"]))
        return f"{SUPERGPQA_INSTRUCTION}\n\n{q['question']}\n{opts}"
    opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(q["options"]))
    letters = LETTERS[: len(q["options"])]
    return (
        f"{q['question']}\n\n{opts}\n\n"
        f"Answer with the letter of the correct option ({letters[0]}-{letters[-1]}) "
        f"on the last line as 'Answer: X'."
    )


def prompt_ids(tokenizer, q: dict, enable_thinking: bool, prompt_format: str = "supergpqa") -> list[int]:
    """The chat-template generation prefix (`<think>` included when thinking is on)."""
    msgs = [{"role": "user", "content": format_question(q, prompt_format)}]
    text = tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------
# grading

THINK_END = "</think>"

# why no answer was found (Grade.missing)
THINKING_UNCLOSED = "thinking_unclosed"  # `</think>` never came: the budget ran out mid-thought
NO_ANSWER = "no_answer"  # the thinking closed, but no answer letter follows it

_WRAP_OPEN = r"(?:\*\*|\$|\\\(|\\\[|\\(?:text|textbf|mathbf|mathrm)\{)*"  # **X**, $X$, \text{X}
_L = _WRAP_OPEN + r"\s*\(?([A-J])\)?"  # a letter, maybe wrapped or in parentheses
_END = r"(?![A-Za-z0-9])"  # "Answer: Actually" is not A

_STRONG = [
    # "Answer: X", "ANSWER: (C)", "the answer is X", "final answer: **B**"
    re.compile(r"answer\s*(?:is\s*)?[:\-]?\s*(?:\*\*)?\s*" + _L + _END, re.IGNORECASE),
    # "The correct option is H", "the best choice is: (B)"
    re.compile(r"(?:option|choice)\s+is\s*:?\s*" + _L + _END, re.IGNORECASE),
    # \boxed{B}, \boxed{\text{G}}, \boxed{(C)}, \boxed{B. 42 m/s}, \boxed{B) text}
    re.compile(r"\\boxed\{\s*" + _L + r"\s*(?:\}|[.:)]\s*[^{}]*\})"),
]
_WEAK = [
    re.compile(r"(?:option|choice)\s+\(?([A-J])\)?" + _END, re.IGNORECASE),  # "option C"
    re.compile(r"(?:^|\n)[ \t>*#-]*\(?([A-J])\)?\**\s*(?:[.:)]|$|\n)"),  # a line that is / starts with "B." or "(B)"
    re.compile(r"\(([A-J])\)"),  # "(D)" anywhere
]


@dataclass
class Grade:
    parsed: str | None  # the letter found, or None
    correct: bool
    truncated: bool  # no answer found: graded wrong (unless an answer is forced later)
    missing: str = ""  # "", THINKING_UNCLOSED or NO_ANSWER


def answer_region(text: str, thinking: bool = True) -> str:
    """The part of a response where a final answer may stand.

    With thinking on, that is everything after the last `</think>`; a response that never
    closed its thinking has no answer region at all (it ran out of budget mid-thought).
    """
    if THINK_END in text:
        return text.rsplit(THINK_END, 1)[1]
    return "" if thinking else text


def parse_answer(text: str, letters: str, thinking: bool = True) -> str | None:
    """The final letter in `text`, restricted to `letters` (e.g. "ABCD"), or None."""
    region = answer_region(text, thinking)
    if not region.strip():
        return None
    for patterns in (_STRONG, _WEAK):
        found = None
        for pat in patterns:
            for m in pat.finditer(region):
                if m.group(1) in letters and (found is None or m.start() >= found[0]):
                    found = (m.start(), m.group(1))
        if found:
            return found[1]
    return None


def grade(text: str, n_options: int, gold: str, thinking: bool = True) -> Grade:
    parsed = parse_answer(text, LETTERS[:n_options], thinking)
    missing = ""
    if parsed is None:
        missing = THINKING_UNCLOSED if thinking and THINK_END not in text else NO_ANSWER
    return Grade(
        parsed=parsed, correct=parsed is not None and parsed == gold, truncated=parsed is None, missing=missing
    )
