"""Worker threads shared by channels (``io_threads``): every page lands whatever the
split, channels join a running thread, and a failure names its own channel."""

from __future__ import annotations

import random
import socket
import struct
import uuid
from typing import Any

import pytest
import trio

import trio_multifd as m
from trio_multifd._transport import SocketTransport, Turns, open_transport

from .helpers import PAGE, TrackedStream, block_pair, pattern, run_both_ends, shuffled
from .proxy import TamperStream, TcpLink, damaged_pages, run_faulty_transfer
from .test_engine import handshake, make_packet, sync_packet
from .transfer import listening, transfer


@pytest.mark.parametrize("option", ["channels", "io_threads"])
@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (256, ValueError), (1.5, TypeError), ("2", TypeError), (True, TypeError)],
)
async def test_a_count_outside_1_to_255_or_not_an_int_is_refused_at_open(
    option: str, value: Any, error: type[Exception]
) -> None:
    _, dst = block_pair("mem", 1)

    async def never(channel: int) -> trio.abc.Stream:
        raise AssertionError("must not connect")

    with pytest.raises(error, match=option):
        async with m.open_sender(never, **{option: value}):
            pass
    with pytest.raises(error, match=option):
        async with m.open_receiver([dst], **{option: value}):
            pass


async def test_a_uuid_that_is_no_uuid_is_a_type_error_at_either_end() -> None:
    _, dst = block_pair("mem", 1)

    async def never(channel: int) -> trio.abc.Stream:
        raise AssertionError("must not connect")

    text = str(uuid.uuid4())  # the common slip: a UUID's text
    with pytest.raises(TypeError, match=r"uuid must be a uuid\.UUID or None, got str"):
        async with m.open_sender(never, uuid=text):  # type: ignore[arg-type]
            pass
    with pytest.raises(TypeError, match=r"uuid must be a uuid\.UUID or None, got str"):
        async with m.open_receiver([dst], uuid=text):  # type: ignore[arg-type]
            pass


async def test_an_unknown_zero_page_detection_is_refused_at_open() -> None:
    async def never(channel: int) -> trio.abc.Stream:
        raise AssertionError("must not connect")

    with pytest.raises(ValueError, match=r"zero_page_detection must be one of .*got 'legacy'"):
        async with m.open_sender(never, zero_page_detection="legacy"):
            pass


async def test_open_receiver_refuses_a_target_that_is_no_ramblock() -> None:
    with pytest.raises(TypeError, match="blocks must be RAMBlock, got bytearray"):
        async with m.open_receiver([bytearray(PAGE)]):  # type: ignore[list-item]
            pass


async def test_a_receiver_lists_its_target_blocks_in_the_order_given() -> None:
    b, a = m.RAMBlock("b", bytearray(PAGE)), m.RAMBlock("a", bytearray(PAGE))
    async with m.open_receiver([b, a]) as receiver:
        assert receiver.blocks == (b, a)


@pytest.mark.parametrize("page_size", [4096.0, "4096", True])
async def test_a_page_size_that_is_not_an_int_is_a_type_error_at_open(page_size: Any) -> None:
    async def never(channel: int) -> trio.abc.Stream:
        raise AssertionError("must not connect")

    with pytest.raises(TypeError, match="page_size must be an integer"):
        async with m.open_sender(never, page_size=page_size):
            pass


@pytest.mark.parametrize("option", ["send_timeout", "handshake_timeout", "receive_timeout"])
@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (float("nan"), ValueError),
        ("5", TypeError),
        (True, TypeError),
    ],
)
async def test_a_timeout_not_a_positive_number_of_seconds_is_refused_at_open(
    option: str, value: Any, error: type[Exception]
) -> None:
    _, dst = block_pair("mem", 1)

    async def never(channel: int) -> trio.abc.Stream:
        raise AssertionError("must not connect")

    with pytest.raises(error, match=option):
        if option == "send_timeout":
            async with m.open_sender(never, send_timeout=value):
                pass
        else:
            async with m.open_receiver([dst], **{option: value}):
                pass


async def test_a_timeout_may_be_any_float_such_as_numpys() -> None:
    import numpy as np

    src, dst = block_pair("mem", 40, seed=3)

    async def body(sender: m.Sender) -> None:
        await sender.queue_pages(src, range(0, src.size, PAGE))

    with trio.fail_after(30):
        await transfer(
            [src],
            [dst],
            body,
            sender_options={"send_timeout": np.float64(30)},
            receiver_options={"receive_timeout": np.float32(30)},
        )
    assert dst.view == src.view


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize(("sender_threads", "receiver_threads"), [(1, 1), (1, 5), (5, 1), (2, 3)])
async def test_every_page_lands_however_channels_share_threads(
    sender_threads: int, receiver_threads: int, compression: str
) -> None:
    src, dst = block_pair("mem", 900, seed=7)
    rng = random.Random(3)

    async def body(sender: m.Sender) -> None:
        for round_number in range(1, 4):
            pages = rng.sample(range(900), 300)
            for page in pages:
                src.view[page * PAGE : page * PAGE + 8] = round_number.to_bytes(8, "big")
            await sender.queue_pages(src, shuffled([p * PAGE for p in pages], round_number))
            assert await sender.sync() == round_number
        await sender.queue_pages(src, range(0, src.size, PAGE))

    with trio.fail_after(30):
        sent, received, rounds = await transfer(
            [src],
            [dst],
            body,
            channels=5,
            compression=compression,
            sender_options={"io_threads": sender_threads},
            receiver_options={"io_threads": receiver_threads},
        )
    assert dst.view == src.view
    assert rounds == [1, 2, 3, 4]
    assert sent.pages == received.pages == 3 * 300 + 900
    assert all(channel.syncs == 4 for channel in received.channels)


async def test_a_channel_that_joins_a_running_thread_late_is_served() -> None:
    # One receiving thread for both channels: it starts with the first, reads it up to
    # its SYNC, and must take in the second when it comes.
    src, dst = block_pair("mem", 512, seed=8)

    async def send(link: TcpLink) -> None:
        async with m.open_sender(link.connect, channels=2, io_threads=2) as sender:
            await sender.queue_pages(src, range(0, src.size, PAGE))
            await sender.sync()

    async def receive(link: TcpLink) -> None:
        async with m.open_receiver([dst], channels=2, io_threads=1) as receiver:
            await receiver.add_channel(await link.accept())
            await trio.sleep(0.2)
            await receiver.add_channel(await link.accept())
            await receiver.wait_closed()
        assert receiver.rounds_completed == 2

    with trio.fail_after(10):
        async with TcpLink.open() as link:
            errors = await run_both_ends(lambda: send(link), lambda: receive(link))
    assert errors == (None, None)
    assert dst.view == src.view


@pytest.mark.parametrize("io_threads", [1, 3])
async def test_a_bad_packet_on_a_shared_thread_names_its_own_channel(io_threads: int) -> None:
    # Channel 2 is not the one whose task runs the shared thread.
    src, dst = block_pair("mem", 600, seed=9)

    def break_magic(raw: bytearray, parsed: m.PacketHeader) -> bool:
        raw[0] ^= 0xFF
        return True

    def wrap(channel: int, stream: trio.abc.Stream) -> trio.abc.Stream:
        return TamperStream(stream, header=break_magic) if channel == 2 else stream

    with trio.fail_after(10):
        async with TcpLink.open(wrap) as link:
            outcome = await run_faulty_transfer(
                link,
                [src],
                [dst],
                channels=3,
                sender_options={"io_threads": io_threads},
                receiver_options={"io_threads": io_threads},
            )
    assert type(outcome.receiver) is m.MagicError, repr(outcome.receiver)
    assert outcome.receiver.channel == 2
    assert isinstance(outcome.sender, m.MultiFDError)
    assert outcome.sender_closed and outcome.receiver_closed
    assert not damaged_pages(src.view, dst.view)


@pytest.mark.parametrize("io_threads", [1, 2])
async def test_a_sender_thread_waiting_on_one_channel_notices_a_reset_of_another(
    io_threads: int,
) -> None:
    # The receiver takes channel 0 and reads nothing; channel 1's peer resets. The
    # sending thread, stuck waiting for room on channel 0, must fail with channel 1's
    # error well before its send_timeout.
    src, _ = block_pair("mem", 4096, seed=10)

    async def send(link: TcpLink) -> None:
        async with m.open_sender(
            link.connect, channels=2, io_threads=io_threads, send_timeout=30
        ) as sender:
            await sender.queue_pages(src, range(0, src.size, PAGE))
            await sender.sync()

    async def receive(link: TcpLink) -> None:
        by_channel = {}
        for _ in range(2):
            stream = await link.accept()
            handshake = bytearray()
            while len(handshake) < m.HANDSHAKE_SIZE:
                handshake += await stream.receive_some(m.HANDSHAKE_SIZE - len(handshake))
            by_channel[m.decode_handshake(handshake, channels=2).channel_id] = stream
        await trio.sleep(0.3)  # the sender fills channel 0's buffers meanwhile
        reset = by_channel[1]
        assert isinstance(reset, trio.SocketStream)
        reset.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0))
        await reset.aclose()
        await trio.sleep_forever()

    with trio.fail_after(5):
        async with TcpLink.open() as link:
            link.sndbuf = 32 * 1024
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive, link)
                with pytest.raises(m.TransportError) as info:
                    await send(link)
                nursery.cancel_scope.cancel()
            assert link.all_closed("sender")
    assert info.value.channel == 1


@pytest.mark.parametrize("io_threads", [1, 2])
async def test_a_channel_reset_while_parked_at_sync_fails_the_receiver_at_once(
    io_threads: int,
) -> None:
    # Channels 0 and 1 reach SYNC 1 and wait there for channel 2, which never comes.
    # The sender then resets channel 0: the receiver must fail now, naming channel 0,
    # not wait for a round that cannot complete.
    _, dst = block_pair("mem", 4)
    with trio.fail_after(5):
        async with TcpLink.open() as link:
            with pytest.raises(m.TransportError) as info:
                async with m.open_receiver([dst], channels=3, io_threads=io_threads) as receiver:
                    streams = {}
                    for channel in (0, 1):
                        stream = await link.raw_connect()
                        await stream.send_all(handshake(channel) + sync_packet())
                        await receiver.add_channel(await link.accept())
                        streams[channel] = stream
                    # The worker thread counts SYNC packets as it parks their channels;
                    # there is no event for it to set.
                    while sum(c.syncs for c in receiver.stats.channels) < 2:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    streams[0].setsockopt(
                        trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    await streams[0].aclose()
                    await receiver.wait_closed()
            assert link.all_closed("receiver")
    assert info.value.channel == 0


async def test_a_parked_channel_reset_while_its_thread_still_reads_another_fails_at_once() -> None:
    # One thread for both channels: channel 0 waits at SYNC 1, channel 1 is still read
    # (it sent its handshake only), so the thread blocks in its wait on both. A reset of
    # channel 0 must fail the receiver now, naming channel 0, not once channel 1 speaks.
    _, dst = block_pair("mem", 4)
    with trio.fail_after(5):
        async with TcpLink.open() as link:
            with pytest.raises(m.TransportError) as info:
                async with m.open_receiver([dst], channels=2, io_threads=1) as receiver:
                    parked = await link.raw_connect()
                    await parked.send_all(handshake(0) + sync_packet())
                    await receiver.add_channel(await link.accept())
                    quiet = await link.raw_connect()
                    await quiet.send_all(handshake(1))
                    await receiver.add_channel(await link.accept())
                    while receiver.stats.channels[0].syncs < 1:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    parked.setsockopt(
                        trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    await parked.aclose()
                    await receiver.wait_closed()
            assert link.all_closed("receiver")
    assert info.value.channel == 0
    assert "waiting at SYNC 1" in str(info.value)
    assert "waiting at SYNC 1" in str(info.value)


@pytest.mark.parametrize("io_threads", [1, 2])
async def test_a_unix_channel_closed_at_its_sync_by_a_sender_without_in_band_end_completes(
    io_threads: int,
) -> None:
    # QEMU closes each channel once it has written everything. Channel 0 is closed
    # while it waits at SYNC 1 for channel 1, connected but silent until later: on a Unix
    # socket that close is a hang-up to poll (with one thread, in the same wait as channel
    # 1's reads), and it must not pass for the sender's failure.
    pages = [bytes([channel + 1]) * PAGE for channel in (0, 1)]
    target = pattern(2 * PAGE)

    def packets(channel: int) -> bytes:
        return make_packet("mem", {channel * PAGE: pages[channel]}) + sync_packet(num=1)

    with trio.fail_after(5):
        async with m.open_receiver(
            [m.RAMBlock("mem", target)], channels=2, io_threads=io_threads
        ) as receiver:
            senders = []
            for channel in (1, 0):
                theirs, ours = trio.socket.socketpair(socket.AF_UNIX)
                senders.append(trio.SocketStream(theirs))
                await senders[-1].send_all(handshake(channel))
                await receiver.add_channel(trio.SocketStream(ours))
            late, early = senders
            await early.send_all(packets(0))
            await early.aclose()
            # Channel 0 parks at its SYNC, then hangs up, while channel 1 waits.
            while receiver.stats.channels[0].syncs < 1:  # noqa: ASYNC110
                await trio.sleep(0.01)
            await trio.sleep(0.1)
            await late.send_all(packets(1))
            await late.aclose()
            await receiver.wait_closed()
            assert receiver.rounds_completed == 1
    assert target == b"".join(pages)


async def test_a_unix_channel_that_announced_its_in_band_end_hanging_up_at_a_sync_fails() -> None:
    # Its end comes in band, so a close before it is the sender's failure, found while
    # the channel waits at SYNC 1 for channel 1, which never comes.
    announced = m.Handshake(uuid=uuid.UUID(int=7), channel_id=0, features=m.Feature.IN_BAND_END)
    with trio.fail_after(5):
        with pytest.raises(m.TransportError) as info:
            async with m.open_receiver([m.RAMBlock("mem", pattern(PAGE))], channels=2) as receiver:
                theirs, ours = trio.socket.socketpair(socket.AF_UNIX)
                sender = trio.SocketStream(theirs)
                await sender.send_all(m.encode_handshake(announced) + sync_packet(num=1))
                await sender.aclose()
                await receiver.add_channel(trio.SocketStream(ours))
                await receiver.wait_closed()
    assert info.value.channel == 0
    assert "hung up while waiting at SYNC 1" in str(info.value)


async def test_a_sending_thread_passes_over_a_channel_without_room() -> None:
    pairs = [socket.socketpair() for _ in range(3)]
    transports = [
        open_transport(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), channel=channel)
        for channel, (ours, _) in enumerate(pairs)
    ]
    try:
        full = transports[1]
        assert isinstance(full, SocketTransport) and full.sync_sock is not None
        with pytest.raises(BlockingIOError):
            while True:
                full.sync_sock.send(bytes(65536))
        turns = Turns([(t, t.channel) for t in transports])
        assert [turns.next() for _ in range(4)] == [0, 2, 0, 2]
        peer = pairs[1][1]
        peer.setblocking(False)
        with pytest.raises(BlockingIOError):
            while True:  # the peer reads: channel 1 has room again and gets its turn
                peer.recv(1 << 20)
        assert [turns.next() for _ in range(3)] == [0, 1, 2]
    finally:
        for transport in transports:
            await transport.aclose()
        for _, theirs in pairs:
            theirs.close()


@pytest.mark.skipif(
    not hasattr(socket, "TCP_NOTSENT_LOWAT"), reason="the platform has no TCP_NOTSENT_LOWAT"
)
@pytest.mark.parametrize(("compression", "lifted"), [("none", False), ("zstd", True)])
async def test_a_compressing_sender_lifts_trios_cap_on_unsent_bytes(
    compression: str, lifted: bool
) -> None:
    # Trio caps every SocketStream's unsent bytes (16 KiB today); 0 is no cap.
    src, dst = block_pair("mem", 64)
    streams: list[trio.SocketStream] = []
    async with m.open_receiver([dst], channels=2, compression=compression) as receiver:
        async with trio.open_nursery() as nursery, listening("tcp") as (listeners, connect):
            await nursery.start(receiver.serve, listeners)

            async def recording(channel: int) -> trio.abc.Stream:
                stream = await connect(channel)
                assert isinstance(stream, trio.SocketStream)
                streams.append(stream)
                return stream

            async with m.open_sender(recording, channels=2, compression=compression) as sender:
                await sender.queue_pages(src, range(0, src.size, PAGE))
                caps = [
                    struct.unpack(
                        "i", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 4)
                    )[0]
                    for s in streams
                ]
            await receiver.wait_closed()
    assert [c == 0 for c in caps] == [lifted, lifted]
    assert dst.view == src.view


@pytest.mark.parametrize(("compression", "threads"), [("none", 2), ("zstd", 4), ("zlib", 4)])
async def test_a_receiver_has_a_thread_per_core_with_compression(
    monkeypatch: pytest.MonkeyPatch, compression: str, threads: int
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    _, dst = block_pair("mem", 1)
    async with m.open_receiver([dst], channels=8, compression=compression) as receiver:
        assert receiver._io_threads == threads


class _SocketExposingStream(TrackedStream):
    """An application's wrapper of a TCP stream that also exposes the socket beneath
    (to read its options, say)."""

    def __init__(self, inner: trio.SocketStream) -> None:
        super().__init__(inner)
        self.socket = inner.socket


async def test_a_wrapper_exposing_its_socket_still_carries_every_packet() -> None:
    # The fast path is for a SocketStream itself: taking it for any stream with a
    # .socket would send the packets around the wrapper (its counting, limiting or
    # transforming), the handshake alone through it.
    src, dst = block_pair("mem", 64, seed=4)
    wrappers: list[_SocketExposingStream] = []
    with trio.fail_after(20):
        async with listening("tcp") as (listeners, connect_tcp):

            async def connect(channel: int) -> trio.abc.Stream:
                stream = await connect_tcp(channel)
                assert isinstance(stream, trio.SocketStream)
                wrappers.append(_SocketExposingStream(stream))
                return wrappers[-1]

            async with m.open_receiver([dst], channels=1) as receiver:
                async with trio.open_nursery() as nursery:
                    await nursery.start(receiver.serve, listeners)
                    async with m.open_sender(connect, channels=1) as sender:
                        await sender.queue_pages(src, range(0, src.size, PAGE))
                await receiver.wait_closed()
    assert bytes(dst.view) == bytes(src.view)
    [wrapper] = wrappers
    data_pages = sum(any(src.view[o : o + PAGE]) for o in range(0, src.size, PAGE))
    assert wrapper.sent > data_pages * PAGE
