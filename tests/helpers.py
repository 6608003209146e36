"""Shared test helpers: streams that record or break, page data, and running both ends."""

from __future__ import annotations

import mmap
import os
import random
import subprocess
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

import trio_multifd as m

PAGE = 4096


def random_pages(pages: int, *, zero_every: int = 0, seed: int = 0) -> bytearray:
    """Random bytes; with ``zero_every`` > 0, every that-many-th page is all zero."""
    data = bytearray(random.Random(seed).randbytes(pages * PAGE))
    if zero_every:
        for page in range(0, pages, zero_every):
            data[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)
    return data


def pattern(size: int) -> bytearray:
    """A non-zero fill for targets, so zero pages and untouched pages both show."""
    return bytearray(b"\xa5" * size)


system_4k_pages = pytest.mark.skipif(
    mmap.PAGESIZE != 4096, reason="its offsets assume 4 KiB system pages"
)
"""For tests that cut a mapped file at 4 KiB boundaries: with larger system pages the
bytes past the end of the file's last system page are readable, not a fault."""


def mapped_file(path: Path, data: bytes | bytearray) -> mmap.mmap:
    """A read-only shared mapping of a new file at ``path`` holding ``data``: cut the
    file short (``os.truncate``) to take pages away from under it."""
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, len(data), prot=mmap.PROT_READ)
    finally:
        os.close(fd)


@contextmanager
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB file system (mounting one needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(small)], check=True)
    try:
        yield small
    finally:
        subprocess.run(["umount", str(small)], check=True)


class TrackedStream(trio.abc.HalfCloseableStream):
    """Wraps a stream, records whether it was closed, and can break after N bytes."""

    def __init__(self, inner: trio.abc.Stream, *, break_after: int | None = None) -> None:
        self.inner = inner
        self.closed = False
        self.sent = 0
        self.break_after = break_after

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.break_after is not None and self.sent + len(data) > self.break_after:
            keep = self.break_after - self.sent
            if keep > 0:
                await self.inner.send_all(memoryview(data)[:keep])
            self.sent = self.break_after
            await trio.aclose_forcefully(self.inner)
            raise trio.BrokenResourceError("injected fault")
        self.sent += len(data)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        assert isinstance(self.inner, trio.abc.HalfCloseableStream)
        await self.inner.send_eof()

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()


async def close_all(*resources: trio.SocketStream | trio.SocketListener) -> None:
    """Close every socket, for a helper's exit even from a test that was cancelled (timed
    out). There ``aclose()``, even ``trio.aclose_forcefully``'s, closes its socket and
    then raises Cancelled, and every socket after it would stay open (ResourceWarnings in
    some later test). Shielded, as a socket's ``aclose()`` cannot block; not forcefully,
    whose Cancelled, swallowed, would keep the test's exception in a reference cycle (its
    ``__context__``): tests/test_memory_after_failure.py checks that none is left."""
    with trio.CancelScope(shield=True):
        for resource in resources:
            await resource.aclose()


def memory_channels(
    count: int, *, wrap: Callable[[int, trio.abc.Stream], trio.abc.Stream] | None = None
) -> tuple[Callable[[int], Awaitable[trio.abc.Stream]], list[trio.abc.Stream]]:
    """``count`` in-memory stream pairs: a sender ``connect`` and the receiver's ends."""
    pairs = [trio.testing.memory_stream_pair() for _ in range(count)]
    sender_ends: list[trio.abc.Stream] = [
        wrap(i, a) if wrap else a for i, (a, _) in enumerate(pairs)
    ]

    async def connect(channel: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        return sender_ends[channel]

    return connect, [b for _, b in pairs]


def shuffled(offsets: list[int], seed: int) -> list[int]:
    out = list(offsets)
    random.Random(seed).shuffle(out)
    return out


def block_pair(name: str, pages: int, seed: int = 0) -> tuple[m.RAMBlock, m.RAMBlock]:
    src = random_pages(pages, zero_every=7, seed=seed)
    dst = pattern(pages * PAGE)
    return m.RAMBlock(name, src), m.RAMBlock(name, dst)


def urandom_page() -> bytes:
    return os.urandom(PAGE)


async def run_both_ends(
    send: Callable[[], Awaitable[None]], receive: Callable[[], Awaitable[None]]
) -> tuple[m.MultiFDError | None, m.MultiFDError | None]:
    """Run ``receive`` in the background and ``send`` beside it; return the
    :class:`MultiFDError` each raised (sender's first; ``None``: it returned). Any other
    exception fails the test."""
    errors: dict[str, m.MultiFDError] = {}

    async def end(name: str, run: Callable[[], Awaitable[None]]) -> None:
        try:
            await run()
        except m.MultiFDError as exc:
            errors[name] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(end, "receiver", receive)
        await end("sender", send)
    return errors.get("sender"), errors.get("receiver")


def page_states(
    source: bytes | bytearray | memoryview, target: bytes | bytearray | memoryview
) -> list[str]:
    """What each page of a target pre-filled with :func:`pattern` holds: ``"fill"``
    (untouched), ``"source"`` (the source's page), ``"partly"`` (a prefix of the
    source's page, then the fill: a payload cut inside that page) or ``"damaged"``
    (anything else)."""
    fill = bytes(pattern(PAGE))
    states = []
    for start in range(0, len(target), PAGE):
        got, want = bytes(target[start : start + PAGE]), bytes(source[start : start + PAGE])
        if got == fill:
            states.append("fill")
        elif got == want:
            states.append("source")
        else:
            cut = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
            states.append("partly" if got[cut:] == fill[cut:] else "damaged")
    return states


def landed(
    source: bytes | bytearray | memoryview, pages: Iterable[int], *, page_size: int = PAGE
) -> bytearray:
    """What a target pre-filled with :func:`pattern` holds once exactly ``pages`` (page
    numbers) of ``source`` have landed in it."""
    target = pattern(len(source))
    for page in pages:
        start = page * page_size
        target[start : start + page_size] = source[start : start + page_size]
    return target
