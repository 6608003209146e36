"""Fuzzing the receiver with damaged streams of our own sender.

A small real transfer (two rounds, zero pages, ``none`` and ``zstd``) is recorded once;
hypothesis flips bits, truncates, deletes, overwrites and splices it (mostly around
packet headers, where the checks are) and feeds the result in chunks of varied size into
a receiver whose block is a window into a larger buffer. For every example: only a
:class:`MultiFDError` escapes, it ends within a bound, the guard bytes around the block
are untouched, and every page that changed is one named by a header that the codec
accepted (a superset of what the receiver wrote, computed from the damaged stream).
"""

from __future__ import annotations

import uuid

import pytest
import trio
from hypothesis import event, given, settings, strategies as st

import trio_multifd as m

from .helpers import PAGE, pattern, random_pages
from .proxy import FILL, HEADER

PAGES = 24
GUARD = 3 * PAGE
GUARD_BYTE = 0x5A


class RecordingStream(trio.abc.HalfCloseableStream):
    """A sender's channel that keeps every byte and confirms the transfer at once."""

    def __init__(self) -> None:
        self.data = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.data += data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return b""  # the receiver's clean close

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


VERSIONS: dict[int, set[bytes]] = {}
"""Every content each page of the recordings had when queued (the same source for all)."""

KINDS = {
    "none": ("none", False),
    "zstd": ("zstd", False),
    "none+integrity": ("none", True),
    "zstd+integrity": ("zstd", True),
}


def record(kind: str) -> bytes:
    """The one channel of a small real transfer: two rounds, zero pages, repeats."""
    compression, integrity = KINDS[kind]
    source = random_pages(PAGES, zero_every=5, seed=11)
    for page in range(PAGES):
        VERSIONS.setdefault(page, set()).add(bytes(source[page * PAGE : (page + 1) * PAGE]))
    block = m.RAMBlock("mem", source)
    stream = RecordingStream()

    async def connect(channel: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        return stream

    async def run() -> None:
        async with m.open_sender(
            connect,
            channels=1,
            uuid=uuid.UUID(int=9),
            compression=compression,
            integrity=integrity,
        ) as sender:
            await sender.queue_pages(block, range(0, PAGES * PAGE, PAGE))
            await sender.sync()
            source[3 * PAGE : 4 * PAGE] = bytes(PAGE)  # now a zero page
            source[7 * PAGE] ^= 0xFF
            for page in (3, 7):
                VERSIONS[page].add(bytes(source[page * PAGE : (page + 1) * PAGE]))
            await sender.queue_pages(block, [7 * PAGE, 3 * PAGE, 20 * PAGE])

    trio.run(run)
    return bytes(stream.data)


@pytest.fixture(scope="module")
def recordings() -> dict[str, bytes]:
    return {kind: record(kind) for kind in KINDS}


def header_starts(stream: bytes) -> list[int]:
    """Where the packet headers of an undamaged stream start."""
    starts, pos = [], m.HANDSHAKE_SIZE
    while pos + HEADER <= len(stream):
        header = m.decode_packet_header(stream[pos : pos + HEADER], page_count=128)
        starts.append(pos)
        pos += HEADER + (header.next_packet_size if header.normal_pages else 0)
    return starts


def named_pages(stream: bytes) -> set[int]:
    """Pages of block ``mem`` named by a header the codec accepts, walking the stream as
    the receiver frames it. Never stricter than the receiver (it stops only where the
    receiver must), so the set is a superset of the pages the receiver may write."""
    try:
        m.decode_handshake(stream[: m.HANDSHAKE_SIZE], channels=1)
    except (m.ProtocolError, ValueError):
        return set()
    named: set[int] = set()
    pos = m.HANDSHAKE_SIZE
    while pos + HEADER <= len(stream):
        try:
            header = m.decode_packet_header(stream[pos : pos + HEADER], page_count=128)
        except m.ProtocolError:
            break
        pos += HEADER
        if header.block_name == "mem":
            named.update(offset // PAGE for offset in header.offsets)
        if header.normal_pages:
            pos += header.next_packet_size
    return named


class ChunkedFeed(trio.abc.Stream):
    """Plays ``data`` back in chunks of the given sizes (cycled), then ends."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data = memoryview(data)
        self.sizes = sizes
        self.pos = 0
        self.reads = 0
        self.closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        size = self.sizes[self.reads % len(self.sizes)]
        self.reads += 1
        if max_bytes is not None:
            size = min(size, max_bytes)
        chunk = bytes(self.data[self.pos : self.pos + size])
        self.pos += len(chunk)
        return chunk

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()  # the receiver's failure byte: dropped

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


@st.composite
def damaged(draw: st.DrawFn, original: bytes) -> bytes:
    data = bytearray(original)
    starts = header_starts(original) or [0]
    # Most damage lands in a handshake or header (the first 400 bytes of one hold every
    # field, the block name and the first offsets); some anywhere, payloads included.
    near_header = st.tuples(st.sampled_from([0, *starts]), st.integers(0, 400)).map(sum)
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        pos = draw(st.one_of(near_header, st.integers(0, len(data) - 1))) % len(data)
        kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "delete", "splice"]))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            new = draw(st.binary(min_size=1, max_size=8))
            data[pos : pos + len(new)] = new
        elif kind == "truncate":
            del data[pos:]
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 2 * HEADER))]
        else:
            # A piece of the original stream (whole packets, often) inserted elsewhere.
            start = draw(st.sampled_from(starts))
            length = draw(st.integers(1, 3 * HEADER + 2 * PAGE))
            data[pos:pos] = original[start : start + length]
    return bytes(data)


@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=100, deadline=None)
@given(data=st.data())
async def test_a_damaged_stream_fails_cleanly_and_writes_only_named_pages(
    recordings: dict[str, bytes], kind: str, data: st.DataObject
) -> None:
    compression, integrity = KINDS[kind]
    original = recordings[kind]
    stream = data.draw(damaged(original), label="stream")
    # Reads of a few bytes (splitting every field) mixed with large ones, cycled.
    sizes = data.draw(
        st.tuples(st.lists(st.integers(1, 64), max_size=4), st.integers(1000, 3 * PAGE)).map(
            lambda t: [*t[0], t[1]]
        ),
        label="sizes",
    )
    size = PAGES * PAGE
    backing = bytearray([GUARD_BYTE]) * GUARD + pattern(size) + bytearray([GUARD_BYTE]) * GUARD
    target = m.RAMBlock("mem", memoryview(backing)[GUARD : GUARD + size])
    feed = ChunkedFeed(stream, sizes)
    with trio.fail_after(5):
        try:
            async with m.open_receiver(
                [target], channels=1, compression=compression, integrity=integrity
            ) as receiver:
                await receiver.add_channel(feed)
                await receiver.wait_closed()
        except m.MultiFDError as exc:
            event(type(exc).__name__)  # shown by --hypothesis-show-statistics
        else:
            event("completed")
    assert feed.closed
    assert backing[:GUARD] == bytes([GUARD_BYTE]) * GUARD
    assert backing[GUARD + size :] == bytes([GUARD_BYTE]) * GUARD
    fill = bytes([FILL]) * PAGE
    changed = {p for p in range(PAGES) if target.view[p * PAGE : (p + 1) * PAGE] != fill}
    assert changed <= named_pages(stream)
    if integrity:
        # Checked before written: every changed page is exactly one the sender sent.
        for page in changed:
            assert bytes(target.view[page * PAGE : (page + 1) * PAGE]) in VERSIONS[page]


@pytest.mark.parametrize("kind", list(KINDS))
async def test_the_undamaged_recording_replays_completely(
    recordings: dict[str, bytes], kind: str
) -> None:
    compression, integrity = KINDS[kind]
    # The fuzz test's baseline: its recording is a whole, valid transfer.
    size = PAGES * PAGE
    target = m.RAMBlock("mem", pattern(size))
    with trio.fail_after(5):
        async with m.open_receiver(
            [target], channels=1, compression=compression, integrity=integrity
        ) as receiver:
            await receiver.add_channel(ChunkedFeed(recordings[kind], [1000, 1, 5000]))
            await receiver.wait_closed()
    assert receiver.rounds_completed == 2
    assert named_pages(recordings[kind]) == set(range(PAGES))
    assert target.view[3 * PAGE : 4 * PAGE] == bytes(PAGE)
    assert target.view[5 * PAGE : 6 * PAGE] == bytes(PAGE)  # a zero page (every 5th)
