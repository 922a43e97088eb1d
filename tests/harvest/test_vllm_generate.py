"""The vLLM driver's file protocol, against a stand-in `vllm` module (tests/standin)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import harvest

STANDIN = str(Path(__file__).parents[1] / "standin")
DRIVER = str(Path(harvest.__file__).with_name("vllm_generate.py"))


def _log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []


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
