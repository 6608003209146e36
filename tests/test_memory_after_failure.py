"""What a failed or cancelled transfer leaves behind once the application dropped its
error: nothing that waits for the cyclic garbage collector.

Each test runs with the collector disabled (an application may tune or freeze it), so
anything a reference cycle holds stays, and watches the ends and their channels' state
(payload and header buffers, coders: private) through weak references.
"""

from __future__ import annotations

import gc
import os
import socket
import struct
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

import trio_multifd as m
from trio_multifd import _control, _filecopy, _methods, _receiver, _sender
from trio_multifd._errors import CopyError
from trio_multifd._sender import Connector
from trio_multifd._transport import Transport

from .helpers import PAGE
from .test_engine import handshake
from .transfer import listening

DEADLINE = 20


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
def channel_state(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[object]]:
    """Weak references to every end opened in the test, its channels' links (which hold
    their buffers) and their coders, taken as each channel starts."""
    refs: list[weakref.ref[object]] = []
    new_link = _receiver.Receiver._new_link
    join = _sender.Sender._join

    def receiver_link(
        self: _receiver.Receiver,
        transport: Transport,
        channel: int,
        decoder: _methods.Decoder | None,
    ) -> _receiver._Link:
        link = new_link(self, transport, channel, decoder)
        refs.extend(weakref.ref(o) for o in (self, link, decoder) if o is not None)
        return link

    def sender_link(self: _sender.Sender, link: _sender._Link) -> _sender._Crew:
        refs.extend(weakref.ref(o) for o in (self, link, link.encoder) if o is not None)
        return join(self, link)

    monkeypatch.setattr(_receiver.Receiver, "_new_link", receiver_link)
    monkeypatch.setattr(_sender.Sender, "_join", sender_link)
    return refs


def still_alive(refs: list[weakref.ref[object]]) -> list[str]:
    assert refs, "no channel started: the test checks nothing"
    return [type(o).__qualname__ for o in (ref() for ref in refs) if o is not None]


@pytest.mark.usefixtures("no_cyclic_gc")
async def test_a_receiver_failed_by_a_bad_packet_is_freed_without_the_cyclic_collector(
    channel_state: list[weakref.ref[object]],
) -> None:
    # Channels served from a nursery of the application's, inside the block: its exit
    # keeps the Cancelled it caught, which must not lead back to the transfer's error.

    async def fail() -> None:
        target = m.RAMBlock("mem", bytearray(64 * PAGE), zeroed=True)
        async with listening("tcp") as (listeners, connect):
            peers = [await connect(channel) for channel in range(2)]
            try:
                async with m.open_receiver([target], compression="zstd") as receiver:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(receiver.serve, listeners)
                        for channel, peer in enumerate(peers):
                            await peer.send_all(handshake(channel))
                        await peers[0].send_all(bytes(m.header_size(128)))  # no magic
                        await receiver.wait_closed()
            finally:
                for peer in peers:
                    await trio.aclose_forcefully(peer)

    with trio.fail_after(DEADLINE), pytest.raises(m.MagicError):
        await fail()
    assert still_alive(channel_state) == []


@pytest.mark.usefixtures("no_cyclic_gc")
async def test_a_receiver_failed_by_a_handshake_timeout_is_freed_without_the_cyclic_collector(
    channel_state: list[weakref.ref[object]],
) -> None:

    async def fail() -> None:
        target = m.RAMBlock("mem", bytearray(64 * PAGE), zeroed=True)
        async with listening("tcp") as (listeners, connect):
            first, silent = await connect(0), await connect(1)
            try:
                async with m.open_receiver(
                    [target], compression="zstd", handshake_timeout=0.2
                ) as receiver:
                    await first.send_all(handshake(0))
                    await receiver.add_channel(await listeners[0].accept())
                    await receiver.add_channel(await listeners[0].accept())
            finally:
                await trio.aclose_forcefully(first)
                await trio.aclose_forcefully(silent)

    with trio.fail_after(DEADLINE), pytest.raises(m.HandshakeTimeoutError):
        await fail()
    assert still_alive(channel_state) == []


@pytest.mark.usefixtures("no_cyclic_gc")
async def test_a_sender_failed_by_its_peers_reset_is_freed_without_the_cyclic_collector(
    channel_state: list[weakref.ref[object]],
) -> None:
    source = m.RAMBlock("mem", bytes(range(256)) * (64 * PAGE // 256))

    async def reset_both(listener: trio.SocketListener) -> None:
        peers = [await listener.accept() for _ in range(2)]
        for peer in peers:
            await peer.receive_some(m.HANDSHAKE_SIZE)
            peer.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await peer.aclose()

    async def fail(connect: Connector) -> None:
        async with m.open_sender(connect, compression="zstd") as sender:
            while True:
                await sender.queue_pages(source, range(0, source.size, PAGE))
                await sender.sync()

    with trio.fail_after(DEADLINE):
        async with listening("tcp") as (listeners, connect), trio.open_nursery() as nursery:
            nursery.start_soon(reset_both, listeners[0])
            with pytest.raises(m.TransportError):
                await fail(connect)
    assert still_alive(channel_state) == []


@pytest.mark.usefixtures("no_cyclic_gc")
async def test_both_ends_cancelled_from_outside_are_freed_without_the_cyclic_collector(
    channel_state: list[weakref.ref[object]],
) -> None:
    source = m.RAMBlock("mem", bytes(range(256)) * (64 * PAGE // 256))

    async def cancel() -> None:
        target = m.RAMBlock("mem", bytearray(source.size), zeroed=True)
        async with listening("tcp") as (listeners, connect):
            with trio.CancelScope() as outside:

                async def receive() -> None:
                    async with m.open_receiver([target], compression="zstd") as receiver:
                        await receiver.serve(listeners)
                        await receiver.wait_closed()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(receive)
                    async with m.open_sender(connect, compression="zstd") as sender:
                        await sender.queue_pages(source, range(0, source.size, PAGE))
                        await sender.sync()
                        outside.cancel()
                        await sender.queue_pages(source, range(0, source.size, PAGE))
            assert outside.cancelled_caught

    with trio.fail_after(DEADLINE):
        await cancel()
    assert still_alive(channel_state) == []


@pytest.mark.usefixtures("no_cyclic_gc")
async def test_the_error_of_a_connection_that_is_not_a_control_stream_is_freed_at_once() -> None:
    opened = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = [*opened]
    try:
        with trio.fail_after(DEADLINE):
            client = await trio.open_tcp_stream("127.0.0.1", opened[0].socket.getsockname()[1])
            await client.send_all(b"GET / HTTP/1.1\r\n\r\n")
            with pytest.raises(CopyError) as info:
                await _control.accept_control(listeners, DEADLINE)
            await client.aclose()
    finally:
        await opened[0].aclose()
    error = weakref.ref(info.value)
    del info
    assert error() is None


@pytest.mark.usefixtures("no_cyclic_gc")
async def test_the_error_of_a_missing_go_ahead_is_freed_at_once(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.write_bytes(b"x")
    sender_end, receiver_end = trio.testing.memory_stream_pair()
    await receiver_end.aclose()  # the receiver went away before its go-ahead
    fd = os.open(source, os.O_RDONLY)
    try:
        lease = _filecopy._SourceLease(fd, str(source), held=False)
        with pytest.raises(CopyError) as info:
            await _filecopy._go_ahead(
                sender_end, {"type": "manifest"}, lease, DEADLINE, plain=True
            )
    finally:
        os.close(fd)
    error = weakref.ref(info.value)
    del info
    assert error() is None
