"""vLLM generation, which cannot share this environment (it pins another torch/transformers):
one subprocess in its own venv (`vllm_generate.py`) for every pending prompt, streaming each
finished request back through a file that is polled here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cache_format.errors import UserError

from .config import SuperGPQAConfig

OnDone = Callable[[int, list, bool], None]  # on_done(i, response_ids, finished), as each prompt finishes


class VLLMBackend:
    """vLLM in its own interpreter (`make vllm-env`): one subprocess for every pending prompt,
    streaming each finished request back through a file that is polled here."""

    name = "vllm"
    poll_s = 0.5

    def __init__(self, cfg: SuperGPQAConfig, model_path: str, revision: str, dtype: str):
        v = cfg.vllm
        if not Path(v.python).is_file():
            raise UserError(
                f"supergpqa.vllm.python {v.python} does not exist; run `make vllm-env` on the GPU "
                'machine or set supergpqa.backend = "transformers"'
            )
        self.python = v.python
        self.engine = {
            "model": model_path,
            "revision": revision,
            "dtype": dtype,
            "tensor_parallel_size": v.tensor_parallel_size,
            "gpu_memory_utilization": v.gpu_memory_utilization,
            "max_model_len": v.max_model_len,
            "max_num_seqs": v.max_num_seqs,
            "enforce_eager": v.enforce_eager,
        }
        self.version = ""

    def info(self) -> dict:
        return {"backend": self.name, "backend_version": self.version, "backend_params": json.dumps(self.engine)}

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], on_done: OnDone) -> None:
        script = Path(__file__).with_name("vllm_generate.py")
        if not self.engine["max_model_len"]:  # room for the longest prompt and the whole budget
            self.engine["max_model_len"] = max(len(p) for p in prompts) + max_new_tokens
        with tempfile.TemporaryDirectory(prefix="harvest-vllm-") as d:
            req, res = Path(d) / "requests.jsonl", Path(d) / "responses.jsonl"
            with open(req, "w") as f:
                for i, p in enumerate(prompts):
                    f.write(json.dumps({"id": i, "prompt_ids": p}) + "\n")
            params = {**self.engine, "max_new_tokens": max_new_tokens, "stop_ids": stop_ids}
            cmd = [self.python, str(script), "--requests", str(req), "--out", str(res), "--params", json.dumps(params)]
            proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
            done: set[int] = set()
            offset = 0
            try:
                while True:
                    exited = proc.poll() is not None
                    offset = self._drain(res, offset, done, on_done)
                    if exited:
                        break
                    time.sleep(self.poll_s)
            finally:  # a failed save or Ctrl-C here must not leave vLLM holding the GPU
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if proc.returncode != 0:
            raise UserError(
                f"the vLLM generation subprocess failed (exit {proc.returncode}) after {len(done)} of "
                f"{len(prompts)} rollouts, which are saved; see its output above, then re-run to continue"
            )
        if len(done) != len(prompts):
            raise UserError(f"the vLLM subprocess returned {len(done)} of {len(prompts)} rollouts; re-run to continue")

    def _drain(self, path: Path, offset: int, done: set[int], on_done: OnDone) -> int:
        """Hand over every complete line written since `offset`; returns the new offset."""
        if not path.exists():
            return offset
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].splitlines():
            r = json.loads(line)
            if "vllm_version" in r:
                self.version = r["vllm_version"]
                self.engine.update(r.get("engine", {}))
            elif r["id"] not in done:
                done.add(r["id"])
                on_done(r["id"], r["response_ids"], r["finished"])
        return offset + end
