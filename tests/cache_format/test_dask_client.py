"""One way to a dask client: a real LocalCluster of the asked shape, an existing scheduler by address,
and one line for an unreachable one (cache_format/dask_client.py)."""

from __future__ import annotations

import pytest

from cache_format.dask_client import dask_client
from cache_format.errors import UserError


def test_a_local_cluster_of_the_given_shape_runs_tasks_and_closes(tmp_path):
    with dask_client(n_workers=1, threads_per_worker=2) as client:
        assert sum(client.nthreads().values()) == 2
        assert client.submit(lambda x: x + 1, 41).result() == 42
    assert client.status == "closed"


def test_an_existing_scheduler_is_used_by_address():
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with dask_client(cluster.scheduler_address) as client:
            assert client.scheduler.address == cluster.scheduler_address
            assert client.submit(sum, [1, 2, 3]).result() == 6
        assert cluster.status.name == "running"  # closing the client leaves someone else's cluster up


def test_an_unreachable_scheduler_is_one_line_naming_the_fix():
    with pytest.raises(UserError) as e:
        with dask_client("tcp://127.0.0.1:9", fix="start one with `dask scheduler`"):
            pass
    msg = str(e.value)
    assert msg.startswith("cannot reach the dask scheduler at tcp://127.0.0.1:9 (") and "\n" not in msg
    assert msg.endswith("); start one with `dask scheduler`")
