"""`publish`: an index.json of every commit record, for readers without listings (HTTP)."""

from __future__ import annotations

from . import commits, provenance
from .stores import Location


def publish(loc: Location) -> int:
    """Write index.json: every commit record inline, for readers without listings (HTTP)."""
    records = commits.load_records(loc, {})
    loc.write(
        commits.INDEX,
        commits.dumps(
            {
                "format": provenance.FORMAT_NAME,
                "version": provenance.FORMAT_VERSION,
                "commits": [{"name": n, "record": r} for n, r in records.items()],
            }
        ),
    )
    return len(records)
