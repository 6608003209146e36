"""Every decode check, on one live channel while the other channels are healthy.

A real sender drives both channels; a :class:`~tests.proxy.TamperStream` rewrites the
handshake of channel 1, or one packet header of one channel, in flight. For each fault:
the receiver raises the specific exception naming the channel, the sender fails with a
:class:`MultiFDError` when it next uses a channel, both ends close every stream (on TCP:
every socket's ``fileno()`` is -1), and the target, pre-filled, shows that nothing of a
rejected packet was written: each page the tampered packet names still holds the fill,
and every other page holds the fill or exactly the source's page (but for at most one page
per healthy channel whose payload the failure cut short: a prefix of the source's page,
then the fill).
"""

from __future__ import annotations

import logging
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

import trio_multifd as m

from .helpers import PAGE, block_pair, page_states
from .proxy import (
    TRANSFER_UUID,
    Link,
    MemoryLink,
    Outcome,
    RecordingListener,
    TamperStream,
    TcpLink,
    queue_everything,
    run_faulty_transfer,
)

PAGES = 512  # four full packets: both channels carry pages (zero pages included)

HandshakePatch = Callable[[bytearray], None]
HeaderPatch = Callable[[bytearray, m.PacketHeader], bool]


@pytest.fixture(params=["tcp", "memory"])
def via(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@asynccontextmanager
async def open_link(
    via: str, wrap: Callable[[int, trio.abc.Stream], trio.abc.Stream] | None = None
) -> AsyncIterator[Link]:
    if via == "tcp":
        async with TcpLink.open(wrap) as tcp:
            yield tcp
    else:
        async with MemoryLink.open(wrap) as memory:
            yield memory


@attrs.frozen
class Tampered:
    """A transfer with one handshake or packet header patched in flight."""

    outcome: Outcome
    src: m.RAMBlock
    dst: m.RAMBlock
    channel: int | None
    """The channel whose packet header was patched (``None``: a handshake was)."""
    packet: m.PacketHeader | None
    """That header as the sender meant it: the pages it names must stay untouched."""


async def run_tampered(
    via: str,
    *,
    handshake: HandshakePatch | None = None,
    header: HeaderPatch | None = None,
    compression: str = "none",
    receiver_compression: str | None = None,
) -> Tampered:
    """A two-channel transfer of ``PAGES`` pages: ``handshake`` patches channel 1's
    handshake, ``header`` the first packet header it accepts, on whichever channel that
    packet travels (which channel takes which batch is up to the sender)."""
    src, dst = block_pair("mem", PAGES, seed=3)
    patched: list[tuple[int, m.PacketHeader]] = []

    def wrap(channel: int, stream: trio.abc.Stream) -> trio.abc.Stream:
        def once(raw: bytearray, parsed: m.PacketHeader) -> bool:
            if header is None or patched or not header(raw, parsed):
                return False
            patched.append((channel, parsed))
            return True

        return TamperStream(stream, handshake=handshake if channel == 1 else None, header=once)

    with trio.fail_after(10):
        async with open_link(via, wrap) as link:
            outcome = await run_faulty_transfer(
                link,
                [src],
                [dst],
                sender_options={"compression": compression},
                receiver_options={"compression": receiver_compression or compression},
            )
    assert len(patched) == (header is not None)  # the fault was injected, once
    channel, packet = patched[0] if patched else (None, None)
    return Tampered(outcome, src, dst, channel, packet)


def assert_failed_cleanly(
    outcome: Outcome, expected: type[m.MultiFDError], channel: int | None
) -> m.MultiFDError:
    """The receiver raised exactly ``expected`` for ``channel``; the sender failed too;
    every stream is closed."""
    error = outcome.receiver
    assert type(error) is expected, repr(error)
    assert error.channel == channel
    assert isinstance(outcome.sender, m.MultiFDError), repr(outcome.sender)
    assert outcome.sender_closed
    assert outcome.receiver_closed
    return error


def assert_nothing_of_the_packet_landed(
    src: m.RAMBlock, dst: m.RAMBlock, packet: m.PacketHeader | None, *, healthy: int
) -> None:
    """Every page ``packet`` names (normal and zero) still holds the fill; every other
    page holds the fill or exactly its source page, but for at most one page per
    ``healthy`` channel that the failure cut inside a payload."""
    states = page_states(src.view, dst.view)
    rejected = {offset // PAGE for offset in packet.offsets} if packet else set()
    assert [states[page] for page in sorted(rejected)] == ["fill"] * len(rejected)
    others = {page: state for page, state in enumerate(states) if page not in rejected}
    damaged = [page for page, state in others.items() if state == "damaged"]
    assert not damaged
    assert list(others.values()).count("partly") <= healthy


def assert_tampered_run_failed_cleanly(
    run: Tampered, expected: type[m.MultiFDError], channel: int | None
) -> m.MultiFDError:
    """:func:`assert_failed_cleanly`, and nothing of the tampered packet was written
    (the other channel may have been cut inside a payload)."""
    error = assert_failed_cleanly(run.outcome, expected, channel)
    assert_nothing_of_the_packet_landed(run.src, run.dst, run.packet, healthy=1)
    return error


def put32(raw: bytearray, offset: int, value: int) -> None:
    struct.pack_into(">I", raw, offset, value)


def put64(raw: bytearray, offset: int, value: int) -> None:
    struct.pack_into(">Q", raw, offset, value)


# -- handshakes ------------------------------------------------------------------------------


def handshake_field(offset: int, fmt: str, value: int | bytes) -> HandshakePatch:
    def patch(raw: bytearray) -> None:
        struct.pack_into(fmt, raw, offset, value)

    return patch


@pytest.mark.parametrize(
    ("patch", "expected", "channel", "field"),
    [
        pytest.param(
            handshake_field(0, ">I", 0x11223345), m.MagicError, None, "magic", id="magic"
        ),
        pytest.param(handshake_field(4, ">I", 2), m.VersionError, 1, "version", id="version"),
        pytest.param(
            handshake_field(8, "16s", uuid.UUID(int=1).bytes),
            m.UUIDMismatchError,
            1,
            "uuid",
            id="uuid",
        ),
        # QEMU tests `id > channels` and lets id == channels through.
        pytest.param(handshake_field(24, "B", 2), m.ChannelIdError, 2, "id", id="id==channels"),
        pytest.param(handshake_field(24, "B", 255), m.ChannelIdError, 255, "id", id="id=255"),
        pytest.param(handshake_field(24, "B", 0), m.DuplicateChannelError, 0, "id", id="dup"),
    ],
)
async def test_a_bad_handshake_fails_add_channel_and_the_transfer(
    via: str,
    patch: HandshakePatch,
    expected: type[m.ProtocolError],
    channel: int | None,
    field: str,
) -> None:
    run = await run_tampered(via, handshake=patch)
    error = assert_tampered_run_failed_cleanly(run, expected, channel)
    assert isinstance(error, m.ProtocolError)
    assert error.field == field
    # add_channel raised it, and the transfer failed with that very exception.
    assert run.outcome.added == [error]


async def test_a_channel_beyond_the_configured_count_is_refused(via: str) -> None:
    src, dst = block_pair("mem", PAGES, seed=3)
    good = m.encode_handshake(m.Handshake(uuid=TRANSFER_UUID, channel_id=1))

    async def body(sender: m.Sender) -> None:
        # Both channels are connected: a third, well-formed handshake arrives.
        extra = await link.raw_connect()
        await extra.send_all(good)
        await queue_everything([src], sender)

    with trio.fail_after(10):
        async with open_link(via) as link:
            outcome = await run_faulty_transfer(link, [src], [dst], accept=3, body=body)
    error = assert_failed_cleanly(outcome, m.TooManyChannelsError, 1)
    assert outcome.added == [error]
    # Both channels were healthy: either may have been cut inside a payload.
    assert_nothing_of_the_packet_landed(src, dst, None, healthy=2)


# -- packet headers --------------------------------------------------------------------------


def on_first(patch: Callable[[bytearray, m.PacketHeader], None]) -> HeaderPatch:
    """Apply ``patch`` to the channel's first packet header, whatever it carries."""

    def apply(raw: bytearray, parsed: m.PacketHeader) -> bool:
        patch(raw, parsed)
        return True

    return apply


def on_pages(patch: Callable[[bytearray, m.PacketHeader], None]) -> HeaderPatch:
    """Apply ``patch`` to the channel's first packet that carries normal pages."""

    def apply(raw: bytearray, parsed: m.PacketHeader) -> bool:
        if not parsed.normal_pages:
            return False
        patch(raw, parsed)
        return True

    return apply


def set_flags(value: int) -> Callable[[bytearray, m.PacketHeader], None]:
    return lambda raw, parsed: put32(raw, 8, value)


def or_flags(bits: int) -> Callable[[bytearray, m.PacketHeader], None]:
    return lambda raw, parsed: put32(raw, 8, parsed.flags | bits)


HEADER_FAULTS = [
    pytest.param(
        on_first(lambda raw, p: put32(raw, 0, 0x44332211)), m.MagicError, "magic", id="magic"
    ),
    pytest.param(on_first(lambda raw, p: put32(raw, 4, 0)), m.VersionError, "version", id="ver"),
    pytest.param(
        on_pages(lambda raw, p: put32(raw, 12, 129)),
        m.PageCountError,
        "pages_alloc",
        id="pages_alloc",
    ),
    pytest.param(
        on_pages(lambda raw, p: put32(raw, 16, p.pages_alloc + 1)),
        m.PageCountError,
        "normal_pages",
        id="normal_pages",
    ),
    pytest.param(
        on_pages(lambda raw, p: put32(raw, 32, p.pages_alloc - p.normal_pages + 1)),
        m.PageCountError,
        "zero_pages",
        id="zero_pages",
    ),
    pytest.param(
        on_pages(lambda raw, p: struct.pack_into("256s", raw, 64, b"rom")),
        m.UnknownBlockError,
        "ramblock",
        id="unknown-block",
    ),
    pytest.param(
        on_pages(lambda raw, p: struct.pack_into("256s", raw, 64, b"m" * 256)),
        m.BlockNameError,
        "ramblock",
        id="unterminated-block-name",
    ),
    pytest.param(
        on_pages(lambda raw, p: put64(raw, 320, PAGES * PAGE)),
        m.OffsetError,
        "offset",
        id="offset-past-end",
    ),
    pytest.param(
        on_pages(lambda raw, p: put64(raw, 320, 2**64 - PAGE)),
        m.OffsetError,
        "offset",
        id="offset-huge",
    ),
    pytest.param(
        on_pages(lambda raw, p: put64(raw, 320, p.offsets[0] + 8)),
        m.OffsetError,
        "offset",
        id="offset-unaligned",
    ),
    pytest.param(
        on_pages(set_flags(m.Flag.ZSTD)), m.CompressionMismatchError, "flags", id="zstd-flag"
    ),
    pytest.param(
        on_pages(set_flags(m.Flag.QPL)), m.UnsupportedCompressionError, "flags", id="qpl-flag"
    ),
    pytest.param(
        on_pages(set_flags(m.Flag.UADK)), m.UnsupportedCompressionError, "flags", id="uadk"
    ),
    pytest.param(on_first(or_flags(0x100)), m.FlagsError, "flags", id="unknown-flag-bit"),
    pytest.param(on_first(or_flags(m.Flag.DEVICE_STATE)), m.FlagsError, "flags", id="device"),
    pytest.param(
        on_pages(lambda raw, p: put32(raw, 20, 0xFFFFFFFF)),
        m.PayloadSizeError,
        "next_packet_size",
        id="oversized-payload",
    ),
    pytest.param(
        on_pages(lambda raw, p: put32(raw, 20, p.next_packet_size - PAGE)),
        m.PayloadSizeError,
        "next_packet_size",
        id="short-payload",
    ),
]


@pytest.mark.parametrize(("patch", "expected", "field"), HEADER_FAULTS)
async def test_a_bad_packet_header_fails_its_channel(
    via: str, patch: HeaderPatch, expected: type[m.ProtocolError], field: str
) -> None:
    run = await run_tampered(via, header=patch)
    error = assert_tampered_run_failed_cleanly(run, expected, run.channel)
    assert isinstance(error, m.ProtocolError)
    assert error.field == field
    assert run.outcome.added == []


async def test_an_unsupported_method_is_named_in_the_error() -> None:
    run = await run_tampered("tcp", header=on_pages(set_flags(m.Flag.QPL)))
    error = assert_tampered_run_failed_cleanly(run, m.UnsupportedCompressionError, run.channel)
    assert "QPL" in str(error)
    assert str(error).startswith(f"channel {run.channel}")


async def test_a_packet_of_another_method_names_both() -> None:
    run = await run_tampered("tcp", header=on_pages(set_flags(m.Flag.ZSTD)))
    error = assert_tampered_run_failed_cleanly(run, m.CompressionMismatchError, run.channel)
    assert "'zstd'" in str(error) and "'none'" in str(error)
    assert error.packet_num is not None


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        pytest.param(on_pages(set_flags(0)), m.CompressionMismatchError, id="none-flag"),
        pytest.param(
            on_pages(lambda raw, p: put32(raw, 20, 0xFFFFFFFF)),
            m.PayloadSizeError,
            id="oversized-payload",
        ),
        pytest.param(
            on_pages(lambda raw, p: put32(raw, 20, 0)), m.PayloadSizeError, id="empty-payload"
        ),
    ],
)
async def test_a_bad_header_on_a_zstd_channel_fails_it(
    patch: HeaderPatch, expected: type[m.ProtocolError]
) -> None:
    run = await run_tampered("tcp", header=patch, compression="zstd")
    assert_tampered_run_failed_cleanly(run, expected, run.channel)


def last_normal_page_as_zero(raw: bytearray, parsed: m.PacketHeader) -> None:
    """The same offsets, the last normal page counted as a zero page: the payload still
    holds its data, one page more than the header's normal pages."""
    put32(raw, 16, parsed.normal_pages - 1)
    put32(raw, 32, parsed.zero_pages + 1)


async def test_a_zlib_payload_decoding_past_its_pages_fails_its_channel_unwritten() -> None:
    run = await run_tampered("tcp", header=on_pages(last_normal_page_as_zero), compression="zlib")
    assert run.packet is not None and run.packet.normal_pages >= 2
    # zlib scatters a packet's output only after its checks: none of its pages is written,
    # the one now named a zero page included.
    error = assert_tampered_run_failed_cleanly(run, m.DecompressionError, run.channel)
    assert isinstance(error, m.DecompressionError)
    assert error.packet_num == run.packet.packet_num
    assert error.limit == (run.packet.normal_pages - 1) * PAGE
    assert "decodes to more than" in str(error)


async def test_a_compression_flag_on_a_packet_without_pages_is_accepted() -> None:
    # QEMU 7.2 sends empty packets with stale flags: only packets with pages are checked.
    def zstd_flag_on_syncs(raw: bytearray, parsed: m.PacketHeader) -> bool:
        if parsed.is_sync:
            put32(raw, 8, parsed.flags | m.Flag.ZSTD)
        return False  # every SYNC, not only the first

    src, dst = block_pair("mem", PAGES, seed=3)

    def wrap(channel: int, stream: trio.abc.Stream) -> trio.abc.Stream:
        return TamperStream(stream, header=zstd_flag_on_syncs)

    with trio.fail_after(10):
        async with TcpLink.open(wrap) as link:
            async with m.open_receiver([dst], channels=2, uuid=TRANSFER_UUID) as receiver:
                async with trio.open_nursery() as nursery:

                    async def add_two() -> None:
                        for _ in range(2):
                            await receiver.add_channel(await link.accept())

                    nursery.start_soon(add_two)
                    async with m.open_sender(
                        link.connect, channels=2, uuid=TRANSFER_UUID
                    ) as sender:
                        await queue_everything([src], sender)
                await receiver.wait_closed()
            assert link.all_closed("sender") and link.all_closed("receiver")
    assert dst.view == src.view


# -- serve() ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("handshake", "reason"),
    [
        pytest.param(b"\x00" * m.HANDSHAKE_SIZE, "handshake magic is 0x00000000", id="zeros"),
        pytest.param(
            m.encode_handshake(m.Handshake(uuid=uuid.UUID(int=1), channel_id=0)),
            "handshake uuid is 00000000-0000-0000-0000-000000000001",
            id="other-transfer",
        ),
        pytest.param(
            m.encode_handshake(m.Handshake(uuid=TRANSFER_UUID, channel_id=2)),
            "channel 2: handshake channel id is 2",
            id="id==channels",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\n\r\n", "stream ended inside the handshake", id="short-then-eof"
        ),
    ],
)
async def test_serve_refuses_a_bad_connection_and_keeps_accepting(
    caplog: pytest.LogCaptureFixture, handshake: bytes, reason: str
) -> None:
    src, dst = block_pair("mem", 64, seed=4)
    with caplog.at_level(logging.WARNING, logger="trio_multifd"), trio.fail_after(10):
        async with RecordingListener.open() as listener:
            async with m.open_receiver([dst], channels=2, uuid=TRANSFER_UUID) as receiver:
                async with trio.open_nursery() as nursery:
                    await nursery.start(receiver.serve, [listener])
                    # A scanner (or a stray sender) comes first; it is refused and reset.
                    async with await trio.open_tcp_stream("127.0.0.1", listener.port) as stray:
                        with pytest.raises(trio.BrokenResourceError):
                            await stray.send_all(handshake)
                            if len(handshake) < m.HANDSHAKE_SIZE:
                                await stray.send_eof()
                            while await stray.receive_some():
                                pass
                    assert listener.accepted[0].socket.fileno() == -1

                    async def connect(channel: int) -> trio.abc.Stream:
                        return await trio.open_tcp_stream("127.0.0.1", listener.port)

                    async with m.open_sender(connect, channels=2, uuid=TRANSFER_UUID) as sender:
                        await queue_everything([src], sender)
                await receiver.wait_closed()
            assert len(listener.accepted) == 3
            assert all(s.socket.fileno() == -1 for s in listener.accepted)
    assert dst.view == src.view
    refused = [r for r in caplog.records if "refused a connection" in r.getMessage()]
    assert len(refused) == 1
    assert refused[0].levelno == logging.WARNING
    assert reason in refused[0].getMessage()
