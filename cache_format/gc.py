"""`gc`: delete what no commit references (crashed writers' leftovers), never a leased unit."""

from __future__ import annotations

import re
import time

from . import commits, layout, leases
from .errors import UserError
from .stores import Location


def parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise UserError(f"--older-than {text!r}: use a duration like 24h, 90m, 2d or 3600s")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


MIN_GRACE_S = 3600  # below this, gc needs force=True (--force)


def gc(
    loc: Location, older_than_s: float = 86400, retracted: bool = False, dry_run: bool = False, force: bool = False
) -> list[str]:
    """Delete objects no commit references (crashed writers' leftovers) older than the grace period.

    The unit is a segment directory (or a backfill directory): it is removed only when its
    newest object is older than the grace period and it holds no fresh writer lease
    (leases.py), so a live writer's work is never touched, whatever the grace period.
    With `retracted`, retracted segments' data goes too (their tombstones stay).
    """
    if older_than_s < MIN_GRACE_S and not force:
        raise UserError(
            f"gc --older-than {older_than_s:g}s is under an hour: a slow writer's uncommitted work "
            "could go (leased segments are always kept); add --force if you mean it"
        )
    # List the objects first, then read the log: a writer that commits (and drops its lease)
    # between the two is then seen as committed, never as an unleased leftover.
    now = time.time()
    units: dict[str, list] = {}
    for o in loc.walk(layout.SEGMENTS):
        unit = layout.unit_of(o.key)
        if unit is None:
            continue  # segments/zarr.json
        units.setdefault(unit, []).append(o)
    root = commits.read_root(loc)
    records = commits.load_records(loc, {})
    state = commits.replay(root, records)
    keep_units, dead_units = set(), set()
    for r in records.values():
        if r.get("kind") == "segment":
            keep_units.add(layout.segment_dir(r["segment"]))
        elif r.get("kind") == "layer":
            keep_units.add(r["entry"]["array"].split("/")[0] + "/" + "/".join(r["entry"]["array"].split("/")[1:3]))
    if retracted:
        for s in state.retracted:
            dead_units.add(layout.segment_dir(s.id))
    doomed = []
    for unit, objs in units.items():
        seg_unit = layout.segment_of_unit(unit)
        if seg_unit in dead_units:
            doomed += [o.key for o in objs]
        elif unit in keep_units or any(o.key.endswith(f"/{leases.LEASE}") and leases.fresh(o.mtime, now) for o in objs):
            continue  # committed, or a live writer's (its lease is fresh)
        elif now - max(o.mtime for o in objs) >= older_than_s:
            doomed += [o.key for o in objs]
    for o in loc.walk(commits.COMMITS):
        if o.key.split("/")[-1].startswith(".tmp-") and now - o.mtime >= older_than_s:
            doomed.append(o.key)
    if not dry_run and doomed:
        loc.delete(doomed)
        loc.remove_empty_dirs(layout.SEGMENTS)
    return doomed
