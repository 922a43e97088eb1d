"""The streaming pass on a real cache whose activations are known by construction: deterministic,
truncated by whole chunks, the same on an existing scheduler, one line when none is reachable."""

import numpy as np
import pytest
from analysis_data import FRACTION, LAYER, SEED, identity_sae, make_cache

from train.analysis.scan import RowSelection, scan


@pytest.fixture(scope="module")
def cache_url(tmp_path_factory):
    return make_cache(str(tmp_path_factory.mktemp("c") / "cache"))


def test_scan_is_deterministic_and_truncates(cache_url):
    sae = identity_sae()
    full = scan(cache_url, sae, LAYER, RowSelection(SEED, FRACTION, (2, 3)), progress=False)
    part = scan(cache_url, sae, LAYER, RowSelection(SEED, FRACTION, (2, 3)), max_tokens=50, progress=False)
    n = len(part.rows)  # whole chunks, in cache order, until at least 50 held-out rows
    assert 50 <= n < len(full.rows) and n - 50 < 64
    np.testing.assert_array_equal(part.rows, full.rows[:n])
    np.testing.assert_array_equal(part.idx, full.idx[:n])
    assert part.metrics.n == n
    m = full.metrics.compute()
    assert m["variance_explained"] == pytest.approx(1.0, abs=1e-6)
    # features 1 and 8 + token % 8 fire on every row, feature 0 on correct rows only
    assert m["l0"] == pytest.approx(2.0 + (full.columns["labels"] == 1).mean())


def test_scan_on_an_existing_scheduler_matches_the_local_one(cache_url):
    from dask.distributed import LocalCluster

    sae = identity_sae()
    local = scan(cache_url, sae, LAYER, RowSelection(SEED, FRACTION, (2, 3)), progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        remote = scan(
            cache_url,
            sae,
            LAYER,
            RowSelection(SEED, FRACTION, (2, 3)),
            scheduler=cluster.scheduler_address,
            progress=False,
        )
    np.testing.assert_array_equal(remote.rows, local.rows)
    np.testing.assert_array_equal(remote.vals, local.vals)
    assert remote.metrics.compute() == local.metrics.compute()


def test_unreachable_scheduler_is_one_line(cache_url):
    import dask

    from cache_format.errors import UserError

    with (
        dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
        pytest.raises(UserError, match="cannot reach the dask scheduler"),
    ):
        scan(
            cache_url,
            identity_sae(),
            LAYER,
            RowSelection(SEED, FRACTION, (2, 3)),
            scheduler="tcp://127.0.0.1:9",
            progress=False,
        )
