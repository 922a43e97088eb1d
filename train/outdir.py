"""A training run's output directory (OUT): everything a run writes there and how it is read back.

- files under OUT are written atomically, and a failed write is one line naming the file; names
  read back from OUT's own files are confined to it (`inside`), since a run directory may come
  from someone else (shared, downloaded);
- `OutLease`: one OUT, one run (an `flock` on `OUT/.lease`, dropped by the kernel when the holder
  dies, so a killed run's lease is stale at once);
- `RunState`: OUT's claim (`run_state.json`), so a run resumes only its own; `--fresh` wipes what
  another run wrote there (the one meaning of "fresh" in train);
- `run.json`, the finished run's record: written and read here, with the SAEs it lists;
- `Checkpoints`: the last K and the best K, as safetensors + JSON (no pickle is ever read);
- `RunFiles`: a run directory read by key, at a local path or any URL the cache accepts, for
  the browser;
- the trajectory figure, one layout for the run's `trajectory.png` and the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError

from cache_format.errors import UserError
from cache_format.provenance import now_iso
from cache_format.stores import key_problem
from cache_format.stores.local import atomic_path, write_atomic

from . import dist
from .config import TrainConfig

# -- files under OUT: atomic writes, names confined to OUT -------------------------------------


def inside(out: str | Path, name, source: str | Path) -> Path:
    """OUT/`name` for a name read from `source` (a file in OUT), if it stays inside OUT: relative,
    normalized, no scheme, and still under OUT with links resolved; else one line, before any use."""
    out = Path(out)
    why = key_problem(name)
    if why is None and not (out / name).resolve().is_relative_to(out.resolve()):
        why = "it leads outside through a link"
    if why is not None:
        raise UserError(
            f"{source} names {name!r}, which is refused ({why}): names in a run directory stay inside "
            "it, so nothing was read or deleted through it; fix or remove that file, or choose another --out"
        )
    return out / name


def write_out(path: str | Path, data: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Publish `data` at `path` (see `cache_format.stores.local.write_atomic`), fsynced; a failed write
    (a full disk: torch reports it as a RuntimeError) removes the temporary and is one line."""
    path = Path(path)
    with _one_line(path):
        write_atomic(path, data, fsync=True)


def write_out_by_name(path: str | Path, fill: Callable[[Path], None]) -> None:
    """`write_out` for a library that writes a file by its name (safetensors): `fill(temporary path)`."""
    path = Path(path)
    with _one_line(path), atomic_path(path) as tmp:
        fill(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _one_line(path: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise UserError(
            f"cannot write {path} ({why}); free some space or choose another --out, then re-run "
            "to resume from the last checkpoint"
        ) from None


# -- the lease: one run per OUT ----------------------------------------------------------------
#
# One OUT, one run: `train run` holds a lease on OUT for as long as it lives.
#
# The lease is an exclusive advisory lock (`flock`) on `OUT/.lease`, a file that also names its
# holder (host, process, start time). The kernel drops the lock when the holding process ends,
# however it ends (`kill -9` included), so a dead run's lease is stale at once and the next run
# simply takes it over; no clock or timeout is involved. A second run on an OUT whose holder is
# alive is refused in one line that names the holder. On NFS, Linux maps `flock` onto the
# server's byte-range locks, so the lease holds across machines sharing OUT too.

LEASE = ".lease"


class OutLease:
    """A held lease on OUT; `release()` (or leaving the `with` block, or dying) gives it up."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / LEASE
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            # never through a link: a planted .lease must not truncate a file elsewhere
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise UserError(f"cannot take the lease {self.path} ({e.strerror or e}); choose another --out") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise UserError(
                f"{self.out} is in use by another `train run` ({holder(self.out)}); wait for it to finish, "
                "or choose another --out"
            ) from None
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": now_iso()}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, body, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Unlock (the file stays: removing a lock file another process has open would split the lease)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(out: str | Path) -> str:
    """Who holds OUT's lease, as the holder wrote it ("process 123 on host h since …")."""
    for _ in range(20):  # the holder writes its name just after it locks: give it a moment
        try:
            who = json.loads((Path(out) / LEASE).read_text())
            return f"process {who['pid']} on host {who['host']} since {who['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "a process that has not written its name"


# -- the claim: which run OUT holds ------------------------------------------------------------

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


# -- run.json ----------------------------------------------------------------------------------

RUN_JSON_VERSION = 1


def write_run_json(out: Path, run: dict) -> None:
    write_out(out / "run.json", json.dumps(dict(run, version=RUN_JSON_VERSION), indent=2, sort_keys=True))


def read_run(run_dir: str | Path, *, need_saes: bool = False) -> tuple[dict, list[dict]]:
    """(run.json, one entry per exported SAE with at least `name` and `dir`); with `need_saes`,
    a run that lists none is one line."""
    run_dir = Path(run_dir)
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        raise UserError(
            f"{run_dir}: no run.json here; run `make train` first or pass --out to a training run directory"
        )
    try:
        run = json.loads(run_json.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{run_json}: not valid JSON ({e}); re-run the export") from None
    items = run.get("saes", run.get("exports")) if isinstance(run, dict) else run
    if isinstance(items, dict):
        items = [dict(v, name=v.get("name", k)) for k, v in items.items()]
    saes = []
    for item in items or []:
        if not isinstance(item, dict):
            continue
        name = item.get("name") or Path(str(item.get("path", ""))).name
        d = inside(run_dir, item.get("path") or item.get("dir") or name, run_json)  # never outside the run
        if not d.exists():
            d = inside(run_dir, name, run_json)
        if d.is_file():
            d = d.parent
        saes.append(dict(item, name=name, dir=d))
    if need_saes and not saes:
        raise UserError(f"{run_dir}/run.json lists no SAEs; re-run `make train`")
    return (run if isinstance(run, dict) else {"saes": run}), saes


def run_saes(run_dir: str | Path) -> list[dict]:
    """The SAE entries of a run's run.json (each with at least `name` and `dir`); none is one line."""
    return read_run(run_dir, need_saes=True)[1]


def trajectory_figure(rows: list[dict], title: str):
    """A run's trajectory against tokens seen: held-out variance explained, dead latents (held out:
    never fired; and over the training window) and L0, each panel where the rows have it. One
    layout for the run's `trajectory.png` and the report (which draws it when there is no PNG);
    None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = next((k for k in ("tokens", "tokens_seen", "step") if rows and k in rows[0]), None)
    panels = [
        ("held-out variance explained", [("variance_explained", "o", None)]),
        (
            "dead latents (fraction)",
            [("dead_fraction", "o", "held-out (never fired)"), ("train_dead_fraction", "x", "training window")],
        ),
        ("held-out L0", [("l0", "o", None)]),
    ]
    panels = [p for p in panels if any(r.get(key) is not None for r in rows for key, _, _ in p[1])]
    if xs is None or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (label, series) in zip(axes[0], panels):
        for key, marker, legend in series:
            pts = [(r[xs], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=legend)
        ax.set(xlabel=xs, ylabel=label)
        ax.grid(alpha=0.3)
        if any(legend for _, _, legend in series):
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_trajectory(sae_dir: Path, rows: list[dict]) -> None:
    """An SAE's `trajectory.jsonl` and, once it has held-out metrics, its `trajectory.png`."""
    sae_dir.mkdir(parents=True, exist_ok=True)
    write_out(sae_dir / "trajectory.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    if rows and "variance_explained" in rows[-1]:
        import matplotlib.pyplot as plt

        fig = trajectory_figure(rows, sae_dir.name)
        with atomic_path(sae_dir / "trajectory.png") as tmp:
            fig.savefig(tmp, dpi=90)
        plt.close(fig)


# -- checkpoints -------------------------------------------------------------------------------
#
# Atomic checkpoints that hold no pickle: the last K plus the best K by held-out variance explained.
#
# A checkpoint is two files in `OUT/checkpoints/`: `tokens_<N>.safetensors` holds every tensor of
# the training state (weights, Adam moments and steps, dead-latent counters), and `tokens_<N>.json`
# the rest (counters, loader positions, history, optimizer settings), each tensor replaced by
# its name in the safetensors file, beside the token count and score that pruning reads. Loading
# either runs no code, whoever wrote the directory; a pickle could, so none is ever read (an
# older run's `tokens_<N>.pt` is refused in one line).
#
# Both are written to a temporary name and renamed into place, tensors first: the JSON is the
# commit, so a crash leaves the old set or a whole new checkpoint, and a safetensors file
# without its JSON is a killed save's leftover.

FORMAT = "actcache-checkpoint"
VERSION = 1
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"  # JSON has no tensors, tuples or int keys


def encode(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """`obj` as JSON, its tensors moved into `tensors` under their path in the state.

    A tensor is stored in its memory order: one laid out transposed (W_enc and its Adam moments
    in runs from before W_enc was stored row-major) is stored as the contiguous permutation of
    itself, `{"__tensor__": [name, dims]}`, and comes back with its own strides, so a resumed
    run steps exactly as an uninterrupted one."""
    if isinstance(obj, torch.Tensor):
        key, n = path.lstrip("/") or "tensor", 1
        while key in tensors:
            key, n = f"{path.lstrip('/')}#{n}", n + 1
        dims = sorted(range(obj.dim()), key=lambda d: -obj.stride(d))
        if obj.is_contiguous() or not obj.permute(dims).is_contiguous():
            tensors[key] = obj
            return {_TENSOR: key}
        tensors[key] = obj.permute(dims)
        return {_TENSOR: [key, dims]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not (
            len(obj) == 1 and next(iter(obj)) in (_TENSOR, _TUPLE, _ITEMS)
        ):
            return {k: encode(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {_ITEMS: [[encode(k, tensors), encode(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state {path or '/'}: a {type(obj).__name__} has no place in a checkpoint")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode`: only dicts, lists, tuples, plain values and the named tensors come out."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            ((tag, v),) = obj.items()
            if tag == _TENSOR and isinstance(v, list):
                name, dims = v
                return tensors[name].permute([dims.index(d) for d in range(len(dims))])
            if tag == _TENSOR:
                return tensors[v]
            if tag == _TUPLE:
                return tuple(decode(x, tensors) for x in v)
            if tag == _ITEMS:
                return {decode(k, tensors): decode(x, tensors) for k, x in v}
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous, and no two sharing memory (safetensors stores each tensor once)."""
    out, seen = {}, set()
    for k, t in tensors.items():
        t = t.detach().contiguous()
        ptr = (t.device, t.untyped_storage().data_ptr()) if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out


class Checkpoints:
    def __init__(self, root: Path, keep_last: int = 2, keep_best: int = 2):
        self.root = Path(root)
        self.keep_last, self.keep_best = max(1, keep_last), max(0, keep_best)

    def _entries(self) -> list[dict]:
        """Committed checkpoints (a JSON whose tensors are there), by token count."""
        out = []
        if not self.root.is_dir():
            return out
        for side in self.root.glob("tokens_*.json"):
            if side.with_suffix(".safetensors").is_file():
                try:
                    info = json.loads(side.read_text())
                    out.append({"path": side, "tokens": int(info["tokens"]), "score": info.get("score")})
                except (OSError, ValueError, KeyError, TypeError, RecursionError):
                    raise UserError(f"{side}: not a readable checkpoint; delete it, or pass --fresh") from None
        return sorted(out, key=lambda e: e["tokens"])

    def latest(self) -> Path | None:
        """The newest checkpoint's JSON; a directory holding only pickled (`.pt`) ones is one line."""
        entries = self._entries()
        if not entries and self.root.is_dir() and any(self.root.glob("tokens_*.pt")):
            raise UserError(
                f"{self.root} holds only pickled checkpoints (tokens_*.pt, from an older version); they are "
                "not loaded, since a pickle can run code: pass --fresh to train from the start"
            )
        return entries[-1]["path"] if entries else None

    def save(self, state: dict, tokens: int, score: float | None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".*.tmp-*"):  # leftovers of a killed save
            stale.unlink(missing_ok=True)
        for orphan in self.root.glob("tokens_*.safetensors"):  # tensors whose JSON never landed
            if not orphan.with_suffix(".json").exists():
                orphan.unlink(missing_ok=True)
        side = self.root / f"tokens_{tokens:015d}.json"
        tensors: dict[str, torch.Tensor] = {}
        body = {"format": FORMAT, "version": VERSION, "tokens": tokens, "score": score, "state": encode(state, tensors)}
        from safetensors.torch import save_file

        write_out_by_name(
            side.with_suffix(".safetensors"), lambda p: save_file(_storable(tensors), str(p), {"format": FORMAT})
        )
        write_out(side, json.dumps(body))
        self.prune()
        return side

    def prune(self) -> None:
        entries = self._entries()
        keep = {e["path"] for e in entries[-self.keep_last :]}
        scored = [e for e in entries if e.get("score") is not None]
        keep |= {e["path"] for e in sorted(scored, key=lambda e: -e["score"])[: self.keep_best]}
        for e in entries:
            if e["path"] not in keep:
                e["path"].unlink(missing_ok=True)  # the commit first: a crash leaves an orphan, not a torso
                e["path"].with_suffix(".safetensors").unlink(missing_ok=True)

    @staticmethod
    def load(path: Path) -> dict:
        """The state saved at `path` (a checkpoint's JSON, or its safetensors beside it); a damaged
        checkpoint is one line."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        side = Path(path).with_suffix(".json")
        try:
            body = json.loads(side.read_text())
            if not isinstance(body, dict) or body.get("format") != FORMAT:
                raise ValueError(f"not an {FORMAT} file")
            if body.get("version") != VERSION:
                raise ValueError(f"version {body.get('version')!r}, this code reads {VERSION}")
            return decode(body["state"], load_file(str(side.with_suffix(".safetensors")), device="cpu"))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, RecursionError, SafetensorError) as e:
            why = " ".join(str(e).split())[:120]
            raise UserError(
                f"{side}: not a readable checkpoint ({type(e).__name__}: {why}); delete it and its "
                ".safetensors to resume from the one before, or pass --fresh"
            ) from None


# -- a run directory read by key (local or remote) ---------------------------------------------


class RunFiles:
    """The files of a run directory at a local path or URL, through the cache's store backends."""

    def __init__(self, url: str):
        from cache_format.stores import Location

        self.url = url
        self.loc = Location(url)

    def read(self, key: str) -> bytes | None:
        try:
            return self.loc.read(key)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def json(self, key: str) -> dict | None:
        raw = self.read(key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"{self.url}/{key}: not valid JSON ({e}); re-run the step that wrote it") from None

    def exists(self, key: str) -> bool:
        if self.loc.fs is None:
            return self.loc.exists(key)
        # ask the filesystem (a HEAD over HTTP): the store's own check GETs the whole object there
        try:
            return bool(self.loc.fs.exists(self.loc.path(key)))
        except OSError as e:
            raise UserError(f"{self.url}: cannot reach {key} ({e}); check that the run is reachable") from None

    def open(self, key: str):
        """A seekable binary file: pyarrow reads a parquet file's footer and row groups from it
        with ranged reads, never the whole object."""
        if self.loc.fs is None:  # a local directory
            return open(self.loc.path(key), "rb")
        return self.loc.fs.open(self.loc.path(key), "rb")


class FeatureRows:
    """The rows of one feature in a parquet file sorted by feature, read from the row groups
    that hold them (a 65k-feature file is never read whole)."""

    def __init__(self, files: RunFiles, key: str):
        import pyarrow.parquet as pq

        self.key = key
        self.file = pq.ParquetFile(files.open(key))
        feats = self.file.read(columns=["feature"]).column("feature").to_numpy()
        if len(feats) and np.any(np.diff(feats) < 0):
            raise UserError(f"{files.url}/{key}: rows are not sorted by feature; re-run `python -m train analyze`")
        # where each feature's rows start (kept instead of the column: 8 bytes a feature, not 4 a row)
        self.starts = np.searchsorted(feats, np.arange(int(feats.max(initial=-1)) + 2))
        md = self.file.metadata
        self.group_starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        self.columns = tuple(self.file.schema_arrow.names)
        self.lock = threading.Lock()

    def range(self, first: int, stop: int, columns: list[str] | None = None):
        """A pyarrow table of the rows of features [first, stop) (of `columns`, those present)."""
        cols = [c for c in columns if c in self.columns] if columns is not None else None
        last = len(self.starts) - 1
        a, b = int(self.starts[min(first, last)]), int(self.starts[min(stop, last)])
        if a == b:
            return self.file.schema_arrow.empty_table().select(cols if cols is not None else list(self.columns))
        g0 = int(np.searchsorted(self.group_starts, a, "right")) - 1
        g1 = int(np.searchsorted(self.group_starts, b, "left"))
        with self.lock:
            t = self.file.read_row_groups(list(range(g0, g1)), columns=cols)
        return t.slice(a - int(self.group_starts[g0]), b - a)


def sae_key(item: dict, name: str) -> str:
    """Where an SAE's directory is, relative to the run: run.json's relative path, else its name."""
    path = str(item.get("path") or item.get("dir") or "")
    p = PurePosixPath(path)
    if path and not p.is_absolute() and ".." not in p.parts:
        return str(p.parent) if p.suffix else str(p)
    return name
