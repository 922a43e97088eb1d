"""Find the final answer letter in a rollout and grade it.

Close to SuperGPQA's own extraction (`extract_option_labels` in its eval), with three
deliberate differences, listed in docs/harvest.md:

- only the question's own letters count (a 4-option question never "answers" E);
- the answer is looked for after `</think>`: the thinking is where a model says "maybe A...";
- a bare capital in prose ("I think", "A friend") is never an answer.

Strong patterns (`Answer: X`, `\\boxed{X}`, `\\boxed{X. text}`, `The correct option is X`)
win over weak ones (`option C`, a line that is just a letter, `(D)`); within a strength the
last match wins, as models restate their answer at the end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LETTERS = "ABCDEFGHIJ"
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
