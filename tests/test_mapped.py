"""Blocks over mapped files: a file cut short or a full file system under a transfer is a
:class:`MappingError` at the end that touches the pages, not a SIGBUS that kills it."""

from __future__ import annotations

import mmap
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

import trio_multifd as m

from .helpers import PAGE, mapped_file, memory_channels, pattern, system_4k_pages
from .proxy import unread_bytes

pytestmark = system_4k_pages

READ_FAULT = (
    "the file was truncated, or its file system is full (tmpfs gives a hole a page when it"
    " is read)"
)


async def record(failures: list[m.MultiFDError], run: Callable[[], Awaitable[None]]) -> None:
    """Run one end of a transfer; keep its error for the test to check."""
    try:
        await run()
    except m.MultiFDError as exc:
        failures.append(exc)


@pytest.mark.parametrize("skip", [0, PAGE], ids=["the-mapping", "a-slice-of-it"])
async def test_a_mapped_source_cut_short_is_a_mapping_error_after_the_pages_before_it(
    tmp_path: Path, skip: int
) -> None:
    path = tmp_path / "source"
    mapping = mapped_file(path, bytes(skip) + pattern(8 * PAGE))
    src = m.RAMBlock("mem", mapping if not skip else memoryview(mapping)[skip:])
    dst = m.RAMBlock("mem", bytearray(8 * PAGE))
    sender_error: m.MultiFDError | None = None
    receiver_error: m.MultiFDError | None = None

    async def run_receiver(ends: list[trio.abc.Stream]) -> None:
        nonlocal receiver_error
        try:
            async with m.open_receiver([dst], channels=2) as receiver:
                for end in ends:
                    await receiver.add_channel(end)
                await receiver.wait_closed()
        except m.MultiFDError as exc:
            receiver_error = exc

    connect, ends = memory_channels(2)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_receiver, ends)
            try:
                async with m.open_sender(connect, channels=2) as sender:
                    await sender.queue_pages(src, range(0, 4 * PAGE, PAGE))
                    await sender.sync()
                    os.truncate(path, skip + 4 * PAGE)  # pages 4..7 are gone from the file
                    await sender.queue_pages(src, range(4 * PAGE, 8 * PAGE, PAGE))
            except m.MultiFDError as exc:
                sender_error = exc
    assert isinstance(sender_error, m.MappingError)
    assert sender_error.channel in (0, 1)
    assert str(sender_error) == (
        f"channel {sender_error.channel}: block 'mem': cannot read pages 0x4000..0x8000 of"
        f" its mapped file: {READ_FAULT}"
    )
    assert isinstance(receiver_error, m.TransportError)
    assert dst.view[: 4 * PAGE] == pattern(8 * PAGE)[: 4 * PAGE]
    assert dst.view[4 * PAGE :] == bytes(4 * PAGE)


async def test_a_mapped_source_cut_while_its_pages_wait_in_sendmsg_is_a_mapping_error(
    tmp_path: Path,
) -> None:
    # Pages faulted in, then cut while the receiver reads nothing: the kernel's copy in
    # sendmsg fails (EFAULT), once the peer reads again.
    size = 64 << 20  # more than the socket buffers hold
    path = tmp_path / "source"
    src = m.RAMBlock("mem", mapped_file(path, os.urandom(size)))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    failures: list[m.MultiFDError] = []

    async def peer() -> None:
        async with await listeners[0].accept() as stream:
            # Until the sender has filled the buffers and waits for room in sendmsg.
            before, queued = -1, unread_bytes(stream)
            while not queued or queued != before:
                await trio.sleep(0.05)
                before, queued = queued, unread_bytes(stream)
            os.truncate(path, PAGE)
            try:
                while await stream.receive_some(1 << 20):
                    pass
            except trio.BrokenResourceError:
                pass  # the sender's reset, once it failed

    async def connect(channel: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    async def send() -> None:
        async with m.open_sender(connect, channels=1) as sender:
            await sender.queue_pages(src, range(0, size, PAGE))

    async with listeners[0]:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer)
                nursery.start_soon(record, failures, send)
    sender_error = failures[0]
    assert isinstance(sender_error, m.MappingError), repr(sender_error)
    assert isinstance(sender_error.__cause__, m.TransportError)  # found by sendmsg
    assert sender_error.channel == 0
    assert sender_error.message.startswith("block 'mem': cannot read pages 0x")
    assert sender_error.message.endswith(f"of its mapped file: {READ_FAULT}")


async def test_a_mapped_target_cut_while_a_payload_arrives_is_a_mapping_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "target"
    path.write_bytes(bytes(8 * PAGE))
    fd = os.open(path, os.O_RDWR)
    dst = m.RAMBlock("mem", mmap.mmap(fd, 8 * PAGE))
    os.close(fd)
    payload = os.urandom(8 * PAGE)
    transfer = uuid.uuid4()
    header = m.PacketHeader(
        flags=0,
        pages_alloc=128,
        normal_pages=8,
        next_packet_size=len(payload),
        packet_num=7,
        block_name="mem",
        offsets=tuple(range(0, 8 * PAGE, PAGE)),
    )
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    failures: list[m.MultiFDError] = []

    async def receive() -> None:
        async with m.open_receiver([dst], channels=1, uuid=transfer) as receiver:
            async with trio.open_nursery() as nursery:
                await nursery.start(receiver.serve, listeners)
                await receiver.wait_closed()
                nursery.cancel_scope.cancel()

    async with listeners[0]:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(record, failures, receive)
                async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                    hello = m.Handshake(uuid=transfer, channel_id=0)
                    await stream.send_all(m.encode_handshake(hello))
                    await stream.send_all(m.encode_packet_header(header) + payload[: 2 * PAGE])
                    # Its first pages in place: the receiver faulted the packet in, waits.
                    while dst.view[:PAGE] != payload[:PAGE]:  # noqa: ASYNC110 - a thread writes
                        await trio.sleep(0.01)
                    os.truncate(path, 0)
                    try:
                        await stream.send_all(payload[2 * PAGE :])
                    except trio.BrokenResourceError:
                        pass  # the receiver may have reset the channel already
    receiver_error = failures[0]
    assert isinstance(receiver_error, m.MappingError), repr(receiver_error)
    assert isinstance(receiver_error.__cause__, m.TransportError)  # found by recvmsg_into
    assert str(receiver_error) == (
        "channel 0, packet 7: block 'mem': cannot write pages 0x0..0x8000 of its mapped"
        " file: its file system is full or the file was truncated"
    )
