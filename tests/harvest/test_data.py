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
