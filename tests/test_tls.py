"""Channels over TLS (``trio.SSLStream``), certificates from ``trustme``."""

from __future__ import annotations

import errno
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
import trustme

import trio_multifd as m

from .helpers import PAGE, block_pair, pattern, run_both_ends


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("multifd.test").configure_cert(context)
    return context


def client_context(ca: trustme.CA | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca is not None:
        ca.configure_trust(context)
    return context


@asynccontextmanager
async def tls_listener(
    ca: trustme.CA, *, hostname: str = "multifd.test", trusted: bool = True
) -> AsyncIterator[
    tuple[list[trio.SSLListener[trio.SocketStream]], Callable[[int], Awaitable[trio.abc.Stream]]]
]:
    tcp = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = tcp[0].socket.getsockname()[1]
    listeners = [trio.SSLListener(tcp[0], server_context(ca))]
    client = client_context(ca if trusted else None)

    async def connect(channel: int) -> trio.abc.Stream:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        return trio.SSLStream(stream, client, server_hostname=hostname)

    try:
        yield listeners, connect
    finally:
        await tcp[0].aclose()


async def run(
    ca: trustme.CA,
    *,
    hostname: str = "multifd.test",
    trusted: bool = True,
    receiver_block: str = "mem",
) -> tuple[BaseException | None, BaseException | None, m.RAMBlock, m.RAMBlock]:
    src, dst = block_pair("mem", 200, seed=2)
    target = m.RAMBlock(receiver_block, dst.view)
    async with tls_listener(ca, hostname=hostname, trusted=trusted) as (listeners, connect):

        async def receive() -> None:
            async with m.open_receiver([target], channels=2, handshake_timeout=5) as r:
                # add_channel: a failed TLS handshake fails the transfer (serve would
                # log it and keep accepting).
                for _ in range(2):
                    await r.add_channel(await listeners[0].accept())
                await r.wait_closed()

        async def send() -> None:
            async with m.open_sender(connect, channels=2, send_timeout=5) as sender:
                await sender.queue_pages(src, range(0, src.size, PAGE))
                await sender.sync()

        sender_error, receiver_error = await run_both_ends(send, receive)
    return sender_error, receiver_error, src, dst


async def test_transfer_over_tls_lands_every_page_and_confirms_delivery(ca: trustme.CA) -> None:
    with trio.fail_after(20):
        sender_error, receiver_error, src, dst = await run(ca)
    assert sender_error is None
    assert receiver_error is None
    assert dst.view == src.view


async def test_tls_sender_learns_of_a_receiver_failure(ca: trustme.CA) -> None:
    with trio.fail_after(20):
        sender_error, receiver_error, _, dst = await run(ca, receiver_block="other")
    assert isinstance(receiver_error, m.UnknownBlockError)
    assert isinstance(sender_error, m.MultiFDError)
    assert dst.view == pattern(dst.size)


@pytest.mark.parametrize(
    ("hostname", "trusted"), [("wrong.example", True), ("multifd.test", False)]
)
async def test_bad_certificate_fails_both_sides_and_writes_nothing(
    ca: trustme.CA, hostname: str, trusted: bool
) -> None:
    with trio.fail_after(20):
        sender_error, receiver_error, _, dst = await run(ca, hostname=hostname, trusted=trusted)
    assert isinstance(sender_error, m.TransportError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(sender_error)
    assert isinstance(receiver_error, m.TransportError)
    assert "TLS handshake failed" in str(receiver_error)
    assert dst.view == pattern(dst.size)


async def test_an_https_compatible_tls_stream_is_refused_by_the_sender(ca: trustme.CA) -> None:
    # It reads a killed receiver's bare TCP close (no close_notify) as a clean end of
    # stream, which would pass for the receiver's confirmation of delivery.
    async with tls_listener(ca) as (_, connect):
        opened: list[trio.SSLStream[trio.abc.Stream]] = []

        async def lenient(channel: int) -> trio.abc.Stream:
            strict = await connect(channel)
            assert isinstance(strict, trio.SSLStream)
            stream = trio.SSLStream(
                strict.transport_stream,
                client_context(ca),
                server_hostname="multifd.test",
                https_compatible=True,
            )
            opened.append(stream)
            return stream

        with (
            trio.fail_after(10),
            pytest.raises(m.TransportError, match="https_compatible") as info,
        ):
            async with m.open_sender(lenient, channels=1):
                pass
    assert info.value.channel == 0
    tcp = [stream.transport_stream for stream in opened]
    assert all(isinstance(s, trio.SocketStream) and s.socket.fileno() == -1 for s in tcp)


async def test_an_https_compatible_tls_stream_or_listener_is_refused_by_the_receiver(
    ca: trustme.CA,
) -> None:
    # Its close sends no close_notify: a strict sender could never get its confirmation.
    async with tls_listener(ca) as (listeners, _):
        lenient_listener = trio.SSLListener(
            listeners[0].transport_listener, server_context(ca), https_compatible=True
        )
        left, right = trio.testing.memory_stream_pair()
        lenient_stream = trio.SSLStream(
            left, server_context(ca), server_side=True, https_compatible=True
        )
        with trio.fail_after(10), trio.CancelScope() as leave:
            async with m.open_receiver([m.RAMBlock("mem", pattern(PAGE))], channels=1) as r:
                with pytest.raises(ValueError, match="https_compatible"):
                    await r.serve([lenient_listener])
                with pytest.raises(ValueError, match="https_compatible"):
                    await r.add_channel(lenient_stream)
                leave.cancel()  # no sender will come
        with pytest.raises(trio.ClosedResourceError):
            await left.send_all(b"x")  # add_channel closed the stream it refused
        await right.aclose()


class _ResetStream(trio.abc.Stream):
    """An application's stream over a raw socket: its errors are OSErrors (a
    trio.SocketStream would have translated them), which SSLStream passes through."""

    def __init__(self) -> None:
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


async def test_an_oserror_in_the_tls_handshake_is_a_transport_error_of_add_channel(
    ca: trustme.CA,
) -> None:
    broken = _ResetStream()
    with (
        trio.fail_after(10),
        pytest.raises(m.TransportError, match="TLS handshake failed") as info,
    ):
        async with m.open_receiver([m.RAMBlock("mem", pattern(PAGE))], channels=1) as receiver:
            with pytest.raises(m.TransportError, match="ConnectionResetError"):
                await receiver.add_channel(
                    trio.SSLStream(broken, server_context(ca), server_side=True)
                )
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert broken.closed


class _FirstOneBroken(trio.abc.Listener[trio.abc.Stream]):
    """Hands out a :class:`_ResetStream` first, then the connections of ``inner``."""

    def __init__(self, inner: trio.abc.Listener[trio.SocketStream]) -> None:
        self.inner = inner
        self.broken: _ResetStream | None = None

    async def accept(self) -> trio.abc.Stream:
        if self.broken is None:
            await trio.lowlevel.checkpoint()
            self.broken = _ResetStream()
            return self.broken
        return await self.inner.accept()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_serve_refuses_a_connection_whose_tls_handshake_raises_oserror_and_goes_on(
    ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    src, dst = block_pair("mem", 200, seed=3)
    async with tls_listener(ca) as (listeners, connect):
        listener = _FirstOneBroken(listeners[0].transport_listener)
        with caplog.at_level(logging.WARNING, logger="trio_multifd"), trio.fail_after(20):
            async with m.open_receiver([dst], channels=2) as receiver:
                async with trio.open_nursery() as nursery:
                    await nursery.start(
                        receiver.serve, [trio.SSLListener(listener, server_context(ca))]
                    )
                    async with m.open_sender(connect, channels=2) as sender:
                        await sender.queue_pages(src, range(0, src.size, PAGE))
                await receiver.wait_closed()
    assert dst.view == src.view
    assert listener.broken is not None and listener.broken.closed
    assert any(
        "TLS handshake failed: ConnectionResetError" in r.getMessage() for r in caplog.records
    )


async def test_a_receiver_that_never_answers_the_tls_handshake_stalls_the_senders_handshake(
    ca: trustme.CA,
) -> None:
    # The SSLStream's handshake runs inside the sender's first send: send_timeout bounds
    # it, and the error says it was the handshake, not a packet, that did not go out.
    async with tls_listener(ca) as (listeners, connect):
        with trio.fail_after(10), pytest.raises(m.SendStalledError) as info:
            async with m.open_sender(connect, channels=1, send_timeout=0.5):
                raise AssertionError("unreachable: the channel never came up")
        silent = await listeners[0].transport_listener.accept()
        with pytest.raises(trio.BrokenResourceError):  # the ClientHello, then a reset
            while await silent.receive_some():
                pass
        await silent.aclose()
    assert info.value.channel == 0
    assert "sending the TLS and multifd handshakes took longer than send_timeout=0.5s" in str(
        info.value
    )


async def test_a_failed_sender_over_tls_without_a_reset_is_named_by_its_failure_signal(
    ca: trustme.CA,
) -> None:
    # Memory streams (as Unix sockets) have no reset: the failing sender writes its
    # failure byte, then closes without close_notify, which TLS reports as an error of
    # the read, not as the end that follows the byte on a plain stream.
    src, dst = block_pair("mem", 128, seed=4)
    ours, theirs = trio.testing.memory_stream_pair()
    receiver_errors: list[m.MultiFDError] = []

    async def connect(channel: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        return trio.SSLStream(ours, client_context(ca), server_hostname="multifd.test")

    async def receive() -> None:
        try:
            async with m.open_receiver([dst], channels=1) as receiver:
                await receiver.add_channel(
                    trio.SSLStream(theirs, server_context(ca), server_side=True)
                )
                await receiver.wait_closed()
        except m.MultiFDError as exc:
            receiver_errors.append(exc)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            with pytest.raises(KeyError):
                async with m.open_sender(connect, channels=1) as sender:
                    await sender.queue_pages(src, range(0, src.size, PAGE))
                    await sender.sync()
                    raise KeyError("the application failed")
    [error] = receiver_errors
    assert isinstance(error, m.TransportError)
    assert error.channel == 0
    assert error.message == (
        "the sender failed or was cancelled: it wrote its failure signal and closed the channel"
    )
    assert dst.view == src.view  # round 1 landed whole before the failure


@pytest.mark.parametrize(
    ("sender_tls", "hint"),
    [
        (True, "(a TLS ClientHello: the sender uses TLS, this receiver does not)"),
        (False, "(the peer does not speak TLS: does the sender use it?)"),
    ],
    ids=["tls-sender-plain-receiver", "plain-sender-tls-receiver"],
)
async def test_tls_on_one_end_only_is_named_at_the_receiver(
    ca: trustme.CA, sender_tls: bool, hint: str
) -> None:
    src, dst = block_pair("mem", 8, seed=5)
    tcp = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = tcp.socket.getsockname()[1]

    async def connect(channel: int) -> trio.abc.Stream:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        if sender_tls:
            return trio.SSLStream(stream, client_context(ca), server_hostname="multifd.test")
        return stream

    async def receive() -> None:
        async with m.open_receiver([dst], channels=1) as receiver:
            stream: trio.abc.Stream = await tcp.accept()
            if not sender_tls:
                stream = trio.SSLStream(stream, server_context(ca), server_side=True)
            await receiver.add_channel(stream)
            await receiver.wait_closed()

    async def send() -> None:
        async with m.open_sender(connect, channels=1) as sender:
            await sender.queue_pages(src, range(0, src.size, PAGE))

    async with tcp:
        with trio.fail_after(20):
            sender_error, receiver_error = await run_both_ends(send, receive)
    assert isinstance(receiver_error, m.MagicError if sender_tls else m.TransportError)
    assert str(receiver_error).endswith(hint)
    assert isinstance(sender_error, m.TransportError)
    assert sender_error.channel == 0
    assert dst.view == pattern(dst.size)


@pytest.mark.parametrize("close_notify", [True, False], ids=["close-notify", "bare-tcp-close"])
async def test_without_in_band_end_only_a_close_notify_ends_a_tls_channel(
    ca: trustme.CA, close_notify: bool
) -> None:
    # A sender that does not announce IN_BAND_END (QEMU) ends a channel by closing it
    # after its last SYNC. Over TLS only the close_notify says that the peer closed; a
    # bare TCP close (a cut by the network, a killed peer) may have dropped packets.
    page = pattern(PAGE)
    page[:5] = b"page!"
    dst = m.RAMBlock("mem", pattern(4 * PAGE))
    handshake = m.encode_handshake(m.Handshake(uuid=uuid.uuid4(), channel_id=0))
    pages = m.PacketHeader(
        flags=0,
        pages_alloc=128,
        normal_pages=1,
        next_packet_size=PAGE,
        packet_num=0,
        block_name="mem",
        offsets=(2 * PAGE,),
    )
    sync = m.PacketHeader(
        flags=m.Flag.SYNC, pages_alloc=128, normal_pages=0, next_packet_size=0, packet_num=1
    )
    sent = handshake + m.encode_packet_header(pages) + page + m.encode_packet_header(sync)
    async with tls_listener(ca) as (listeners, connect):
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def peer() -> None:
                    stream = await connect(0)
                    assert isinstance(stream, trio.SSLStream)
                    await stream.send_all(sent)
                    if close_notify:
                        await stream.aclose()
                    else:
                        await stream.transport_stream.aclose()

                nursery.start_soon(peer)
                if close_notify:
                    async with m.open_receiver([dst], channels=1) as receiver:
                        await receiver.add_channel(await listeners[0].accept())
                        await receiver.wait_closed()
                else:
                    with pytest.raises(
                        m.TransportError, match="while receiving a packet header"
                    ) as info:
                        async with m.open_receiver([dst], channels=1) as receiver:
                            await receiver.add_channel(await listeners[0].accept())
                            await receiver.wait_closed()
                    assert info.value.channel == 0
    expected = pattern(4 * PAGE)
    expected[2 * PAGE : 3 * PAGE] = page
    assert dst.view == expected
