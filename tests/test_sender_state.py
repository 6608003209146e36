"""The sender's state around its block: tasks queueing at once, calls after the block
exited (however it exited), tasks outside the block, and packets of many buffers.

Each case must end promptly with every page delivered or a clear error, never a hang.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

import trio_multifd as m

from .helpers import (
    PAGE,
    TrackedStream,
    block_pair,
    landed,
    memory_channels,
    pattern,
    random_pages,
)
from .transfer import listening, transfer

DEADLINE = 20


async def test_two_tasks_queueing_at_once_both_finish_and_every_page_arrives() -> None:
    # Far more pages than the queue holds: both tasks wait for room, often together.
    src, dst = block_pair("mem", 8192, seed=3)
    half = src.size // 2

    async def body(sender: m.Sender) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.queue_pages, src, range(0, half, PAGE))
            nursery.start_soon(sender.queue_pages, src, range(half, src.size, PAGE))

    with trio.fail_after(DEADLINE):
        await transfer([src], [dst], body, channels=1)
    assert dst.view == src.view


async def test_two_tasks_queueing_page_by_page_both_finish() -> None:
    src, dst = block_pair("mem", 2048, seed=4)

    async def one_by_one(sender: m.Sender, start: int) -> None:
        for offset in range(start, src.size, 2 * PAGE):
            await sender.queue_page(src, offset)

    async def body(sender: m.Sender) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one_by_one, sender, 0)
            nursery.start_soon(one_by_one, sender, PAGE)

    with trio.fail_after(DEADLINE):
        await transfer([src], [dst], body, channels=1)
    assert dst.view == src.view


class GatedStream(TrackedStream):
    """Sends the handshake, then nothing more until ``gate`` is set."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.gate = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.sent:
            await self.gate.wait()
        await super().send_all(data)


async def cancel_when_blocked(scope: trio.CancelScope) -> None:
    await trio.testing.wait_all_tasks_blocked()
    scope.cancel()


async def gated_transfer(
    target: m.RAMBlock, body: Callable[[m.Sender, GatedStream], Awaitable[None]]
) -> list[int]:
    """Run ``body`` on a one-channel sender whose stream holds back every packet until its
    gate opens; return the rounds the receiving application saw."""
    gated: list[GatedStream] = []

    def wrap(channel: int, stream: trio.abc.Stream) -> trio.abc.Stream:
        gated.append(GatedStream(stream))
        return gated[-1]

    connect, ends = memory_channels(1, wrap=wrap)
    seen: list[int] = []
    with trio.fail_after(DEADLINE):
        async with m.open_receiver([target], channels=1) as receiver:

            async def follow_rounds() -> None:
                with contextlib.suppress(m.TransferIncompleteError):
                    while True:
                        seen.append(await receiver.sync())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow_rounds)
                nursery.start_soon(receiver.add_channel, ends[0])
                async with m.open_sender(connect, channels=1) as sender:
                    await body(sender, gated[0])
                await receiver.wait_closed()
    return seen


async def test_queue_pages_cancelled_while_waiting_for_room_has_queued_every_page() -> None:
    src, dst = block_pair("mem", 1024, seed=6)
    unsynced: list[int] = []

    async def body(sender: m.Sender, stream: GatedStream) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_when_blocked, scope)
                # More pages than the queue holds, none sent: the call waits for room.
                await sender.queue_pages(src, range(0, src.size, PAGE))
        assert scope.cancelled_caught
        unsynced.append(sender.unsynced_pages)
        stream.gate.set()

    assert await gated_transfer(dst, body) == [1]
    assert unsynced == [1024]
    assert dst.view == src.view


async def test_sync_cancelled_while_waiting_still_starts_its_round() -> None:
    numbers: list[int] = []

    async def body(sender: m.Sender, stream: GatedStream) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_when_blocked, scope)
                await sender.sync()  # its SYNC packet waits behind the gate
        assert scope.cancelled_caught
        stream.gate.set()
        numbers.append(await sender.sync())

    assert await gated_transfer(m.RAMBlock("mem", pattern(PAGE)), body) == [1, 2, 3]
    assert numbers == [2]


async def test_sync_cancelled_before_it_starts_starts_no_round() -> None:
    numbers: list[int] = []

    async def body(sender: m.Sender, stream: GatedStream) -> None:
        stream.gate.set()
        with trio.CancelScope() as scope:
            scope.cancel()
            await sender.sync()
        assert scope.cancelled_caught
        numbers.append(await sender.sync())

    assert await gated_transfer(m.RAMBlock("mem", pattern(PAGE)), body) == [1, 2]
    assert numbers == [1]


async def open_and_leave(how: str) -> m.Sender:
    """A sender whose block was left normally, by an exception, or by cancellation."""
    src, dst = block_pair("mem", 64)
    kept: list[m.Sender] = []

    async def body(sender: m.Sender) -> None:
        kept.append(sender)
        await sender.queue_pages(src, range(0, src.size, PAGE))

    with trio.fail_after(DEADLINE):
        if how == "normal":
            await transfer([src], [dst], body, via="memory")
            return kept[0]
        # No receiver: memory streams take what is sent without one.
        connect, _ends = memory_channels(1)
        with trio.CancelScope() as scope:
            try:
                async with m.open_sender(connect, channels=1) as sender:
                    await body(sender)
                    if how == "exception":
                        raise KeyError("the application's own error")
                    scope.cancel()
                    await trio.sleep_forever()
            except KeyError:
                assert how == "exception"
        assert scope.cancelled_caught == (how == "cancel")
    return kept[0]


@pytest.mark.parametrize("how", ["normal", "exception", "cancel"])
async def test_a_closed_sender_refuses_pages_and_rounds(how: str) -> None:
    sender = await open_and_leave(how)
    block = m.RAMBlock("mem", bytearray(64 * PAGE))
    with trio.fail_after(DEADLINE):
        with pytest.raises(RuntimeError, match="closing or closed: no page can be queued"):
            await sender.queue_page(block, 0)
        with pytest.raises(RuntimeError, match="closing or closed: no page can be queued"):
            await sender.queue_pages(block, range(0, block.size, PAGE))
        with pytest.raises(RuntimeError, match="closing or closed: no SYNC round can be"):
            await sender.sync()


async def test_tasks_outside_the_block_are_woken_when_it_ends() -> None:
    # A peer that accepts and never reads: the socket fills, one outside task waits for
    # room to queue and another for its round; then the application leaves the block.
    src = m.RAMBlock("mem", random_pages(8192, seed=5))
    outcomes: dict[str, BaseException] = {}

    async def record(name: str, call: Awaitable[object]) -> None:
        try:
            await call
        except RuntimeError as exc:
            outcomes[name] = exc

    with trio.fail_after(DEADLINE):
        async with listening("tcp") as (listeners, connect), trio.open_nursery() as outside:
            peer: list[trio.abc.Stream] = []

            async def accept() -> None:
                peer.append(await listeners[0].accept())

            outside.start_soon(accept)
            try:
                async with m.open_sender(connect, channels=1) as sender:
                    outside.start_soon(
                        record, "queue", sender.queue_pages(src, range(0, src.size, PAGE))
                    )
                    await trio.sleep(0.2)
                    outside.start_soon(record, "sync", sender.sync())
                    await trio.sleep(0.2)
                    raise KeyError("the application gives up")
            except KeyError:
                pass
            outside.cancel_scope.deadline = trio.current_time() + 5
        for stream in peer:
            await stream.aclose()
    assert "before round 1 was written" in str(outcomes["sync"])
    assert "closed before these pages were sent" in str(outcomes["queue"])


async def test_a_sender_made_directly_refuses_work_instead_of_waiting_for_ever() -> None:
    connect, _ = memory_channels(1)
    sender = m.Sender(
        connect,
        channels=1,
        uuid=None,
        compression="none",
        compression_level=None,
        page_size=PAGE,
        zero_page_detection="multifd",
        send_timeout=None,
        integrity=False,
        io_threads=None,
    )
    block = m.RAMBlock("mem", bytearray(PAGE))
    calls = [sender.queue_page(block, 0), sender.queue_pages(block, [0]), sender.sync()]
    with trio.fail_after(DEADLINE):
        for call in calls:
            with pytest.raises(RuntimeError, match=r"not opened: make it with open_sender\(\)"):
                await call


async def test_shielded_calls_in_the_block_are_woken_when_the_transfer_fails() -> None:
    # The block's own tasks, shielded (cleanup that must not be cut short), wait for room
    # and for a round on a socket its peer never reads; then the peer resets it. The
    # block's exit waits for them: they must not wait for a transfer that is over.
    src = m.RAMBlock("mem", random_pages(8192, seed=7))
    outcomes: dict[str, BaseException] = {}

    async def shielded(name: str, call: Awaitable[object]) -> None:
        # A deadline of its own: the test's fail_after cannot reach into the shield.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
            try:
                await call
            except RuntimeError as exc:
                outcomes[name] = exc

    with trio.fail_after(DEADLINE):
        async with listening("tcp") as (listeners, connect):
            with pytest.raises(m.TransportError) as info:
                async with m.open_sender(connect, channels=1, send_timeout=None) as sender:
                    peer = await listeners[0].accept()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(
                            shielded, "queue", sender.queue_pages(src, range(0, src.size, PAGE))
                        )
                        await trio.sleep(0.2)
                        nursery.start_soon(shielded, "sync", sender.sync())
                        await trio.sleep(0.2)
                        peer.socket.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        await peer.aclose()
    assert info.value.channel == 0
    assert "closed before these pages were sent" in str(outcomes["queue"])
    assert "before round 1 was written" in str(outcomes["sync"])
    assert outcomes["sync"].__cause__ is info.value


@pytest.mark.parametrize("cleanup", ["sync", "queue_pages"])
async def test_a_refusal_left_uncaught_in_the_blocks_cleanup_leaves_as_the_transfers_error(
    cleanup: str,
) -> None:
    # The cleanup's RuntimeError only says the transfer failed: the block raises the
    # transfer's own error, which an application catches as it would without it.
    src = m.RAMBlock("mem", random_pages(64, seed=8))
    with trio.fail_after(DEADLINE):
        async with listening("tcp") as (listeners, connect):
            with pytest.raises(m.TransportError) as info:
                async with m.open_sender(connect, channels=1, send_timeout=None) as sender:
                    peer = await listeners[0].accept()
                    try:
                        # Less than the queue holds: the call returns before the reset.
                        await sender.queue_pages(src, range(0, src.size, PAGE))
                        peer.socket.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        await peer.aclose()
                        await trio.sleep_forever()
                    finally:
                        # A deadline of its own: fail_after cannot reach into the shield.
                        with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
                            if cleanup == "sync":
                                await sender.sync()
                            # More than the queue holds: refused at the latest when full.
                            for _ in range(100):
                                await sender.queue_pages(src, range(0, src.size, PAGE))
    assert info.value.channel == 0


async def test_pages_queued_while_the_block_exits_are_refused_not_lost() -> None:
    src, dst = block_pair("mem", 2048, seed=6)
    refused: list[RuntimeError] = []

    async def late(sender: m.Sender, closing: trio.Event) -> None:
        await closing.wait()
        try:
            await sender.queue_pages(src, range(0, src.size, PAGE))
        except RuntimeError as exc:
            refused.append(exc)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            closing = trio.Event()

            async def body(sender: m.Sender) -> None:
                nursery.start_soon(late, sender, closing)
                await sender.queue_pages(src, range(0, src.size // 2, PAGE))
                closing.set()

            await transfer([src], [dst], body, channels=1)
    assert len(refused) == 1
    assert dst.view[: src.size // 2] == src.view[: src.size // 2]


@pytest.mark.parametrize("zero_page_detection", ["none", "multifd"])
async def test_a_packet_of_more_buffers_than_one_system_call_takes_is_sent(
    zero_page_detection: str,
) -> None:
    # 512-byte pages, every other one: 1024 separate pages and the header in one packet.
    # Each page is distinct (random) and the target pre-filled, so a page sent to the
    # wrong place, or one not sent, shows.
    size = 4096 * 512
    src = m.RAMBlock("mem", random_pages(size // PAGE, seed=7), page_size=512)
    dst = m.RAMBlock("mem", pattern(size), page_size=512)

    async def body(sender: m.Sender) -> None:
        await sender.queue_pages(src, range(0, size, 1024))

    with trio.fail_after(DEADLINE):
        await transfer(
            [src],
            [dst],
            body,
            channels=1,
            sender_options={"page_size": 512, "zero_page_detection": zero_page_detection},
        )
    assert dst.view == landed(src.view, range(0, size // 512, 2), page_size=512)


async def test_any_failure_of_connect_is_the_channels_transport_error() -> None:
    async def connect(channel: int) -> trio.abc.Stream:
        raise trio.TooSlowError  # say, its own timeout

    with trio.fail_after(DEADLINE), pytest.raises(m.TransportError) as info:
        async with m.open_sender(connect, channels=1):
            pass
    assert info.value.channel == 0
    assert "could not connect: TooSlowError()" in str(info.value)


async def test_connect_returning_no_stream_is_named() -> None:
    async def connect(channel: int) -> trio.abc.Stream:
        return None  # type: ignore[return-value]

    with trio.fail_after(DEADLINE), pytest.raises(m.TransportError) as info:
        async with m.open_sender(connect, channels=1):
            pass
    assert "connect returned NoneType, not a trio.abc.Stream" in str(info.value)


@pytest.mark.parametrize("call", ["queue_page", "queue_pages"])
async def test_queueing_a_block_that_is_no_ramblock_or_of_another_page_size_is_refused(
    call: str,
) -> None:
    src, dst = block_pair("mem", 2)
    small = m.RAMBlock("small", bytearray(2 * PAGE), page_size=PAGE // 2)

    async def body(sender: m.Sender) -> None:
        queue = getattr(sender, call)
        offset = 0 if call == "queue_page" else [0]
        with pytest.raises(TypeError, match="block must be a RAMBlock, got bytearray"):
            await queue(bytearray(PAGE), offset)
        with pytest.raises(
            ValueError, match="block 'small' has page_size 2048, the sender uses 4096"
        ):
            await queue(small, offset)
        # Refused before anything was queued: the transfer goes on.
        await sender.queue_pages(src, range(0, src.size, PAGE))

    with trio.fail_after(DEADLINE):
        await transfer([src], [dst], body, channels=1, via="memory")
    assert dst.view == src.view
