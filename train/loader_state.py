"""The loader's saved position, and the checks that a checkpoint's position belongs to this loader.

A position is (epoch, window, offset) plus the counts of batches and rows handed out, one per
rank: resuming with another number of ranks, another seed or another row selection would read
other rows, so each of those is a one-line error instead.
"""

from __future__ import annotations

from cache_format.errors import UserError

POSITION = ("epoch", "window", "offset", "batches", "rows")


def resume_position(state: dict, *, rank: int, world_size: int, seed: int, n_rows: int) -> dict[str, int]:
    """This rank's position out of one rank's state or {"ranks": [every rank's state]} (what a
    data-parallel checkpoint holds)."""
    if "ranks" in state:
        if len(state["ranks"]) != world_size:
            raise UserError(
                f"the checkpoint was written by {len(state['ranks'])} ranks and this run has "
                f"{world_size}; resume with the same number of processes "
                "or start over with --fresh"
            )
        state = state["ranks"][rank]
    if state.get("world_size", 1) != world_size:
        raise UserError(
            f"the saved loader state belongs to a run of {state.get('world_size', 1)} ranks, not "
            f"{world_size}; resume with the same number of processes or start over with --fresh"
        )
    if state.get("seed", seed) != seed or state.get("n_rows", n_rows) != n_rows:
        raise UserError(
            "the saved loader state belongs to another seed or cache selection; "
            "re-run with the original settings or start over with --fresh"
        )
    return {k: int(state[k]) for k in POSITION}
