"""Files under a run's OUT: written atomically, and a failed write is one line naming the file.

Checkpoints, exports, `run.json`, the run state and trajectories all go through here, so a
full disk mid-run leaves the previous file whole, no temporary behind, and a message that
says how to resume.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from cache_format.atomic import write_atomic
from cache_format.errors import UserError


def write_out(path: str | Path, data: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Publish `data` at `path` (see `cache_format.atomic.write_atomic`), fsynced; a failed write
    (a full disk: torch reports it as a RuntimeError) removes the temporary and is one line."""
    path = Path(path)
    try:
        write_atomic(path, data, fsync=True)
    except (OSError, RuntimeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise UserError(
            f"cannot write {path} ({why}); free some space or choose another --out, then re-run "
            "to resume from the last checkpoint"
        ) from None
