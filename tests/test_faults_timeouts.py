"""Timeouts, cancellation and interrupts: nothing hangs, everything is closed.

Virtual time (``autojump_clock``) with memory streams where the exact instant matters;
real loopback TCP, with small timeouts and small socket buffers, where the socket path
(``sendmsg``/``recvmsg_into``) is what is under test.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

import trio_multifd as m
from trio_multifd import _transport
from trio_multifd._transport import ACCEPT_LIMIT

from .helpers import PAGE, TrackedStream, block_pair, pattern
from .proxy import TRANSFER_UUID, RecordingListener, TcpLink, queue_everything

SMALL_BUFFER = 32 * 1024


def handshake(channel: int = 0) -> bytes:
    return m.encode_handshake(m.Handshake(uuid=TRANSFER_UUID, channel_id=channel))


def packet(offsets: list[int], *, flags: int = 0) -> bytes:
    header = m.PacketHeader(
        flags=flags,
        pages_alloc=128,
        normal_pages=len(offsets),
        next_packet_size=PAGE * len(offsets),
        packet_num=0,
        block_name="mem" if offsets else "",
        offsets=tuple(offsets),
    )
    return m.encode_packet_header(header) + b"\x42" * (PAGE * len(offsets))


SYNC = packet([], flags=m.Flag.SYNC)


def memory_pair() -> tuple[TrackedStream, TrackedStream]:
    """(the peer's end, the end given to the library), both tracked."""
    a, b = trio.testing.memory_stream_pair()
    return TrackedStream(a), TrackedStream(b)


@asynccontextmanager
async def stalled_tcp_link() -> AsyncIterator[TcpLink]:
    """A link whose sockets hold little, so that a peer that stops reading is felt."""
    async with TcpLink.open() as link:
        link.listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        link.sndbuf = SMALL_BUFFER
        yield link


# -- handshake_timeout ----------------------------------------------------------------------


async def test_handshake_timeout_defaults_to_ten_seconds_from_add_channel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    target = m.RAMBlock("mem", pattern(PAGE))
    peer, ours = memory_pair()
    with pytest.raises(m.HandshakeTimeoutError) as info:
        async with m.open_receiver([target], channels=1) as receiver:
            await trio.sleep(5)  # the clock starts at add_channel, not at open_receiver
            start = trio.current_time()
            try:
                await receiver.add_channel(ours)
            finally:
                assert trio.current_time() - start == pytest.approx(10.0)
    assert info.value.channel is None
    assert ours.closed
    await peer.aclose()


async def test_a_handshake_trickling_in_still_times_out_as_a_whole(
    autojump_clock: trio.testing.MockClock,
) -> None:
    target = m.RAMBlock("mem", pattern(PAGE))
    peer, ours = memory_pair()

    async def trickle() -> None:
        for byte in handshake()[:-1]:
            await peer.send_all(bytes([byte]))
            await trio.sleep(0.1)  # 63 bytes over 6.3 s, never the 64th

    with pytest.raises(m.HandshakeTimeoutError):
        async with m.open_receiver([target], channels=1, handshake_timeout=5.0) as receiver:
            receiver._supervisor.nursery.start_soon(trickle)
            start = trio.current_time()
            try:
                await receiver.add_channel(ours)
            finally:
                assert trio.current_time() - start == pytest.approx(5.0)
    assert ours.closed


async def test_handshake_timeout_none_waits_for_a_late_handshake(
    autojump_clock: trio.testing.MockClock,
) -> None:
    target = m.RAMBlock("mem", pattern(PAGE))
    peer, ours = memory_pair()

    async def late_sender() -> None:
        await trio.sleep(3600)
        await peer.send_all(handshake() + SYNC)
        await peer.send_eof()

    async with m.open_receiver([target], channels=1, handshake_timeout=None) as receiver:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(late_sender)
            assert await receiver.add_channel(ours) == 0
        assert await receiver.sync() == 1
        await receiver.wait_closed()


async def test_a_silent_tcp_connection_times_out_and_is_reset() -> None:
    target = m.RAMBlock("mem", pattern(PAGE))
    with trio.fail_after(5):
        async with TcpLink.open() as link:
            silent = await link.raw_connect()
            with pytest.raises(m.HandshakeTimeoutError):
                async with m.open_receiver(
                    [target], channels=1, handshake_timeout=0.3
                ) as receiver:
                    await receiver.add_channel(await link.accept())
            assert link.all_closed("receiver")
            with pytest.raises(trio.BrokenResourceError):
                await silent.receive_some()


async def test_serve_drops_a_silent_connection_and_completes_with_good_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    src, dst = block_pair("mem", 64, seed=1)
    with caplog.at_level(logging.WARNING, logger="trio_multifd"), trio.fail_after(10):
        async with RecordingListener.open() as listener:
            silent = await trio.open_tcp_stream("127.0.0.1", listener.port)
            async with m.open_receiver(
                [dst], channels=2, uuid=TRANSFER_UUID, handshake_timeout=1
            ) as receiver:
                async with trio.open_nursery() as nursery:
                    await nursery.start(receiver.serve, [listener])
                    # The channels come once it has timed out (its reset): one still in
                    # its handshake then would be dropped as soon as they are set up.
                    with pytest.raises(trio.BrokenResourceError):
                        await silent.receive_some()
                    await silent.aclose()

                    async def connect(channel: int) -> trio.abc.Stream:
                        return await trio.open_tcp_stream("127.0.0.1", listener.port)

                    async with m.open_sender(connect, channels=2, uuid=TRANSFER_UUID) as sender:
                        await queue_everything([src], sender)
                await receiver.wait_closed()
            assert all(s.socket.fileno() == -1 for s in listener.accepted)
            assert len(listener.accepted) == 3
    assert dst.view == src.view
    assert any("no complete handshake" in r.getMessage() for r in caplog.records)


# -- send_timeout ---------------------------------------------------------------------------


async def test_send_timeout_fails_a_channel_whose_peer_stops_reading_over_tcp() -> None:
    src, _ = block_pair("mem", 512, seed=2)
    with trio.fail_after(10):
        async with stalled_tcp_link() as link:
            start = trio.current_time()
            with pytest.raises(m.SendStalledError) as info:
                async with m.open_sender(link.connect, channels=2, send_timeout=0.5) as sender:
                    for _ in range(2):
                        await link.accept()  # accepted, never read
                    await sender.queue_pages(src, range(0, src.size, PAGE))
                    await sender.sync()
            assert trio.current_time() - start >= 0.5  # not before send_timeout
            # Both channels stall: the error names the one whose wait ran out first.
            assert info.value.channel in (0, 1)
            assert str(info.value) == (
                f"channel {info.value.channel}: the peer accepted no byte for send_timeout=0.5s"
            )
            assert link.all_closed("sender")


async def test_send_timeout_bounds_the_wait_for_a_receiver_that_reads_all_but_never_closes() -> (
    None
):
    src, _ = block_pair("mem", 16, seed=2)
    with trio.fail_after(10):
        async with TcpLink.open() as link:

            async def read_but_never_close() -> None:
                stream = await link.accept()
                while await stream.receive_some():
                    pass  # the sender's half-close ends this loop; no close follows
                await trio.sleep_forever()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_but_never_close)
                start = trio.current_time()
                with pytest.raises(m.DeliveryError) as info:
                    async with m.open_sender(link.connect, channels=1, send_timeout=0.5) as sender:
                        await sender.queue_pages(src, range(0, src.size, PAGE))
                assert trio.current_time() - start >= 0.5
                assert info.value.channel == 0
                assert str(info.value) == (
                    "channel 0: the receiver did not close the channel within 0.5s after the"
                    " final SYNC"
                )
                assert link.all_closed("sender")
                nursery.cancel_scope.cancel()


async def test_send_timeout_defaults_to_sixty_seconds_on_a_stream_nobody_reads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A lockstep stream's send_all waits for a reader that never comes: the handshake
    # itself stalls, so open_sender fails before the body.
    ours, _theirs = trio.testing.lockstep_stream_pair()
    tracked = TrackedStream(ours)

    async def connect(channel: int) -> trio.abc.Stream:
        return tracked

    with pytest.raises(m.SendStalledError) as info:
        async with m.open_sender(connect, channels=1):
            raise AssertionError("unreachable: the handshake never went out")
    assert trio.current_time() == pytest.approx(60.0)
    assert info.value.channel == 0
    assert tracked.closed


async def test_send_timeout_none_waits_until_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, _theirs = trio.testing.lockstep_stream_pair()
    tracked = TrackedStream(ours)

    async def connect(channel: int) -> trio.abc.Stream:
        return tracked

    with trio.move_on_after(10_000) as scope:
        async with m.open_sender(connect, channels=1, send_timeout=None):
            raise AssertionError("unreachable")
    assert scope.cancelled_caught
    assert tracked.closed


async def test_a_slow_but_moving_peer_is_not_stalled_over_tcp() -> None:
    # send_timeout bounds each wait for progress on a socket, not a whole packet.
    src, _ = block_pair("mem", 128, seed=3)
    received = 0
    with trio.fail_after(15):
        async with stalled_tcp_link() as link:

            async def slow_reader() -> None:
                nonlocal received
                stream = await link.accept()
                while data := await stream.receive_some(96 * 1024):
                    received += len(data)
                    await trio.sleep(0.1)
                await stream.aclose()  # the clean close confirms the transfer

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_reader)
                start = trio.current_time()
                async with m.open_sender(link.connect, channels=1, send_timeout=0.3) as sender:
                    await sender.queue_pages(src, range(0, src.size, PAGE))
                assert trio.current_time() - start > 0.3  # it did have to wait
            assert link.all_closed("sender")
    assert received == sender.stats.bytes


# -- receive_timeout ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "inside"),
    [
        pytest.param(handshake() + packet([0])[:100], "a packet header", id="header"),
        pytest.param(handshake() + packet([0])[: m.header_size(128) + 10], "a payload", id="pay"),
    ],
)
async def test_receive_timeout_fails_a_channel_stopped_inside_a_packet(
    autojump_clock: trio.testing.MockClock, sent: bytes, inside: str
) -> None:
    target = m.RAMBlock("mem", pattern(PAGE))
    peer, ours = memory_pair()
    await peer.send_all(sent)
    with pytest.raises(m.ReceiveTimeoutError) as info:
        async with m.open_receiver([target], channels=1, receive_timeout=2.0) as receiver:
            await receiver.add_channel(ours)
            await receiver.wait_closed()
    assert trio.current_time() == pytest.approx(2.0)
    assert info.value.channel == 0
    assert inside in str(info.value)
    assert ours.closed


async def test_receive_timeout_leaves_a_channel_idle_between_packets_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    target = m.RAMBlock("mem", pattern(PAGE))
    peer, ours = memory_pair()

    async def idle_sender() -> None:
        await peer.send_all(handshake() + packet([0]))
        await trio.sleep(3600)  # between packets: a healthy idle channel
        await peer.send_all(SYNC)
        await peer.send_eof()

    async with m.open_receiver([target], channels=1, receive_timeout=1.0) as receiver:
        receiver._supervisor.nursery.start_soon(idle_sender)
        await receiver.add_channel(ours)
        assert await receiver.sync() == 1
        await receiver.wait_closed()
    assert target.view == b"\x42" * PAGE


async def test_receive_timeout_over_tcp_resets_the_stopped_channel() -> None:
    target = m.RAMBlock("mem", pattern(2 * PAGE))
    with trio.fail_after(5):
        async with TcpLink.open() as link:
            peer = await link.raw_connect()
            await peer.send_all(handshake() + packet([PAGE])[: m.header_size(128) + 1000])
            with pytest.raises(m.ReceiveTimeoutError) as info:
                async with m.open_receiver(
                    [target], channels=1, uuid=TRANSFER_UUID, receive_timeout=0.3
                ) as receiver:
                    await receiver.add_channel(await link.accept())
                    await receiver.wait_closed()
            assert info.value.channel == 0
            assert link.all_closed("receiver")
            with pytest.raises(trio.BrokenResourceError):
                await peer.receive_some()
    # At most the page being received is partly written; page 0 is untouched.
    assert target.view[:PAGE] == pattern(PAGE)
    assert target.view[PAGE : PAGE + 1000] == b"\x42" * 1000


# -- timeouts on a clock that runs ahead of real time ---------------------------------------

CLOCK_NOTE = "of real time: the Trio clock jumped ahead"


async def test_a_delivery_wait_cut_short_by_the_autojump_clock_says_the_clock_jumped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # What a test of a whole transfer under autojump_clock meets: while the receiver's
    # worker threads finish, every task waits and the clock leaps over send_timeout.
    src, _ = block_pair("mem", 1, seed=4)
    _reader, ours = trio.testing.memory_stream_pair()  # read by nobody, never closed

    async def connect(channel: int) -> trio.abc.Stream:
        return ours

    with pytest.raises(m.DeliveryError) as info:
        async with m.open_sender(connect, channels=1) as sender:
            await sender.queue_pages(src, [0])
    assert trio.current_time() == pytest.approx(60.0)
    assert "within 60.0s after the final SYNC (after 0." in str(info.value)
    assert CLOCK_NOTE in str(info.value)


async def test_a_handshake_timeout_on_the_autojump_clock_says_the_clock_jumped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    target = m.RAMBlock("mem", pattern(PAGE))
    _peer, ours = memory_pair()
    with pytest.raises(m.HandshakeTimeoutError) as info:
        async with m.open_receiver([target], channels=1) as receiver:
            await receiver.add_channel(ours)
    assert CLOCK_NOTE in str(info.value)


async def test_a_timeout_that_took_its_time_in_real_time_names_no_clock_jump() -> None:
    target = m.RAMBlock("mem", pattern(PAGE))
    _peer, ours = memory_pair()
    with trio.fail_after(10), pytest.raises(m.HandshakeTimeoutError) as info:
        async with m.open_receiver([target], channels=1, handshake_timeout=0.05) as receiver:
            await receiver.add_channel(ours)
    assert str(info.value) == "no complete handshake within handshake_timeout=0.05s"


# -- cancellation from the application -----------------------------------------------------


async def test_cancelling_while_a_channel_still_connects_closes_the_others() -> None:
    with trio.fail_after(5):
        async with TcpLink.open() as link:

            async def connect(channel: int) -> trio.abc.Stream:
                if channel == 1:
                    await trio.sleep_forever()
                return await link.connect(channel)

            with trio.move_on_after(0.2) as scope:
                async with m.open_sender(connect, channels=2):
                    raise AssertionError("unreachable: channel 1 never connects")
            assert scope.cancelled_caught
            assert len(link.sender_streams) == 1
            assert link.all_closed("sender")


def connect_racing_in_a_nursery(
    link: TcpLink, silent: int
) -> Callable[[int], Awaitable[trio.abc.Stream]]:
    """A ``connect`` whose channel ``silent`` races attempts in a nursery of its own, as
    ``trio.open_tcp_stream`` does, that never succeed: torn down, it ends with a group of
    its attempts' ``Cancelled``."""

    async def connect(channel: int) -> trio.abc.Stream:
        if channel != silent:
            return await link.connect(channel)
        async with trio.open_nursery() as attempts:
            attempts.start_soon(trio.sleep_forever)
            attempts.start_soon(trio.sleep_forever)
        raise AssertionError("unreachable: the attempts never end")

    return connect


async def test_a_failure_while_a_connect_runs_a_nursery_leaves_as_the_transfers_error() -> None:
    # The connect's group of Cancelled was taken for an interrupt, and left the block
    # (ahead of the transfer's error, Cancelled of a scope already exited).
    with trio.fail_after(5):
        async with TcpLink.open() as link:
            # Channel 0 is refused: nothing listens on that port any more.
            refused = socket.socket()
            refused.bind(("127.0.0.1", 0))
            link.route[0] = refused.getsockname()[1]
            refused.close()
            # Not pytest.raises: a stray Cancelled passing it would be absorbed by the
            # test runner's cancelled scopes, and the test pass.
            left: list[BaseException] = []
            try:
                async with m.open_sender(connect_racing_in_a_nursery(link, 1), channels=2):
                    raise AssertionError("unreachable: channel 0 cannot connect")
            except BaseException as exc:
                left.append(exc)
    [error] = left
    assert isinstance(error, m.TransportError), repr(error)
    assert error.channel == 0
    assert "could not connect" in str(error)


async def test_a_cancel_while_a_connect_runs_a_nursery_leaves_as_one_cancelled() -> None:
    left: list[BaseException] = []
    with trio.fail_after(5):
        async with TcpLink.open() as link:
            with trio.move_on_after(0.2) as scope:
                try:
                    async with m.open_sender(connect_racing_in_a_nursery(link, 1), channels=2):
                        raise AssertionError("unreachable: channel 1 never connects")
                except BaseException as exc:
                    left.append(exc)
                    raise
            assert scope.cancelled_caught
            assert link.all_closed("sender")
    assert [type(exc) for exc in left] == [trio.Cancelled]


@pytest.mark.parametrize(
    ("pages", "blocked_in"),
    [
        pytest.param(1024, "queue_pages", id="queue_pages"),  # queue_pages itself blocks
        pytest.param(256, "sync", id="sync"),  # queue_pages returns, sync blocks
    ],
)
async def test_cancelling_a_call_blocked_on_a_stalled_peer_shuts_down(
    pages: int, blocked_in: str
) -> None:
    src, _ = block_pair("mem", pages, seed=4)
    in_sync = False
    with trio.fail_after(5):
        async with stalled_tcp_link() as link:
            # Long enough for a loaded machine to reach the blocking call.
            with trio.move_on_after(1) as scope:
                async with m.open_sender(link.connect, channels=2) as sender:
                    await sender.queue_pages(src, range(0, src.size, PAGE))
                    in_sync = True
                    await sender.sync()
            assert scope.cancelled_caught
            assert in_sync is (blocked_in == "sync")
            assert link.all_closed("sender")


async def test_cancelling_the_sender_exit_waiting_for_confirmation_shuts_down() -> None:
    src, _ = block_pair("mem", 16, seed=4)
    with trio.fail_after(5):
        async with TcpLink.open() as link:

            async def read_but_never_close() -> None:
                stream = await link.accept()
                while await stream.receive_some():
                    pass
                await trio.sleep_forever()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_but_never_close)
                with trio.move_on_after(0.5) as scope:
                    async with m.open_sender(link.connect, channels=1) as sender:
                        await sender.queue_pages(src, range(0, src.size, PAGE))
                assert scope.cancelled_caught
                assert link.all_closed("sender")
                nursery.cancel_scope.cancel()


@pytest.mark.parametrize("stage", ["wait_closed", "sync", "add_channel"])
async def test_cancelling_the_receiver_closes_every_channel_and_fails_the_sender(
    stage: str,
) -> None:
    src, dst = block_pair("mem", 256, seed=5)
    sender_error: BaseException | None = None
    receiver_gone = trio.Event()
    with trio.fail_after(10):
        async with TcpLink.open() as link:

            async def send() -> None:
                nonlocal sender_error
                try:
                    async with m.open_sender(link.connect, channels=2) as sender:
                        await sender.queue_pages(src, range(0, src.size, PAGE))
                        await receiver_gone.wait()
                        await queue_everything([src], sender)
                except m.MultiFDError as exc:
                    sender_error = exc

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                with trio.move_on_after(0.3) as scope:
                    async with m.open_receiver([dst], channels=2) as receiver:
                        await receiver.add_channel(await link.accept())
                        if stage == "add_channel":
                            await receiver.add_channel(await link.raw_connect())  # silent
                        await receiver.add_channel(await link.accept())
                        if stage == "sync":
                            await receiver.sync()
                        await receiver.wait_closed()
                assert scope.cancelled_caught
                assert link.all_closed("receiver")
                receiver_gone.set()
    assert isinstance(sender_error, m.TransportError | m.DeliveryError)


async def test_cancelling_serve_closes_connections_it_accepted() -> None:
    target = m.RAMBlock("mem", pattern(PAGE))
    with trio.fail_after(5):
        async with RecordingListener.open() as listener:
            half = await trio.open_tcp_stream("127.0.0.1", listener.port)
            await half.send_all(handshake()[:10])
            # Long enough for a loaded machine to accept: then the handshake waits.
            with trio.move_on_after(1) as scope:
                async with m.open_receiver([target], channels=2) as receiver:
                    await receiver.serve([listener])
            assert scope.cancelled_caught
            assert len(listener.accepted) == 1
            assert listener.accepted[0].socket.fileno() == -1
            await half.aclose()


# -- KeyboardInterrupt and friends from the application -----------------------------------


class Interrupt(BaseException):
    """A BaseException of the application's own (not Exception, not Cancelled)."""


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, Interrupt])
async def test_an_interrupt_in_the_sender_block_passes_through_and_closes_all(
    exc_type: type[BaseException],
) -> None:
    src, _ = block_pair("mem", 512, seed=6)
    raised = exc_type()
    with trio.fail_after(5):
        async with stalled_tcp_link() as link:
            with pytest.raises(exc_type) as info:
                async with m.open_sender(link.connect, channels=2) as sender:
                    with trio.move_on_after(0.2):  # channels now blocked mid-packet
                        await sender.queue_pages(src, range(0, src.size, PAGE))
                    raise raised
            assert info.value is raised
            assert link.all_closed("sender")


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, Interrupt])
async def test_an_interrupt_in_the_receiver_block_passes_through_and_fails_the_sender(
    exc_type: type[BaseException],
) -> None:
    src, dst = block_pair("mem", 256, seed=7)
    raised = exc_type()
    sender_error: BaseException | None = None
    with trio.fail_after(10):
        async with TcpLink.open() as link:

            async def send() -> None:
                nonlocal sender_error
                try:
                    async with m.open_sender(link.connect, channels=2) as sender:
                        for _ in range(50):
                            await queue_everything([src], sender)
                except m.MultiFDError as exc:
                    sender_error = exc

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                with pytest.raises(exc_type) as info:
                    async with m.open_receiver([dst], channels=2) as receiver:
                        for _ in range(2):
                            await receiver.add_channel(await link.accept())
                        await receiver.sync()
                        raise raised
                assert info.value is raised
                assert link.all_closed("receiver")
    assert isinstance(sender_error, m.TransportError | m.DeliveryError)
    assert link.all_closed("sender")


async def test_an_interrupt_inside_a_nursery_of_the_body_is_not_swallowed() -> None:
    src, _ = block_pair("mem", 16, seed=8)
    with trio.fail_after(5):
        async with stalled_tcp_link() as link:
            with pytest.RaisesGroup(KeyboardInterrupt):
                async with m.open_sender(link.connect, channels=2) as sender:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(sender.queue_pages, src, range(0, src.size, PAGE))
                        raise KeyboardInterrupt
            assert link.all_closed("sender")


class InterruptingStream(TrackedStream):
    """Raises ``raised`` from its ``calls``-th send or receive, as Trio's signal handler
    raises KeyboardInterrupt in whatever code runs: on memory streams every operation of
    the library's runs on the Trio thread."""

    def __init__(self, inner: trio.abc.Stream, raised: BaseException, calls: int) -> None:
        super().__init__(inner)
        self.raised = raised
        self.calls = calls

    def _count(self) -> None:
        self.calls -= 1
        if self.calls == 0:
            raise self.raised

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._count()
        await super().send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self._count()
        return await super().receive_some(max_bytes)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, Interrupt])
async def test_an_interrupt_in_a_sender_channel_task_leaves_the_block_bare(
    exc_type: type[BaseException],
) -> None:
    # Raised in channel 0's first packet while the body waits for room: the teardown
    # woke the body, which was refused with a RuntimeError, or (when the channel's
    # cleanup met the teardown's Cancelled) the interrupt vanished and the block
    # returned normally.
    src, _ = block_pair("mem", 4096, seed=9)
    raised = exc_type()
    streams: list[InterruptingStream] = []

    async def connect(channel: int) -> trio.abc.Stream:
        inner, _reader = trio.testing.memory_stream_pair()
        streams.append(InterruptingStream(inner, raised, calls=2 if channel == 0 else 0))
        return streams[-1]

    with trio.fail_after(10), pytest.raises(exc_type) as info:
        async with m.open_sender(connect, channels=2) as sender:
            await sender.queue_pages(src, range(0, src.size, PAGE))
    assert info.value is raised
    assert all(stream.closed for stream in streams)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, Interrupt])
async def test_an_interrupt_in_a_receiver_channel_task_leaves_the_block_bare(
    exc_type: type[BaseException],
) -> None:
    target = m.RAMBlock("mem", pattern(PAGE))
    peer, ours = trio.testing.memory_stream_pair()
    await peer.send_all(handshake() + packet([0]))
    raised = exc_type()
    stream = InterruptingStream(ours, raised, calls=2)  # the first read after the handshake
    with trio.fail_after(10), pytest.raises(exc_type) as info:
        async with m.open_receiver([target], channels=1) as receiver:
            await receiver.add_channel(stream)
            await receiver.wait_closed()
    assert info.value is raised
    assert stream.closed


class InterruptingListener(trio.abc.Listener[trio.abc.Stream]):
    """A TCP listener whose first accept raises ``raised`` (``at="accept"``), or whose
    first connection raises it from its first receive, in the handshake (``at="handshake"``)."""

    def __init__(self, inner: RecordingListener, raised: BaseException, at: str) -> None:
        self.inner = inner
        self.raised = raised
        self.at = at
        self.streams: list[InterruptingStream] = []

    async def accept(self) -> trio.abc.Stream:
        stream = await self.inner.accept()
        if self.at == "accept":
            await trio.aclose_forcefully(stream)
            raise self.raised
        self.streams.append(InterruptingStream(stream, self.raised, calls=1))
        return self.streams[-1]

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("at", ["handshake", "accept"])
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, Interrupt])
async def test_an_interrupt_in_serves_tasks_leaves_serve_and_the_block_bare(
    exc_type: type[BaseException], at: str
) -> None:
    # serve() raised it inside its nurseries' groups, while add_channel() and a channel
    # task raise it bare.
    target = m.RAMBlock("mem", pattern(PAGE))
    raised = exc_type()
    with trio.fail_after(10):
        async with RecordingListener.open() as tcp:
            listener = InterruptingListener(tcp, raised, at)
            client = await trio.open_tcp_stream("127.0.0.1", tcp.port)
            await client.send_all(handshake())
            with pytest.raises(exc_type) as info:
                async with m.open_receiver([target], channels=1) as receiver:
                    await receiver.serve([listener])
            assert info.value is raised
            assert all(stream.closed for stream in listener.streams)
            assert [stream.socket.fileno() for stream in tcp.accepted] == [-1]
            await client.aclose()


# A sender in a process of its own, which a real SIGINT reaches through Trio's handler:
# it prints "ready" once its caller's task waits inside open_sender's nursery (for
# channel 1, whose host never answers, or at the exit for a receiver that reads everything
# and never confirms), then what left the block and whether its sockets were closed. The
# tasks that print are protected: the signal goes to the main task even if it comes
# while they run.
SIGINTED_SENDER = """
import sys, trio, trio_multifd as m
from trio.lowlevel import enable_ki_protection

async def main(where):
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    streams = []

    @enable_ki_protection
    async def connect(channel):
        if channel == 1:
            print("ready", flush=True)
            await trio.sleep_forever()
        streams.append(await trio.open_tcp_stream("127.0.0.1", port))
        return streams[-1]

    @enable_ki_protection
    async def read_and_never_confirm():
        stream = await listener.accept()
        while await stream.receive_some():
            pass
        print("ready", flush=True)
        await trio.sleep_forever()

    async with listener, trio.open_nursery() as nursery:
        if where == "exit":
            nursery.start_soon(read_and_never_confirm)
        try:
            async with m.open_sender(connect, channels=2 if where == "connect" else 1) as sender:
                await sender.queue_page(m.RAMBlock("mem", bytearray(4096)), 0)
        except BaseException as exc:
            closed = all(stream.socket.fileno() == -1 for stream in streams)
            print(type(exc).__name__, "closed" if closed else "left open", flush=True)
        nursery.cancel_scope.cancel()

trio.run(main, sys.argv[1])
"""


@pytest.mark.parametrize("where", ["connect", "exit"])
async def test_ctrl_c_while_the_caller_waits_in_open_sender_leaves_the_block_bare(
    where: str,
) -> None:
    # Trio raises a SIGINT that comes while every task waits in the main task: there
    # inside the sender's nursery, outside the body, which put it in the nursery's group.
    with trio.fail_after(20):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", SIGINTED_SENDER, where], stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        try:
            output = b""
            while b"ready" not in output:
                chunk = await proc.stdout.receive_some()
                assert chunk, output
                output += chunk
            proc.send_signal(signal.SIGINT)
            while chunk := await proc.stdout.receive_some():
                output += chunk
            assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
            await proc.stdout.aclose()
    assert output.decode().splitlines() == ["ready", "KeyboardInterrupt closed"]


# Another process (it has descriptors of its own) opens silent connections, holds them
# for a while, and exits.
SILENT_FLOOD = """
import socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
time.sleep(1.5)
"""


async def test_serve_outlives_a_flood_that_takes_every_descriptor_and_serves_after_it() -> None:
    src, dst = block_pair("mem", 64)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with trio.fail_after(30):
        async with RecordingListener.open() as listener:

            async def connect(channel: int) -> trio.abc.Stream:
                return await trio.open_tcp_stream("127.0.0.1", listener.port)

            async with m.open_receiver(
                [dst], channels=2, uuid=TRANSFER_UUID, handshake_timeout=0.5
            ) as receiver:
                async with trio.open_nursery() as nursery:
                    await nursery.start(receiver.serve, [listener])
                    flood = await trio.lowlevel.open_process(
                        [sys.executable, "-c", SILENT_FLOOD, str(listener.port), "40"]
                    )
                    # Room for ten of the flood's connections, each of which holds two
                    # descriptors (its socket and the worker thread's duplicate).
                    resource.setrlimit(
                        resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 20, hard)
                    )
                    try:
                        assert await flood.wait() == 0
                    finally:
                        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                        if flood.returncode is None:
                            flood.kill()
                            with trio.CancelScope(shield=True):
                                await flood.wait()
                    async with m.open_sender(connect, channels=2, uuid=TRANSFER_UUID) as sender:
                        await queue_everything([src], sender)
                await receiver.wait_closed()
        # Accepting paused while the descriptors were gone, and went on.
        assert len(listener.accepted) > 10
    assert dst.view == src.view


async def test_serve_reads_at_most_accept_limit_connections_at_once() -> None:
    async def until(condition: Callable[[], bool]) -> None:
        for _ in range(1000):
            if condition():
                return
            await trio.sleep(0.01)
        raise AssertionError("not in 10 s")

    clients: list[trio.SocketStream] = []
    try:
        with trio.fail_after(30):
            async with RecordingListener.open() as listener:
                with trio.CancelScope() as everything:
                    async with m.open_receiver(
                        [m.RAMBlock("mem", bytearray(PAGE))], channels=1, handshake_timeout=60
                    ) as receiver:
                        async with trio.open_nursery() as nursery:
                            await nursery.start(receiver.serve, [listener])
                            for _ in range(ACCEPT_LIMIT + 6):
                                clients.append(
                                    await trio.open_tcp_stream("127.0.0.1", listener.port)
                                )
                            await until(lambda: len(listener.accepted) >= ACCEPT_LIMIT)
                            await trio.sleep(0.2)
                            # The rest wait in the listen queue.
                            assert len(listener.accepted) == ACCEPT_LIMIT
                            # Two end inside their handshake: two more are read.
                            for client in clients[:2]:
                                await client.aclose()
                            await until(lambda: len(listener.accepted) == ACCEPT_LIMIT + 2)
                            await trio.sleep(0.2)
                            assert len(listener.accepted) == ACCEPT_LIMIT + 2
                            everything.cancel()
                assert everything.cancelled_caught
    finally:
        for client in clients:
            await client.aclose()


async def test_a_socket_that_cannot_be_duplicated_is_a_transport_error_and_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def out_of_descriptors(fd: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    async with TcpLink.open() as link:
        stream = await trio.open_tcp_stream("127.0.0.1", link.port)
        monkeypatch.setattr(os, "dup", out_of_descriptors)
        with pytest.raises(m.TransportError, match="Too many open files") as raised:
            _transport.open_transport(stream, channel=3)
        assert raised.value.channel == 3
        assert stream.socket.fileno() == -1
