"""A stand-in `vllm` for tests of harvest/vllm_generate.py: no GPU, no model.

It implements the calls the driver makes (`LLM(**engine_args)`, `SamplingParams`,
`vllm.inputs.TokensPrompt`, and the engine's `add_request` / `has_unfinished_requests` /
`step`), checks what it receives, and "generates" fixed token ids: request i gets
STANDIN_RESPONSE (a JSON list of ids in the environment), finishing one request per step.
Requests whose id is listed in STANDIN_LENGTH hit the length limit instead (finish_reason
"length", max_tokens ids). STANDIN_LOG names a file that records every call as a JSON line;
STANDIN_CRASH_AFTER=n exits the process with status 3 after n finished requests.
"""

import json
import os
from types import SimpleNamespace

__version__ = "0.0-standin"

_ENGINE_KEYS = {
    "model",
    "revision",
    "dtype",
    "seed",
    "tensor_parallel_size",
    "max_model_len",
    "gpu_memory_utilization",
    "max_num_seqs",
    "enforce_eager",
}


def _log(**event):
    path = os.environ.get("STANDIN_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(event) + "\n")


class SamplingParams:
    def __init__(self, temperature=1.0, max_tokens=16, stop_token_ids=None, skip_special_tokens=True):
        assert temperature == 0.0, "rollouts are greedy"
        assert stop_token_ids, "stop ids must reach the engine"
        self.max_tokens, self.stop_token_ids = int(max_tokens), list(stop_token_ids)
        self.skip_special_tokens = skip_special_tokens
        _log(
            call="SamplingParams",
            temperature=temperature,
            max_tokens=max_tokens,
            stop_token_ids=stop_token_ids,
            skip_special_tokens=skip_special_tokens,
        )


class _Engine:
    def __init__(self):
        self.pending = []
        self.finished = 0

    def add_request(self, request_id, prompt, params):
        assert isinstance(request_id, str) and prompt["prompt_token_ids"], "token-id prompts with string ids"
        self.pending.append((request_id, prompt, params))
        _log(call="add_request", id=request_id, prompt_len=len(prompt["prompt_token_ids"]))

    def has_unfinished_requests(self):
        return bool(self.pending)

    def step(self):
        rid, prompt, params = self.pending.pop(0)
        crash = os.environ.get("STANDIN_CRASH_AFTER")
        if crash is not None and self.finished >= int(crash):
            os._exit(3)
        self.finished += 1
        if rid in json.loads(os.environ.get("STANDIN_LENGTH", "[]")):
            ids, reason, stop = [7] * params.max_tokens, "length", None
        else:
            # vLLM leaves the stop token out of token_ids and reports it as stop_reason
            ids, reason, stop = json.loads(os.environ["STANDIN_RESPONSE"]), "stop", params.stop_token_ids[0]
        out = SimpleNamespace(token_ids=ids, finish_reason=reason, stop_reason=stop)
        return [SimpleNamespace(request_id=rid, finished=True, outputs=[out])]


class LLM:
    def __init__(self, **kwargs):
        unknown = set(kwargs) - _ENGINE_KEYS
        assert not unknown, f"unexpected engine arguments {unknown}"
        _log(call="LLM", **kwargs)
        self.llm_engine = _Engine()
