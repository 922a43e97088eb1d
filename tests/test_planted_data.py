"""The planted-feature cache helper (tests/planted_data.py) that the train tests rely on."""

import numpy as np
import pytest
from planted_data import planted_residuals, write_planted


@pytest.fixture
def planted(tmp_path):
    url = str(tmp_path / "planted")
    dicts, res = write_planted(url)
    return url, dicts, res


def test_planted_cache_reads_back_and_frequencies_are_zipf(planted):
    import cache_format as cf

    url, dicts, res = planted
    c = cf.open_cache(url)
    assert c.n_tokens == 16384 and c.layers == [2] and c.d_model == 32
    got = c.read_chunk(2, 3)
    b = c.chunk_bounds()
    assert np.array_equal(got.view(np.uint16), res[2][b[3] : b[4]].view(np.uint16))
    _, _, idx = planted_residuals(16384, 32, 96, 3, 0)
    counts = np.bincount(idx.ravel(), minlength=96)
    assert counts[:5].mean() > 4 * counts[-5:].mean() > 0  # heavy head, but every feature occurs
