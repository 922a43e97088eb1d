"""The prompt a SuperGPQA question is asked with: the user turn and its chat-template prefix.

Shared by the rollouts (what the model is asked) and the tiny model's build (what it is
trained on), so both render a question the same way.
"""

from __future__ import annotations

from .grading import LETTERS

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
