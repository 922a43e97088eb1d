"""OUT's claim: which run a directory holds (`run_state.json`), so a run resumes only its own.

A run's identity hashes the settings that change its weights, its layers and the cache data's
fingerprints; OUT is new, a resume, complete, or another run's (refused unless --fresh, which
wipes what the previous run wrote). run.json, the finished run's record, is `rundir`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from cache_format.errors import UserError

from . import dist
from .config import TrainConfig
from .out_files import inside, write_out

# keys that do not change the weights a run produces (so changing them still resumes)
_OPERATIONAL = {
    "out",
    "device",
    "loader_threads",
    "keep_last",
    "keep_best",
    "checkpoint_every_tokens",
    "eval_every_tokens",
    "cache",
    "layers",
    "log",
    "log_dir",
}


def run_identity(tc: TrainConfig, layers: list[int], fingerprints: dict[int, str]) -> str:
    """The run id: equal for runs that produce the same weights."""
    tc = {k: v for k, v in dataclasses.asdict(tc).items() if k not in _OPERATIONAL}
    ident = {"train": tc, "layers": layers, "fingerprints": {str(k): v for k, v in fingerprints.items()}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunState:
    """`run_state.json` in OUT: the run id, whether it completed, its SAEs (what --fresh wipes), the cache."""

    out: Path
    run_id: str
    saes: list[str]
    cache: str

    def claim(self, fresh: bool, rank: int) -> str:
        """'new', 'resume' or 'complete'; refuses an OUT that holds another run unless fresh."""
        state_path = self.out / "run_state.json"
        if state_path.exists():
            prev = _read_state(state_path)
            if fresh:
                if rank == 0:
                    self._wipe(prev)
            elif prev.get("run_id") != self.run_id:
                raise UserError(
                    f"{self.out} holds a different run (other settings, layers or cache data); "
                    "pass --fresh to replace it or choose another --out"
                )
            elif prev.get("complete"):
                return "complete"
            else:
                return "resume"
        elif self.out.exists() and any(self.out.iterdir()) and not fresh:
            if (self.out / "run.json").exists() or (self.out / "checkpoints").exists():
                raise UserError(f"{self.out} holds files of another run; pass --fresh or choose another --out")
        dist.barrier()
        if rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self.write(complete=False)
        dist.barrier()
        return "new"

    def _wipe(self, prev: dict) -> None:
        """What the previous run wrote; every name it lists is checked before anything goes."""
        saes = prev.get("saes", [])
        if not isinstance(saes, list):
            raise UserError(f"{self.out / 'run_state.json'}: `saes` is not a list of names; remove the file by hand")
        doomed = [inside(self.out, name, self.out / "run_state.json") for name in saes]
        for d in [self.out / "checkpoints", self.out / "heldout", *doomed]:
            shutil.rmtree(d, ignore_errors=True)
        for name in ("run.json", "run_state.json"):
            (self.out / name).unlink(missing_ok=True)

    def write(self, complete: bool) -> None:
        write_out(
            self.out / "run_state.json",
            json.dumps(
                {"run_id": self.run_id, "complete": complete, "saes": list(self.saes), "cache": self.cache},
                indent=2,
            ),
        )


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable run state ({e}); remove it by hand, or choose another --out") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a run state (a JSON object); remove it by hand, or choose another --out")
    return state
