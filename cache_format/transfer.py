"""Copying objects between stores in bounded memory, checked as the bytes pass, resumable.

A large object is read in blocks (`BLOCK`, 16 MiB: also the S3 part size) into two of a few
buffers shared by the process (`BLOCKS`): while one block is received, a helper thread hashes
the one before and appends it to the destination's `Upload` (stores/base.py), so the source
keeps sending while the check runs, and copies hold a fixed amount of memory whatever the
objects' size and the number of threads. The checksum is the
manifest's (BLAKE2b-256 over the whole object, size included); the object is published
only when it matches, else the copy starts over once, re-reading from the store, then fails
in one line naming the object (as integrity.read_checked does for small objects). A copy
killed half way leaves its upload behind, and the next copy continues at the byte where it
stopped; the bytes already there are checksummed too. An object the destination already
holds whole with the same checksum is not copied again.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable

from . import integrity, log
from .stores import Location

BLOCK = 16 << 20
SMALL = 1 << 20  # objects up to this size are read whole (metadata, stats, small row columns)


class _Blocks:
    """Block buffers shared by every copy in the process, allocated once and reused: a copy's
    memory is theirs, whatever the number of threads or the size of the objects (a fresh
    buffer per block would leave one in each thread's malloc arena). A copy takes the blocks it
    needs at once (two for a large object), so copies never wait on each other holding some."""

    def __init__(self, n: int):
        self.cond = threading.Condition()
        self.left = n
        self.free: dict[int, list] = {}

    @contextlib.contextmanager
    def take(self, size: int, count: int = 1):
        with self.cond:
            self.cond.wait_for(lambda: self.left >= count)
            self.left -= count
            free = self.free.setdefault(size, [])
            bufs = [free.pop() if free else bytearray(size) for _ in range(count)]
        try:
            yield [memoryview(b) for b in bufs]
        finally:
            with self.cond:
                self.free[size] += bufs
                self.left += count
                self.cond.notify_all()


BLOCKS = _Blocks(8)  # 128 MiB of blocks: four large objects in flight at most, two blocks each


def copy_object(
    src: Location,
    dst: Location,
    key: str,
    want: dict | None,
    moved: Callable[[int], None],
    block: int = BLOCK,
    present: dict | None = None,
) -> None:
    """Copy one object; `want` is its manifest entry {size, blake2b} (None: unmanifested group
    metadata, a few hundred bytes); `moved(n)` is told of every n bytes that pass. `present`
    ({key: size} listed at the destination, None: not listed) spares asking about objects
    that are not there."""
    if want is None:
        try:
            data = src.read(key)
        except FileNotFoundError:
            return  # a group the writer did not create: readers never need one
        dst.write(key, data)
        moved(len(data))
        return
    size, tag = want["size"], want[log.DIGEST]
    if size <= SMALL:
        data = integrity.read_checked(src, key, want, log.digest)
        dst.write(key, data)
        moved(size)
        return
    if (present is None or present.get(key) == size) and dst.holds(key, size, tag):
        moved(size)
        return
    for _ in range(2):  # a mismatch is copied once more: a torn transfer is not a bad object
        passed = _copy_once(src, dst, key, size, tag, moved, block)
        if passed is None:
            return
        moved(-passed)
    raise integrity.CorruptObject(src.url, key, "size or checksum mismatch")


def _copy_once(src: Location, dst: Location, key: str, size: int, tag: str, moved, block: int) -> int | None:
    """One pass over the object: None when it landed, else the bytes that passed (a mismatch)."""
    if size <= block:  # one block: written whole (an S3 object this size is one PUT)
        with BLOCKS.take(block) as (buf,), src.reader(key, 0, size) as r:
            view = buf[: r.readinto(buf)]
            moved(len(view))
            if len(view) == size and log.digest(view) == tag:
                dst.write(key, view)
                return None
            return len(view)
    with BLOCKS.take(block, 2) as bufs:  # streams open only with blocks to fill
        up = dst.upload(key, tag, size, block)
        h = log.hasher()
        passed = 0

        def read_source(a: int, b: int):  # a resumed S3 upload's parts, re-read to be checksummed
            with src.reader(key, a, b) as r:
                return bufs[0][: r.readinto(bufs[0][: b - a])]

        for piece in up.resumed(read_source):
            h.update(piece)
            passed += len(piece)
            moved(len(piece))
        with src.reader(key, up.offset, size) as r:
            passed += _pipeline(r, bufs, h, up, moved)
    if h.hexdigest() == tag:
        up.commit()
        return None
    up.discard()
    return passed


def _pipeline(r, bufs: list, h, up, moved) -> int:
    """Receive into one block while a helper thread checksums and appends the one before, so
    the stream is read on (the sender keeps sending) while a block is hashed and written.
    Returns the bytes that landed; a failure on either side stops both and is raised."""
    filled: queue.SimpleQueue = queue.SimpleQueue()  # (block, n), in order; None: no more
    free: queue.SimpleQueue = queue.SimpleQueue()
    for b in bufs:
        free.put(b)
    landed, failed = [0], []

    def land() -> None:
        while (item := filled.get()) is not None:
            b, n = item
            if not failed:
                try:
                    h.update(b[:n])
                    up.append(b[:n])
                    landed[0] += n
                    moved(n)
                except BaseException as e:  # noqa: BLE001 - raised in the receiving thread
                    failed.append(e)
            free.put(b)

    t = threading.Thread(target=land, name="actcache-land", daemon=True)
    t.start()
    try:
        while not failed:
            b = free.get()
            n = r.readinto(b)
            if not n:
                break
            filled.put((b, n))
    finally:
        filled.put(None)
        t.join()  # the blocks are free again only when the helper is done with them
    if failed:
        raise failed[0]
    return landed[0]


def present(dst: Location, prefix: str) -> dict | None:
    """{key: size} of the objects under `prefix` at `dst` (one listing), None where it cannot list."""
    if not dst.supports_listing:
        return None
    return {o.key: o.size for o in dst.walk(prefix)}
