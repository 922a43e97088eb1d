"""One way to get a dask client: an existing scheduler by address, else a LocalCluster.

Harvest (one process per GPU), analysis (threads sharing one SAE) and `stats` (threads over
shards) need different local clusters but the same handling of an unreachable scheduler.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .errors import UserError


@contextlib.contextmanager
def dask_client(
    scheduler: str = "",
    *,
    n_workers: int = 1,
    threads_per_worker: int = 1,
    processes: bool = False,
    fix: str = "check the address",
) -> Iterator[Any]:
    """A client on `scheduler` if given (one line if it cannot be reached: `fix` says how),
    else on a LocalCluster of the given shape, closed when the block ends."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout=10)
        except (OSError, TimeoutError) as e:
            raise UserError(f"cannot reach the dask scheduler at {scheduler} ({e}); {fix}") from None
        with client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=n_workers, threads_per_worker=threads_per_worker, processes=processes, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
