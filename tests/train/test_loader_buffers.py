"""The loader's memory: recycled batch arrays come back only once every view of them is gone."""

import gc

import numpy as np
import torch

from train.loader import BatchBuilder, Recycler, window_array


def test_recycler_lends_an_array_again_only_when_its_views_are_gone():
    r = Recycler(keep=2)
    a = r.lend((4, 3), np.uint16)
    assert r.lend((4, 3), np.uint16).base is not a.base  # still viewed: a fresh one
    base = a.base
    del a
    gc.collect()
    assert r.lend((4, 3), np.uint16).base is base


def test_batch_builder_gathers_rows_across_windows():
    buf = window_array((6, 2))
    buf[:] = np.arange(12, dtype=np.uint16).reshape(6, 2)
    b = BatchBuilder(3, 2, [0], torch.device("cpu"), Recycler(keep=4), torch.bfloat16)
    b.add(np.array([10, 11]), {0: buf}, np.array([5, 0]))
    b.add(np.array([12]), {0: buf}, np.array([2]))
    rows, epoch, state, out = b.result(0, {"offset": 1})
    assert rows.tolist() == [10, 11, 12] and epoch == 0 and state == {"offset": 1}
    assert out[0].view(torch.int16).numpy().tolist() == [[10, 11], [0, 1], [4, 5]]
