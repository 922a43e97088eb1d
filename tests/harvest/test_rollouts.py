"""The rollouts stage: rows of rollouts match an independent forward and carry their roles and
labels; generation is saved as it finishes, resumed after a crash, never repeated; grading
records why an answer was missing and that it was forced; and the vLLM driver's file protocol,
end to end, against a stand-in `vllm` module (tests/standin)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from capture_reference import assert_matches, tiny_cfg

import cache_format as cf
import harvest
import harvest.run as hr
from harvest import rollouts as ro
from harvest import supergpqa
from harvest.config import SuperGPQAConfig, load_config
from harvest.model import load_model
from harvest.rollouts import VLLMBackend
from harvest.supergpqa import prompt_ids

STANDIN = str(Path(__file__).parents[1] / "standin")
DRIVER = str(Path(harvest.__file__).with_name("vllm_generate.py"))


@pytest.fixture(scope="module")
def lm():
    return load_model(load_config(None, "tiny").model)


def _log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []


def _cfg(tmp_path, url, log, **flags):
    overrides = [
        "supergpqa.questions=5",
        "supergpqa.max_new_tokens=6",
        "harvest.batch_size=4",
        "harvest.chunk_tokens=256",
        "supergpqa.questions_per_unit=2",
        'supergpqa.backend="vllm"',
        f'supergpqa.vllm.python="{sys.executable}"',
        "supergpqa.vllm.tensor_parallel_size=1",
        "supergpqa.vllm.gpu_memory_utilization=0.5",
    ]
    return load_config(None, "tiny", overrides, **{"harvest.cache": str(url), "harvest.layers": [1], **flags})


@pytest.mark.slow
def test_vllm_backend_saves_as_it_streams_and_resumes_after_a_crash(tmp_path, lm, monkeypatch):
    answer = lm.tokenizer("</think>\n\nAnswer: B", add_special_tokens=False)["input_ids"]
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("PYTHONPATH", STANDIN)
    monkeypatch.setenv("STANDIN_LOG", str(log))
    monkeypatch.setenv("STANDIN_RESPONSE", json.dumps(answer))
    monkeypatch.setenv("STANDIN_CRASH_AFTER", "3")
    monkeypatch.setattr(VLLMBackend, "poll_s", 0.05)
    url = tmp_path / "c"
    with pytest.raises(cf.UserError, match=r"failed \(exit 3\) after 3 of 5 rollouts, which are saved"):
        hr.run(_cfg(tmp_path, url, log), progress=False)
    first = [c for c in _log(log) if c["call"] == "add_request"]
    assert len(first) == 5  # one subprocess for every pending prompt
    monkeypatch.delenv("STANDIN_CRASH_AFTER")
    log.unlink()
    summary = hr.run(_cfg(tmp_path, url, log), progress=False)
    calls = _log(log)
    assert len([c for c in calls if c["call"] == "add_request"]) == 2  # the 3 streamed before the crash were kept
    prompts = [
        prompt_ids(lm.tokenizer, q, True, "answer-line")
        for q in supergpqa.select_questions(supergpqa.load_questions(SuperGPQAConfig(dataset="builtin:tiny")), 5, 100)
    ]
    engine = next(c for c in calls if c["call"] == "LLM")
    assert engine["max_model_len"] == max(len(p) for p in prompts[3:]) + 6  # longest pending prompt + budget
    assert engine["gpu_memory_utilization"] == 0.5
    assert summary["outcomes"]["rollouts"] == 5 and summary["outcomes"]["forced"] == 0
    c = cf.open_cache(url)
    seqs = c.sequences().to_pylist()
    assert sorted(s["seq_id"] for s in seqs) == list(range(5))
    assert all(s["parsed"] == "B" and s["backend"] == "vllm" and s["backend_version"] == "0.0-standin" for s in seqs)
    assert all(s["token_ids"][-len(answer) - 1 : -1] == answer and s["finished"] for s in seqs)
    gen = c.segments[0].meta["generation"]
    assert gen["backend"] == "vllm" and json.loads(gen["backend_params"])["gpu_memory_utilization"] == 0.5
    assert len(c.segments) == 3  # 5 questions in units of 2


def test_transformers_generation_is_saved_batch_by_batch(lm):
    qs = supergpqa.select_questions(supergpqa.load_questions(SuperGPQAConfig(dataset="builtin:tiny")), 5, 100)
    cfg = SuperGPQAConfig(dataset="builtin:tiny", max_new_tokens=4, prompt_format="answer-line")
    saved = []
    made = ro.generate_rollouts(
        list(enumerate(qs)),
        ro.TransformersBackend(lm, batch_size=2),
        lm.tokenizer,
        cfg,
        lambda rs: saved.append([r.seq_id for r in rs]),
        progress=False,
    )
    assert saved == [[0, 1], [2, 3], [4]]  # a crash loses at most the batch in flight
    assert all(r.record["backend"] == "transformers" and not r.graded for r in made)
    assert all(
        len(r.response_ids) <= 4 and r.finished == (r.response_ids[-1] in ro.stop_ids(lm.tokenizer)) for r in made
    )


def test_grading_records_why_an_answer_was_missing_and_that_it_was_forced(lm):
    q = supergpqa.load_questions(SuperGPQAConfig(dataset="builtin:tiny"))[0]
    prompt = prompt_ids(lm.tokenizer, q, True)
    for text, missing in [("still thinking about it", "thinking_unclosed"), ("hmm</think>\n\nNo idea.", "no_answer")]:
        r = ro.Rollout(
            0, prompt, lm.tokenizer(text, add_special_tokens=False)["input_ids"], False, supergpqa.question_record(q)
        )
        ro.grade_rollout(r, lm.tokenizer, SuperGPQAConfig(force_answer=True), lambda: lm)
        rec = r.record
        assert rec["missing"] == missing and rec["forced"] and rec["truncated"]
        assert rec["parsed"] in "ABCDEFGHIJ"[: len(q["options"])] and rec["correct"] == (
            rec["parsed"] == q["answer_letter"]
        )
        tail = lm.tokenizer.decode(r.response_ids)
        assert tail.rstrip().endswith(f"Answer: {rec['parsed']}") and tail.count("</think>") == 1
        r2 = ro.Rollout(
            0, prompt, lm.tokenizer(text, add_special_tokens=False)["input_ids"], False, supergpqa.question_record(q)
        )
        ro.grade_rollout(r2, lm.tokenizer, SuperGPQAConfig(force_answer=False))
        assert r2.record["parsed"] is None and not r2.record["forced"] and not r2.record["correct"]


def test_rollout_rows_match_and_carry_roles_and_labels(tmp_path, lm):
    url = tmp_path / "gpqa"
    hr.run(tiny_cfg(url, **{"harvest.layers": [2, 4]}), progress=False)
    c = assert_matches(lm, url, [2, 4])
    seqs = c.sequences().to_pylist()
    assert len(seqs) == 6 and all(s["source"] == "supergpqa" for s in seqs)
    roles, labels, sid = np.asarray(c.roles[:]), np.asarray(c.labels[:]), np.asarray(c.seq_ids[:])
    pos = np.asarray(c.positions[:])
    for s in seqs:
        m = sid == s["seq_id"]
        order = np.argsort(pos[m], kind="stable")  # rows may be written permuted (mix_window)
        r, lab = roles[m][order], labels[m][order]
        assert (r[: s["prompt_len"]] == cf.ROLE_PROMPT).all() and (lab[: s["prompt_len"]] == cf.LABEL_NONE).all()
        resp = r[s["prompt_len"] :]
        assert set(resp.tolist()) <= {cf.ROLE_THINKING, cf.ROLE_ANSWER}
        assert (lab[s["prompt_len"] :] == (cf.LABEL_CORRECT if s["correct"] else cf.LABEL_WRONG)).all()
        assert s["forced"] == s["truncated"]  # the tiny profile forces exactly the rollouts that did not answer
        assert s["parsed"] in "ABCDEFGHIJ"[: s["n_options"]] and s["correct"] == (s["parsed"] == s["gold"])
        assert (resp[-1] == cf.ROLE_ANSWER) and np.all(np.diff(resp) >= 0)  # thinking, then answer
    # adding a layer later reuses the stored rollouts: nothing is generated again
    shutil.rmtree(str(url) + ".rollouts")
    s2 = hr.run(tiny_cfg(url, **{"harvest.layers": [6]}), progress=False)
    assert s2["units"] == 0
    assert_matches(lm, url, [2, 4, 6], seed=2)


def test_generated_rollouts_are_never_generated_again(tmp_path, lm):
    url = tmp_path / "gen"
    flags = {"harvest.layers": [1], "supergpqa.questions": 4}
    hr.run(tiny_cfg(url, **flags), progress=False)
    first = cf.open_cache(url).sequences().to_pylist()
    shutil.rmtree(url)  # as if the process died after generating, before any commit
    # a backend that cannot run: any generation attempt would fail with a UserError
    cfg = tiny_cfg(url, **flags, **{"supergpqa.backend": "vllm", "supergpqa.vllm.python": str(tmp_path / "none")})
    hr.run(cfg, progress=False)
    again = cf.open_cache(url).sequences().to_pylist()
    assert [s["token_ids"] for s in again] == [s["token_ids"] for s in first]
    # changed generation settings do not reuse them
    cfg = tiny_cfg(
        tmp_path / "other",
        **flags,
        **{"supergpqa.backend": "vllm", "supergpqa.max_new_tokens": 5, "supergpqa.vllm.python": str(tmp_path / "none")},
    )
    with pytest.raises(cf.UserError, match="make vllm-env"):
        hr.run(cfg, progress=False)


# -- the vLLM driver (harvest/vllm_generate.py), run as vLLM's interpreter runs it


def test_driver_streams_finished_requests_with_stop_ids_and_flags(tmp_path):
    req, out, log = tmp_path / "req.jsonl", tmp_path / "out.jsonl", tmp_path / "log.jsonl"
    req.write_text("".join(json.dumps({"id": i, "prompt_ids": [1, 2, 3 + i]}) + "\n" for i in range(3)))
    params = {
        "model": "/models/x",
        "revision": "abc",
        "dtype": "bfloat16",
        "max_new_tokens": 5,
        "stop_ids": [9, 10],
        "tensor_parallel_size": 2,
        "max_model_len": 40,
        "gpu_memory_utilization": 0.8,
        "max_num_seqs": 0,
        "enforce_eager": False,
    }
    env = {
        **os.environ,
        "PYTHONPATH": STANDIN,
        "STANDIN_LOG": str(log),
        "STANDIN_RESPONSE": "[4, 5]",
        "STANDIN_LENGTH": '["1"]',
    }
    subprocess.run(
        [sys.executable, DRIVER, "--requests", str(req), "--out", str(out), "--params", json.dumps(params)],
        env=env,
        check=True,
    )
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["vllm_version"] == "0.0-standin" and lines[0]["engine"]["tensor_parallel_size"] == 2
    assert lines[1:] == [
        {"id": 0, "response_ids": [4, 5, 9], "finished": True},  # the stop id is kept
        {"id": 1, "response_ids": [7] * 5, "finished": False},  # cut by max_new_tokens
        {"id": 2, "response_ids": [4, 5, 9], "finished": True},
    ]
    calls = _log(log)
    engine = next(c for c in calls if c["call"] == "LLM")
    assert engine == {
        "call": "LLM",
        "model": "/models/x",
        "revision": "abc",
        "dtype": "bfloat16",
        "seed": 0,
        "tensor_parallel_size": 2,
        "max_model_len": 40,
        "gpu_memory_utilization": 0.8,
    }  # 0/false: vLLM's own
    sp = next(c for c in calls if c["call"] == "SamplingParams")
    assert sp["temperature"] == 0.0 and sp["max_tokens"] == 5 and sp["stop_token_ids"] == [9, 10]
    assert [c["id"] for c in calls if c["call"] == "add_request"] == ["0", "1", "2"]
