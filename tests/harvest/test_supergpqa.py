"""SuperGPQA: questions selected by seed and checked against its schema, the record a
sequence carries, the prompt, and answer parsing on written outputs (a random tiny model
never answers, so the table is the test)."""

import json

import pytest

from harvest import supergpqa
from harvest.config import SuperGPQAConfig
from harvest.records import DataError
from harvest.supergpqa import grade, parse_answer


def test_questions_by_seed_extend_and_validate(tmp_path):
    rows = supergpqa.load_questions(SuperGPQAConfig(dataset="builtin:tiny"))
    assert len(rows) >= 24 and all(set(supergpqa.QUESTION_FIELDS) <= set(r) for r in rows)
    few, more = supergpqa.select_questions(rows, 5, 100), supergpqa.select_questions(rows, 10, 100)
    assert more[:5] == few and supergpqa.select_questions(rows, 5, 101) != few
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({**rows[0], "answer_letter": "J"}) + "\n")
    with pytest.raises(DataError, match="not one of its options"):
        supergpqa.load_questions(SuperGPQAConfig(dataset=str(bad)))
    prompt = supergpqa.format_question(rows[0], "answer-line")
    assert "A. " in prompt and "Answer: X" in prompt
    # the default is SuperGPQA's official zero-shot prompt: instruction first, then `A) option` lines
    official = supergpqa.format_question(rows[0])
    assert official.startswith("Answer the following multiple choice question.")
    assert official.endswith("\n".join(f"{'ABCDEFGHIJ'[i]}) {o}" for i, o in enumerate(rows[0]["options"])))
    assert f"\n\n{rows[0]['question']}\nA) " in official
    # every column of the dataset travels into the sequence record
    rec = supergpqa.question_record({**rows[0], "is_calculation": True})
    assert rec["is_calculation"] is True and rec["question"] == rows[0]["question"]
    assert json.loads(rec["options"]) == rows[0]["options"] and rec["gold"] == rows[0]["answer_letter"]


GOOD = {"uuid": "q1", "question": "2 + 2?", "options": ["3", "4", "5"], "answer_letter": "B"}


@pytest.mark.parametrize(
    "record, phrase",
    [
        (5, r"q.jsonl:2: a JSON number where an object was expected"),
        ({**GOOD, "options": None}, r"q.jsonl:2: options is null \(None\); it must be a list of 2..10 answer"),
        ({**GOOD, "options": "ABCD"}, r"q.jsonl:2: options is a string \('ABCD'\)"),
        ({**GOOD, "options": {"A": "3"}}, r"q.jsonl:2: options is an object"),
        ({**GOOD, "options": ["3", None, "5"]}, r"q.jsonl:2: option B is null; options must be strings"),
        ({**GOOD, "options": ["3"]}, r"q.jsonl:2: has 1 options; SuperGPQA questions have 2..10"),
        ({**GOOD, "answer_letter": None}, r"q.jsonl:2: answer_letter None is not one of its options"),
        ({**GOOD, "answer_letter": ""}, r"q.jsonl:2: answer_letter '' is not one of its options"),
        ({**GOOD, "answer_letter": "AB"}, r"q.jsonl:2: answer_letter 'AB' is not one of its options"),
        ({**GOOD, "question": None}, r"q.jsonl:2: question is None; it must be the question's text"),
        ({**GOOD, "uuid": None}, r"q.jsonl:2: uuid is None; every question needs an id"),
        ({k: v for k, v in GOOD.items() if k != "options"}, r"q.jsonl:2: lacks field\(s\) options"),
    ],
)
def test_a_question_a_run_could_not_use_is_one_line_naming_file_and_line(tmp_path, record, phrase):
    (tmp_path / "q.jsonl").write_text(f"{json.dumps(GOOD)}\n{json.dumps(record)}\n")
    with pytest.raises(DataError, match=phrase):
        supergpqa.load_questions(SuperGPQAConfig(dataset=str(tmp_path / "q.jsonl")))


def test_questions_from_parquet_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD, {**GOOD, "answer_letter": "Z"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "q.parquet")
    with pytest.raises(DataError, match=r"q.parquet row 1: answer_letter 'Z'"):
        supergpqa.load_questions(SuperGPQAConfig(dataset=str(tmp_path / "q.parquet")))
    latin = json.dumps({**GOOD, "question": "caf\u00e9?"}, ensure_ascii=False).encode("latin-1")
    (tmp_path / "latin.jsonl").write_bytes(latin)
    with pytest.raises(DataError, match=r"latin.jsonl:1: byte 0xe9 at column \d+ is not UTF-8"):
        supergpqa.load_questions(SuperGPQAConfig(dataset=str(tmp_path / "latin.jsonl")))


# -- grading

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
