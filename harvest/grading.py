"""Find the final answer letter in a rollout and grade it.

Only the question's own letters count (a 4-option question never "answers" E), and the
answer is looked for after `</think>`: the thinking is where a model says "maybe A...".
Strong patterns (`Answer: X`, `\\boxed{X}`) win over weak ones (`the answer is X`, a lone
letter on the first line); a capital "A" or "I" in prose is never an answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LETTERS = "ABCDEFGHIJ"
THINK_END = "</think>"

_L = r"\(?\**([A-J])\**\)?"
# Strong: an explicit answer line or a box. The last one wins (models restate at the end).
_STRONG = [
    re.compile(r"answer\s*(?:is|:)\s*[:\-]?\s*\**\s*" + _L + r"(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"\\boxed\{\s*(?:\\text(?:bf)?\{\s*)?\(?([A-J])\)?\s*\}?\s*\}"),
]
# Weak: phrasing that names an option, or a bare letter standing alone.
_WEAK = [
    re.compile(r"(?:option|choice)\s+\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"(?:^|\n)\s*\**\(?([A-J])\)?\**\s*(?:[.:)]|$|\n)"),  # a letter that is the whole line / starts it
    re.compile(r"\(([A-J])\)"),
]


@dataclass
class Grade:
    parsed: str | None  # the letter found, or None
    correct: bool
    truncated: bool  # no answer found: graded wrong
    forced: bool = False


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
                if m.group(1) in letters:
                    if found is None or m.start() >= found[0]:
                        found = (m.start(), m.group(1))
        if found:
            return found[1]
    return None


def grade(text: str, n_options: int, gold: str, thinking: bool = True) -> Grade:
    letters = LETTERS[:n_options]
    parsed = parse_answer(text, letters, thinking)
    return Grade(parsed=parsed, correct=parsed is not None and parsed == gold, truncated=parsed is None)
