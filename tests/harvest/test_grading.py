"""Answer parsing on written outputs: a random tiny model never answers, so the table is the test."""

import pytest

from harvest.grading import grade, parse_answer

CASES = [
    # (response, valid letters, expected)
    ("<think>I think A is wrong.</think>\n\nAnswer: C", "ABCD", "C"),
    ("<think>hmm</think>\nThe answer is \\boxed{B}.", "ABCD", "B"),
    ("<think>x</think>\n\\boxed{\\text{G}}", "ABCDEFGHIJ", "G"),
    ("<think>x</think>\n**Answer: (J)**", "ABCDEFGHIJ", "J"),
    ("<think>x</think>\nAnswer: A\nWait, let me restate. Answer: B", "ABCD", "B"),
    # stray capitals in prose are not answers
    ("<think>hmm</think>\nI believe A friend said so. Answer: D", "ABCD", "D"),
    ("<think>hmm</think>\nI think so, but I am not sure.", "ABCD", None),
    ("<think>x</think>\nI", "ABCD", None),
    ("<think>x</think>\nAnswer: Actually it depends.", "ABCD", None),
    # letters outside this question's options
    ("<think>hmm</think>\nAnswer: E", "ABCD", None),
    ("<think>x</think>\n\\boxed{H}", "ABCDEFG", None),
    ("<think>x</think>\nAnswer: I", "ABCDEFGHI", "I"),
    # what the thinking says does not count; an unclosed thinking has no answer
    ("<think>Answer: A</think>\nI am not sure.", "ABCD", None),
    ("still thinking... Answer: B", "ABCD", None),
    ("", "ABCD", None),
    # weaker patterns after </think>
    ("<think>x</think>\nB", "ABCD", "B"),
    ("<think>x</think>\nA", "ABCD", "A"),
    ("<think>x</think>\nA good guess is option C.", "ABCD", "C"),
    ("<think>x</think>\nI pick (D) here.", "ABCD", "D"),
    # strong beats weak wherever they stand
    ("<think>x</think>\nAnswer: B\nThat is option C in the old numbering.", "ABCD", "B"),
    # boxed letters with their option text, and "the correct option is X" (SuperGPQA's patterns)
    ("<think>x</think>\nSo the result is \\boxed{B. 42 m/s}.", "ABCD", "B"),
    ("<think>x</think>\n\\boxed{E) the second law}", "ABCDEFGH", "E"),
    ("<think>x</think>\n\\boxed{(C)}", "ABCD", "C"),
    ("<think>x</think>\nThe correct option is H.", "ABCDEFGHIJ", "H"),
    ("<think>x</think>\nThe best choice is: (B)", "ABCD", "B"),
    ("<think>x</think>\nThe final answer is: **D**", "ABCD", "D"),
    ("<think>x</think>\nANSWER: $\\boxed{F}$", "ABCDEFGHIJ", "F"),
    ("<think>x</think>\nAnswer: \\text{A}", "ABCD", "A"),
    ("<think>x</think>\n**Answer:** C", "ABCD", "C"),
    ("<think>x</think>\nanswer: b", "ABCD", None),  # a lower-case letter is a word, not an option
    ("<think>x</think>\nThe answer is a bit unclear.", "ABCD", None),
    ("<think>x</think>\nThe correct option is J.", "ABCDEF", None),
    ("<think>I would box \\boxed{A}</think>\nHard to say.", "ABCD", None),
    ("<think>x</think>\nOption B looks right, but the answer is C.", "ABCD", "C"),
    ("<think>x</think>\n\\boxed{B}\n\nAnswer: D", "ABCD", "D"),
    ("<think>x</think>\n(B) is tempting; (D) is right.", "ABCD", "D"),
    ("<think>a</think>b<think>c</think>\nAnswer: A", "ABCD", "A"),  # the last </think> opens the region
    ("<think>x</think>\nAnswer: A1 is the first cell", "ABCD", None),
]


@pytest.mark.parametrize("text, letters, expected", CASES)
def test_parse_answer(text, letters, expected):
    assert parse_answer(text, letters) == expected


def test_thinking_off_reads_the_whole_response():
    assert parse_answer("Answer: C", "ABCD", thinking=False) == "C"


def test_the_table_is_large_enough():
    assert len(CASES) >= 30 and sum(e is None for _, _, e in CASES) >= 10


def test_grade_marks_missing_answers_wrong_and_truncated():
    g = grade("<think>ran out of budget", 4, "A")
    assert (g.parsed, g.correct, g.truncated, g.missing) == (None, False, True, "thinking_unclosed")
    g = grade("<think>done</think>\nI cannot decide.", 4, "A")
    assert (g.parsed, g.correct, g.truncated, g.missing) == (None, False, True, "no_answer")
    g = grade("<think>x</think>\nAnswer: A", 4, "A")
    assert (g.parsed, g.correct, g.truncated, g.missing) == ("A", True, False, "")
    assert not grade("<think>x</think>\nAnswer: B", 4, "A").correct
