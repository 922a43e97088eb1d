"""Files under a run's OUT: written atomically, and a failed write is one line naming the file;
names read back from OUT's own files are confined to it.

Checkpoints, exports, `run.json`, the run state and trajectories all go through here, so a
full disk mid-run leaves the previous file whole, no temporary behind, and a message that
says how to resume. A run directory may come from someone else (shared, downloaded), so a
name that `run_state.json` or `run.json` lists is used only through `inside`, which holds it
to the rule a cache's keys obey, and to OUT once links are resolved, before anything is read
or deleted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from safetensors import SafetensorError

from cache_format.errors import UserError
from cache_format.stores import key_problem
from cache_format.stores.local import atomic_path, write_atomic


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
    """Publish `data` at `path` (see `cache_format.atomic.write_atomic`), fsynced; a failed write
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
