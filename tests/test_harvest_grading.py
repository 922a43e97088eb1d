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
]


@pytest.mark.parametrize("text, letters, expected", CASES)
def test_parse_answer(text, letters, expected):
    assert parse_answer(text, letters) == expected


def test_thinking_off_reads_the_whole_response():
    assert parse_answer("Answer: C", "ABCD", thinking=False) == "C"


def test_grade_marks_missing_answers_wrong_and_truncated():
    g = grade("<think>ran out of budget", 4, "A")
    assert (g.parsed, g.correct, g.truncated) == (None, False, True)
    g = grade("<think>x</think>\nAnswer: A", 4, "A")
    assert (g.parsed, g.correct, g.truncated) == ("A", True, False)
    assert not grade("<think>x</think>\nAnswer: B", 4, "A").correct
