"""A local directory: write-then-rename on real files, the target whole or untouched and no
temporary left (the atomic publication in cache_format/stores/local.py)."""

from __future__ import annotations

import os

import pytest

from cache_format.stores.local import PIECE, atomic_dir, atomic_path, write_atomic


def test_write_atomic_publishes_bytes_text_and_a_writer_function(tmp_path):
    p = tmp_path / "out.bin"
    assert write_atomic(p, b"\x00\x01") == p and p.read_bytes() == b"\x00\x01"
    write_atomic(p, "é\n", fsync=True)
    assert p.read_text(encoding="utf-8") == "é\n"
    write_atomic(str(p), lambda f: f.write(b"from a function"))
    assert p.read_bytes() == b"from a function"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_bytes_larger_than_a_write_piece_are_written_whole(tmp_path):
    p = tmp_path / "big.bin"
    data = os.urandom(PIECE * 5 // 2 + 3)  # pieces of PIECE, PIECE, PIECE // 2 + 3
    write_atomic(p, data)
    assert p.read_bytes() == data
    write_atomic(p, memoryview(bytearray(data))[PIECE - 1 :])  # a view of a buffer, from mid-piece
    assert p.read_bytes() == data[PIECE - 1 :]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "out.json"
    write_atomic(p, b"old")

    def half_then_fail(f):
        f.write(b"new but half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(p, half_then_fail)
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.json"]


def test_atomic_path_renames_on_success_and_removes_on_failure(tmp_path):
    p = tmp_path / "table.parquet"
    with atomic_path(p) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".parquet" and tmp != p
        tmp.write_bytes(b"rows")
        assert not p.exists()
    assert p.read_bytes() == b"rows"
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the library failed")
    assert p.read_bytes() == b"rows" and os.listdir(tmp_path) == ["table.parquet"]


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    d = tmp_path / "export"
    with atomic_dir(d) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "b.txt").write_text("b")
        assert not d.exists()
    assert sorted(os.listdir(d)) == ["a.txt", "b.txt"]
    with pytest.raises(ValueError):
        with atomic_dir(tmp_path / "other") as tmp:
            (tmp / "a.txt").write_text("a")
            raise ValueError("failed half way")
    assert sorted(os.listdir(tmp_path)) == ["export"]
