"""Greedy generation with vLLM, run by `supergpqa.vllm.python` in its own environment.

This file imports nothing from the project (vLLM pins its own torch and transformers), and
is run as a script: `python vllm_generate.py --requests IN.jsonl --out OUT.jsonl --params JSON`.
IN has {"id", "prompt_ids"} lines (already chat-templated and tokenized by harvest). OUT
gets a first line {"vllm_version", "engine"}, then one {"id", "response_ids", "finished"}
line per request, written and flushed as each request finishes, so that harvest saves
rollouts while generation goes on and a crash loses only what was still running. All
requests go to one engine in one process, which exits when done, so its GPU memory is free
before harvest loads the capture model.
"""

import argparse
import json

ENGINE_KEYS = ("tensor_parallel_size", "max_model_len", "gpu_memory_utilization", "max_num_seqs", "enforce_eager")


def engine_args(p: dict) -> dict:
    """`vllm.LLM` keyword arguments from the params; 0 / false leaves vLLM's own default."""
    args = {"model": p["model"], "revision": p.get("revision") or None, "dtype": p.get("dtype", "bfloat16"), "seed": 0}
    for key in ENGINE_KEYS:
        if p.get(key):
            args[key] = p[key]
    return args


def response(output, stop_ids) -> dict:
    """One finished request: its token ids (the end-of-turn token kept, as transformers keeps it)."""
    c = output.outputs[0]
    ids = [int(t) for t in c.token_ids]
    finished = c.finish_reason == "stop"
    if finished and c.stop_reason in stop_ids and (not ids or ids[-1] != c.stop_reason):
        ids.append(int(c.stop_reason))
    return {"id": int(output.request_id), "response_ids": ids, "finished": finished}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--params", required=True)
    a = ap.parse_args()
    p = json.loads(a.params)

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    reqs = [json.loads(line) for line in open(a.requests) if line.strip()]
    args = engine_args(p)
    llm = LLM(**args)
    sp = SamplingParams(
        temperature=0.0,
        max_tokens=int(p["max_new_tokens"]),
        stop_token_ids=list(p["stop_ids"]),
        skip_special_tokens=False,
    )
    engine = llm.llm_engine
    for r in reqs:
        engine.add_request(str(r["id"]), TokensPrompt(prompt_token_ids=r["prompt_ids"]), sp)
    with open(a.out, "a") as f:
        f.write(json.dumps({"vllm_version": vllm.__version__, "engine": args}) + "\n")
        f.flush()
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    f.write(json.dumps(response(out, p["stop_ids"])) + "\n")
                    f.flush()


if __name__ == "__main__":
    main()
