"""The engine against a model: generated programs of queue, write and sync operations.

Each example opens a real sender and receiver (1-4 channels, 1-3 blocks of one page
size, a method, zero-page detection or not, integrity or not, a known-zero target or
not, one worker thread per channel or fewer) and runs a program on the sender: pages
queued one by one, as ranges (any step, reversed, empty) and as lists (repeats, any
order), pages of the source rewritten, SYNC rounds (some marked final), ``sync()`` calls
cancelled before or while they wait, and at some rounds a check of the target once the
receiving application has seen the round. That application lets a few checkpoints pass
before each ``receiver.sync()``, or gives a wait up after half a millisecond. Over
memory streams, a receiving channel may read a few bytes at a time or lag behind the
others.

The model is the documented contract. A page is not copied when queued: it is read when
its packet is sent, at the latest before the next ``sync()`` returns. So once round n is
complete, a page queued in round n holds one of the contents it had from its first
queueing in that round until a ``sync()`` returned (a page queued twice in a round may
end with either copy), and a page not queued since holds what it held before. A
``sync()`` cancelled while it waits still starts its round, whose pages may be read
until a later call returns. A page is rewritten whole only while no copy of it can be in
flight (it was not queued since the last ``sync()`` returned); in flight, a write changes
its first byte only, so that any read of the page, however it overlaps the write, is one
of its contents. A known-zero target gets a zero page only over a page that a normal page
reached before: its pages start with a non-zero pattern all the same (which the receiver
must take for zeros), so that a page it must not touch shows whether it did.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager

import attrs
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings, strategies as st

import trio_multifd as m

from .helpers import memory_channels
from .transfer import listening

# Every page size the API allows; blocks of up to 2 MiB, several packets of the large.
PAGE_SIZES = [2**shift for shift in range(9, 20)]
GUARD = 512
GUARD_BYTE = 0x5A
FILL_BYTE = 0xA5


@attrs.frozen
class QueuePage:
    block: int
    page: int


@attrs.frozen
class QueueRange:
    block: int
    start: int
    stop: int
    step: int


@attrs.frozen
class QueueList:
    block: int
    pages: tuple[int, ...]


@attrs.frozen
class Write:
    block: int
    page: int
    zero: bool


@attrs.frozen
class Sync:
    final_round: bool
    check: bool


@attrs.frozen
class CancelledSync:
    """A ``sync()`` cancelled before it starts its round, or while it waits for the
    round to be written (which it still is; the call may also return first)."""

    final_round: bool
    waiting: bool


Op = QueuePage | QueueRange | QueueList | Write | Sync | CancelledSync

# How a receiving channel reads a memory stream: as it comes, at most 1531 bytes at a
# time (splitting headers and pages), or each read a millisecond late (its packets land
# after other channels' later ones, unless the rounds order them).
READERS = {"plain": (None, 0.0), "chopped": (1531, 0.0), "lagging": (None, 0.001)}


@attrs.frozen
class Setup:
    page_size: int
    pages: tuple[int, ...]
    channels: int
    compression: str
    zero_page_detection: str
    integrity: bool
    zeroed_target: bool
    io_threads: int | None
    readers: tuple[str, ...]
    # Checkpoints the receiving application lets pass before each receiver.sync(); -1
    # for a call that gives up after half a millisecond instead.
    lags: tuple[int, ...]
    seed: int


@st.composite
def setups(draw: st.DrawFn) -> Setup:
    page_size = draw(st.sampled_from(PAGE_SIZES))
    most = min(40, 2**21 // page_size)
    channels = draw(st.integers(1, 4))
    return Setup(
        page_size=page_size,
        pages=tuple(
            draw(
                st.lists(
                    st.integers(1, min(4, most)) | st.integers(1, most), min_size=1, max_size=3
                )
            )
        ),
        channels=channels,
        compression=draw(st.sampled_from(["none", "zlib", "zstd"])),
        zero_page_detection=draw(st.sampled_from(["multifd", "none"])),
        integrity=draw(st.booleans()),
        zeroed_target=draw(st.booleans()),
        io_threads=draw(st.sampled_from([None, *range(1, channels + 1)])),
        readers=tuple(
            draw(st.sampled_from(["plain", "chopped", "lagging", "lagging"]))
            for _ in range(channels)
        ),
        lags=tuple(draw(st.lists(st.integers(-1, 3), min_size=1, max_size=4))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def programs(setup: Setup) -> st.SearchStrategy[list[Op]]:
    def page_of(block: int) -> st.SearchStrategy[int]:
        return st.integers(0, setup.pages[block] - 1)

    def queue(block: int) -> st.SearchStrategy[Op]:
        count = setup.pages[block]
        return st.one_of(
            st.builds(QueuePage, st.just(block), page_of(block)),
            st.builds(
                QueueRange,
                st.just(block),
                st.integers(0, count - 1),
                st.integers(-1, count),
                st.sampled_from([1, 1, 2, 3, -1, -2]),
            ),
            st.builds(
                QueueList, st.just(block), st.lists(page_of(block), max_size=3 * count).map(tuple)
            ),
        )

    def write(block: int) -> st.SearchStrategy[Op]:
        return st.builds(Write, st.just(block), page_of(block), st.booleans())

    blocks = st.integers(0, len(setup.pages) - 1)
    op = (
        blocks.flatmap(queue)
        | blocks.flatmap(write)
        | st.builds(CancelledSync, st.booleans(), st.sampled_from([False, True, True]))
    )
    # Rounds of a few operations each: pages queued again in a later round, rewritten in
    # between, are what the rounds must order. The exit's round covers the operations
    # after the last sync().
    rounds = st.lists(
        st.tuples(
            st.lists(op, max_size=6),
            st.builds(Sync, st.booleans(), st.sampled_from([False, False, True])),
        ),
        max_size=5,
    )
    return st.builds(
        lambda rounds, rest: [*(op for ops, sync in rounds for op in (*ops, sync)), *rest],
        rounds,
        st.lists(op, max_size=6),
    )


@attrs.define
class Model:
    """What each page of the target may hold, from the program run on the source."""

    page_size: int
    sources: list[bytearray]
    # Per block and page: the contents the target's page may hold once the last round
    # is complete.
    allowed: list[list[list[bytes]]]
    rng: random.Random
    # A known-zero target whose zero pages travel as such: one lands only over a page
    # that a normal page reached, which then no longer holds the target's own content.
    skips_zero_pages: bool
    # What every page of the target holds before anything reaches it.
    own: bytes
    # The rounds whose pages may still be read, the open one last (the ones before were
    # started by a sync() that was cancelled): per block, the contents of each page
    # queued in the round, from its first queueing on.
    unread: list[list[dict[int, list[bytes]]]] = attrs.field(init=False)
    # What each content the program made was, to say what a wrong page holds.
    made: dict[bytes, str] = attrs.field(init=False)
    round: int = 1
    """The open round's number."""
    unsynced: int = 0
    queued: int = 0

    def __attrs_post_init__(self) -> None:
        self.unread = [[{} for _ in self.sources]]
        self.made = {}
        for block, pages in enumerate(self.allowed):
            for page, (content,) in enumerate(pages):
                self.made.setdefault(content, f"the target's own page {page} of block {block}")

    def page(self, block: int, page: int) -> bytes:
        size = self.page_size
        content = bytes(self.sources[block][page * size : (page + 1) * size])
        self.made.setdefault(content, f"page {page} of block {block} in round {self.round}")
        return content

    def queue(self, block: int, pages: Sequence[int]) -> None:
        self.unsynced += len(pages)
        self.queued += len(pages)
        for page in pages:
            if page not in self.unread[-1][block]:
                self.unread[-1][block][page] = [self.page(block, page)]

    def write(self, block: int, page: int, zero: bool) -> None:
        size = self.page_size
        source = self.sources[block]
        start = page * size
        in_flight = [r[block][page] for r in self.unread if page in r[block]]
        if not in_flight:
            source[start : start + size] = bytes(size) if zero else self.rng.randbytes(size)
            return
        # One byte, which turns a zero page into another and back.
        source[start] = 0 if source[start] else self.rng.randrange(1, 256)
        for contents in in_flight:
            contents.append(self.page(block, page))

    def start_round(self) -> None:
        """A SYNC round was started: the receiver orders its pages before the next's."""
        self.unread.append([{} for _ in self.sources])
        self.round += 1
        self.unsynced = 0

    def end_round(self) -> None:
        """A sync() returned: every page queued before it was read."""
        for pages_of in self.unread:
            for block, pages in enumerate(pages_of):
                for page, contents in pages.items():
                    self.allowed[block][page] = self.landed(self.allowed[block][page], contents)
        self.unread = []
        self.start_round()

    def landed(self, before: list[bytes], contents: list[bytes]) -> list[bytes]:
        """What a page may hold after a round that read it as one of ``contents`` (once,
        or more often if queued again), when it held one of ``before``."""
        zero = bytes(self.page_size)
        if not self.skips_zero_pages or zero not in contents:
            return contents
        after = [content for content in contents if content != zero]
        # A zero page lands over a page that a normal page reached: before the round,
        # or in it first (a page queued twice).
        if after or any(content != self.own for content in before):
            after.append(zero)
        # Or every read of the round was the zero page, over a page nothing reached.
        if self.own in before:
            after.append(self.own)
        return after

    def check(self, backings: list[bytearray], when: str) -> None:
        size = self.page_size
        guard = bytes([GUARD_BYTE]) * GUARD
        wrong = []
        for block, backing in enumerate(backings):
            assert backing[:GUARD] == guard and backing[-GUARD:] == guard, (when, block)
            target = backing[GUARD:-GUARD]
            for page, allowed in enumerate(self.allowed[block]):
                got = bytes(target[page * size : (page + 1) * size])
                if got not in allowed:
                    what = self.made.get(got, "nothing the program made")
                    wrong.append(f"page {page} of block {block} holds {what}")
        assert not wrong, f"{when}: {'; '.join(wrong)}"


class ReceivingEnd(trio.abc.HalfCloseableStream):
    """A receiver's memory stream that returns at most ``cap`` bytes per read, each
    after ``delay`` seconds."""

    def __init__(self, inner: trio.abc.Stream, reader: str) -> None:
        self.inner = inner
        self.cap, self.delay = READERS[reader]

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await trio.sleep(self.delay)
        if self.cap is not None:
            max_bytes = self.cap if max_bytes is None else min(max_bytes, self.cap)
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        assert isinstance(self.inner, trio.abc.HalfCloseableStream)
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def run_program(setup: Setup, program: list[Op], via: str) -> None:
    size = setup.page_size
    rng = random.Random(setup.seed)
    sources = [
        bytearray().join(
            bytes(size) if rng.random() < 0.25 else rng.randbytes(size) for _ in range(count)
        )
        for count in setup.pages
    ]
    guard = bytes([GUARD_BYTE]) * GUARD
    fill = bytes([FILL_BYTE])
    backings = [bytearray(guard + fill * len(source) + guard) for source in sources]
    names = [f"block{i}" for i in range(len(sources))]
    source_blocks = [
        m.RAMBlock(name, source, page_size=size)
        for name, source in zip(names, sources, strict=True)
    ]
    target_blocks = [
        m.RAMBlock(name, memoryview(b)[GUARD:-GUARD], page_size=size, zeroed=setup.zeroed_target)
        for name, b in zip(names, backings, strict=True)
    ]
    model = Model(
        size,
        sources,
        [[[bytes(fill * size)] for _ in range(count)] for count in setup.pages],
        random.Random(setup.seed + 1),
        skips_zero_pages=setup.zeroed_target and setup.zero_page_detection == "multifd",
        own=bytes(fill * size),
    )
    seen: list[int] = []
    round_seen = trio.Condition()
    marked: list[int] = []

    async def follow_rounds(receiver: m.Receiver) -> None:
        for lag in itertools.cycle(setup.lags):
            for _ in range(lag):
                await trio.lowlevel.checkpoint()
            # A call that gives up gives its round back to the next.
            with trio.move_on_after(0.0005 if lag < 0 else math.inf):
                try:
                    seen.append(await receiver.sync())
                except m.TransferIncompleteError:
                    return
            async with round_seen:
                round_seen.notify_all()

    async def run(sender: m.Sender) -> None:
        for op in program:
            match op:
                case QueuePage(block, page):
                    await sender.queue_page(source_blocks[block], page * size)
                    model.queue(block, [page])
                case QueueRange(block, start, stop, step):
                    await sender.queue_pages(
                        source_blocks[block], range(start * size, stop * size, step * size)
                    )
                    model.queue(block, range(start, stop, step))
                case QueueList(block, pages):
                    await sender.queue_pages(source_blocks[block], [p * size for p in pages])
                    model.queue(block, pages)
                case Write(block, page, zero):
                    model.write(block, page, zero)
                case Sync(final_round, check):
                    number = await sender.sync(final_round=final_round)
                    assert number == model.round
                    marked.extend([number] if final_round else [])
                    model.end_round()
                    if check:
                        async with round_seen:
                            while number not in seen:
                                await round_seen.wait()
                        model.check(backings, f"after round {number}")
                case CancelledSync(final_round, waiting=False):
                    with trio.CancelScope() as scope:
                        scope.cancel()
                        await sender.sync(final_round=final_round)
                    assert scope.cancelled_caught
                case CancelledSync(final_round, waiting=True):
                    marked.extend([model.round] if final_round else [])
                    returned = await sync_cancelled_while_waiting(sender, final_round)
                    if returned is None:
                        model.start_round()
                    else:
                        assert returned == model.round
                        model.end_round()
            assert sender.unsynced_pages == model.unsynced

    async with m.open_receiver(
        target_blocks,
        channels=setup.channels,
        compression=setup.compression,
        integrity=setup.integrity,
        io_threads=setup.io_threads,
    ) as receiver:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow_rounds, receiver)
            if via == "memory":
                connect, ends = memory_channels(setup.channels)
                for end, reader in zip(ends, setup.readers, strict=True):
                    nursery.start_soon(receiver.add_channel, ReceivingEnd(end, reader))
                async with open_sender(setup, connect) as sender:
                    await run(sender)
            else:
                async with listening(via) as (listeners, connect):
                    await nursery.start(receiver.serve, listeners)
                    async with open_sender(setup, connect) as sender:
                        await run(sender)
            rounds = model.round  # the exit's own round
            model.end_round()
            await receiver.wait_closed()
        assert seen == list(range(1, rounds + 1))
        assert [n for n in seen if receiver.is_final_round(n)] == marked
        assert receiver.final_round == max(marked, default=None)
    model.check(backings, "after the transfer")
    assert sender.stats.pages == model.queued
    # Each channel's counters agree, normal and zero pages apart: a known-zero target
    # counts the zero pages it did not write.
    assert sender.stats.channels == receiver.stats.channels
    assert sender.stats.rounds == receiver.stats.rounds == rounds


async def sync_cancelled_while_waiting(sender: m.Sender, final_round: bool) -> int | None:
    """Call ``sync()`` and cancel it once it waits; what it returned, if it did first."""
    returned: list[int] = []

    async def call() -> None:
        returned.append(await sender.sync(final_round=final_round))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return returned[0] if returned else None


def open_sender(setup: Setup, connect: m.Connector) -> AbstractAsyncContextManager[m.Sender]:
    return m.open_sender(
        connect,
        channels=setup.channels,
        compression=setup.compression,
        page_size=setup.page_size,
        zero_page_detection=setup.zero_page_detection,
        integrity=setup.integrity,
        io_threads=setup.io_threads,
    )


@st.composite
def cases(draw: st.DrawFn) -> tuple[Setup, list[Op]]:
    setup = draw(setups())
    return setup, draw(programs(setup))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
async def test_over_memory_streams_each_page_holds_a_content_of_its_last_round(
    case: tuple[Setup, list[Op]],
) -> None:
    with trio.fail_after(20):
        await run_program(*case, via="memory")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
async def test_over_tcp_each_page_holds_a_content_of_its_last_round(
    case: tuple[Setup, list[Op]],
) -> None:
    with trio.fail_after(20):
        await run_program(*case, via="tcp")
