"""SuperGPQA questions: selection by seed, schema checks, and the record a sequence carries."""

import json

import pytest

from harvest import data, prompts
from harvest.config import SuperGPQAConfig


def test_questions_by_seed_extend_and_validate(tmp_path):
    rows = data.load_questions(SuperGPQAConfig(dataset="builtin:tiny"))
    assert len(rows) >= 24 and all(set(data.QUESTION_FIELDS) <= set(r) for r in rows)
    few, more = data.select_questions(rows, 5, 100), data.select_questions(rows, 10, 100)
    assert more[:5] == few and data.select_questions(rows, 5, 101) != few
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({**rows[0], "answer_letter": "J"}) + "\n")
    with pytest.raises(data.DataError, match="not one of its options"):
        data.load_questions(SuperGPQAConfig(dataset=str(bad)))
    prompt = prompts.format_question(rows[0], "answer-line")
    assert "A. " in prompt and "Answer: X" in prompt
    # the default is SuperGPQA's official zero-shot prompt: instruction first, then `A) option` lines
    official = prompts.format_question(rows[0])
    assert official.startswith("Answer the following multiple choice question.")
    assert official.endswith("\n".join(f"{'ABCDEFGHIJ'[i]}) {o}" for i, o in enumerate(rows[0]["options"])))
    assert f"\n\n{rows[0]['question']}\nA) " in official
    # every column of the dataset travels into the sequence record
    rec = data.question_record({**rows[0], "is_calculation": True})
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
    with pytest.raises(data.DataError, match=phrase):
        data.load_questions(SuperGPQAConfig(dataset=str(tmp_path / "q.jsonl")))


def test_questions_from_parquet_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD, {**GOOD, "answer_letter": "Z"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "q.parquet")
    with pytest.raises(data.DataError, match=r"q.parquet row 1: answer_letter 'Z'"):
        data.load_questions(SuperGPQAConfig(dataset=str(tmp_path / "q.parquet")))
    latin = json.dumps({**GOOD, "question": "caf\u00e9?"}, ensure_ascii=False).encode("latin-1")
    (tmp_path / "latin.jsonl").write_bytes(latin)
    with pytest.raises(data.DataError, match=r"latin.jsonl:1: byte 0xe9 at column \d+ is not UTF-8"):
        data.load_questions(SuperGPQAConfig(dataset=str(tmp_path / "latin.jsonl")))
