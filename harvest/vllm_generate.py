"""Greedy generation with vLLM, run by `supergpqa.vllm_python` in its own environment.

This file imports nothing from the project (vLLM pins its own torch and transformers), and
is run as a script: `python vllm_generate.py --requests IN.jsonl --out OUT.jsonl --params JSON`.
IN has {"id", "prompt_ids"} lines (already chat-templated and tokenized by harvest), OUT gets
{"id", "response_ids", "finished"} lines. The process exits when done, so its GPU memory is
free before harvest loads the capture model.
"""

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--params", required=True)
    a = ap.parse_args()
    p = json.loads(a.params)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    reqs = [json.loads(line) for line in open(a.requests) if line.strip()]
    llm = LLM(model=p["model"], revision=p.get("revision"), dtype=p.get("dtype", "bfloat16"),
              tensor_parallel_size=int(p.get("tensor_parallel_size", 1)),
              max_model_len=int(p.get("max_model_len", 32768)), seed=0)
    sp = SamplingParams(temperature=0.0, max_tokens=int(p["max_new_tokens"]),
                        stop_token_ids=list(p["stop_ids"]), skip_special_tokens=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in reqs], sp)
    with open(a.out + ".tmp", "w") as f:
        for r, o in zip(reqs, outs):
            c = o.outputs[0]
            ids = list(c.token_ids)
            finished = c.finish_reason == "stop"
            if finished and c.stop_reason in p["stop_ids"] and (not ids or ids[-1] != c.stop_reason):
                ids.append(int(c.stop_reason))  # keep the end-of-turn token, as transformers does
            f.write(json.dumps({"id": r["id"], "response_ids": ids, "finished": finished}) + "\n")
    import os

    os.replace(a.out + ".tmp", a.out)


if __name__ == "__main__":
    main()
