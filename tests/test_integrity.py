"""Opt-in end-to-end checksums: agreed at the handshake, checked before any write."""

from __future__ import annotations

import signal
import struct
import sys
import uuid
from functools import partial

import pytest
import trio

import trio_multifd as m

from .helpers import PAGE, TrackedStream, block_pair, memory_channels, pattern, run_both_ends
from .proxy import At, CuttingProxy, TcpLink, run_faulty_transfer
from .transfer import transfer


class FlippingStream(TrackedStream):
    """Flips one bit of the byte at stream position ``at`` on its way out."""

    def __init__(self, inner: trio.abc.Stream, at: int) -> None:
        super().__init__(inner)
        self.at = at

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        chunk = bytearray(data)
        if self.sent <= self.at < self.sent + len(chunk):
            chunk[self.at - self.sent] ^= 0x10
        await super().send_all(chunk)


@pytest.mark.parametrize("compression", ["none", "zstd", "zlib"])
@pytest.mark.parametrize("via", ["tcp", "memory"])
async def test_transfer_with_integrity_lands_every_page(compression: str, via: str) -> None:
    src, dst = block_pair("mem", 300, seed=3)

    async def body(sender: m.Sender) -> None:
        await sender.queue_pages(src, range(0, src.size, PAGE))
        await sender.sync()
        await sender.queue_pages(src, range(0, src.size // 2, PAGE))

    options = {"integrity": True}
    with trio.fail_after(30):
        sent, received, rounds = await transfer(
            [src],
            [dst],
            body,
            channels=2,
            via=via,
            compression=compression,
            sender_options=options,
            receiver_options=options,
        )
    assert dst.view == src.view
    assert rounds == [1, 2]
    assert received.zero_pages == sent.zero_pages > 0


@pytest.mark.parametrize(
    ("features", "receiver_on", "why"),
    [
        (1, False, "the sender sends checksums, this receiver was opened with integrity=False"),
        (0, True, "the sender sends no checksums, this receiver was opened with integrity=True"),
        # The in-band end changes nothing of the settings to agree on.
        (1 | 2, False, "the sender sends checksums, this receiver was opened with"),
        (2, True, "the sender sends no checksums, this receiver was opened with"),
        (2 | 4, False, "bits 0x4 are unknown to this receiver"),  # next to a known one
    ],
)
async def test_integrity_setting_mismatch_fails_at_the_handshake(
    features: int, receiver_on: bool, why: str
) -> None:
    _, dst = block_pair("mem", 4)
    transfer_uuid = uuid.uuid4()
    handshake = m.encode_handshake(
        m.Handshake(uuid=transfer_uuid, channel_id=1, features=features)
    )
    connect, ends = memory_channels(2)
    await (await connect(1)).send_all(handshake)
    with trio.fail_after(10), pytest.raises(m.FeatureError) as info:
        async with m.open_receiver([dst], channels=2, integrity=receiver_on) as receiver:
            await receiver.add_channel(ends[1])
    assert info.value.channel == 1
    assert info.value.field == "features"
    assert f"the sender announces features {features:#x}: {why}" in str(info.value)


async def _transfer_with_flip(
    at: int, compression: str = "none"
) -> tuple[BaseException | None, BaseException | None, m.RAMBlock, m.RAMBlock]:
    src, dst = block_pair("mem", 128, seed=4)
    connect, ends = memory_channels(1, wrap=lambda i, s: FlippingStream(s, at))

    async def receive() -> None:
        async with m.open_receiver(
            [dst], channels=1, integrity=True, compression=compression
        ) as receiver:
            await receiver.add_channel(ends[0])
            await receiver.wait_closed()

    async def send() -> None:
        async with m.open_sender(
            connect, channels=1, integrity=True, compression=compression
        ) as sender:
            await sender.queue_pages(src, range(0, src.size, PAGE))
            await sender.sync()

    sender_error, receiver_error = await run_both_ends(send, receive)
    return sender_error, receiver_error, src, dst


HEADER = m.header_size(128)


@pytest.mark.parametrize("compression", ["none", "zstd"])
async def test_a_flipped_payload_byte_is_an_integrity_error_and_writes_nothing(
    compression: str,
) -> None:
    at = 64 + HEADER + 5000  # inside the first packet's payload
    with trio.fail_after(20):
        sender_error, receiver_error, _, dst = await _transfer_with_flip(at, compression)
    assert isinstance(receiver_error, m.IntegrityError)
    assert receiver_error.channel == 0
    assert receiver_error.packet_num == 0
    assert receiver_error.field == "payload_checksum"
    assert isinstance(sender_error, m.MultiFDError)
    assert dst.view == pattern(dst.size)


async def test_a_flipped_header_byte_is_an_integrity_error_before_any_other_check() -> None:
    at = 64 + 64 + 3  # inside the block name of the first header
    with trio.fail_after(20):
        _, receiver_error, _, dst = await _transfer_with_flip(at)
    assert isinstance(receiver_error, m.IntegrityError)
    assert receiver_error.field == "header_checksum"
    assert receiver_error.channel == 0
    assert dst.view == pattern(dst.size)


def _packet(flags: int) -> bytes:
    return m.encode_packet_header(
        m.PacketHeader(
            flags=flags, pages_alloc=128, normal_pages=0, next_packet_size=0, packet_num=0
        )
    )


@pytest.mark.parametrize(
    ("integrity", "flags", "error"),
    [
        (False, m.Flag.SYNC | m.Flag.CHECKSUMS, m.FlagsError),
        (True, m.Flag.SYNC, m.IntegrityError),
    ],
)
async def test_checksum_flag_must_match_the_channel_agreement(
    integrity: bool, flags: int, error: type[m.MultiFDError]
) -> None:
    _, dst = block_pair("mem", 4)
    data = m.encode_handshake(
        m.Handshake(uuid=uuid.UUID(int=1), channel_id=0, features=int(integrity))
    )
    packet = _chained(data, [_packet(flags)])[0] if integrity else _packet(flags)
    connect, ends = memory_channels(1)
    await (await connect(0)).send_all(data + packet)
    with trio.fail_after(10), pytest.raises(error) as info:
        async with m.open_receiver([dst], channels=1, integrity=integrity) as receiver:
            await receiver.add_channel(ends[0])
            await receiver.sync()
    assert info.value.channel == 0


def test_sealed_header_checksum_covers_the_header_with_its_field_zeroed() -> None:
    sealed = m.seal_header(_packet(m.Flag.SYNC | m.Flag.CHECKSUMS))
    stored = struct.unpack_from(">Q", sealed, 40)[0]
    assert stored == m.header_checksum(sealed)
    tampered = bytearray(sealed)
    tampered[100] ^= 1
    assert m.header_checksum(tampered) != stored


def _chained(handshake: bytes, packets: list[bytes]) -> list[bytes]:
    """Seal each header in order, each checksum seeded with the one before (the first
    with the channel's handshake), as a checksumming sender does."""
    seed = m.chain_start(handshake)
    sealed = []
    for packet in packets:
        sealed.append(m.seal_header(packet, seed))
        seed = struct.unpack_from(">Q", sealed[-1], 40)[0]
    return sealed


def _checksummed_handshake(channel: int) -> bytes:
    return m.encode_handshake(
        m.Handshake(uuid=uuid.UUID(int=1), channel_id=channel, features=m.Feature.CHECKSUMS)
    )


@pytest.mark.parametrize(
    ("order", "rounds"),
    [([0, 1, 2], 3), ([0, 2], 1), ([0, 1, 1, 2], 2), ([1, 0, 2], 0)],
    ids=["intact", "lost", "repeated", "swapped"],
)
async def test_a_checksummed_channel_finds_a_packet_lost_repeated_or_moved(
    order: list[int], rounds: int
) -> None:
    handshake = _checksummed_handshake(0)
    syncs = _chained(handshake, [_packet(m.Flag.SYNC | m.Flag.CHECKSUMS)] * 3)
    _, dst = block_pair("mem", 4)
    connect, ends = memory_channels(1)
    feed = await connect(0)
    await feed.send_all(handshake + b"".join(syncs[i] for i in order))
    await feed.send_eof()  # type: ignore[attr-defined]
    completed = 0
    errors: list[m.IntegrityError] = []
    with trio.fail_after(10):
        try:
            async with m.open_receiver([dst], channels=1, integrity=True) as receiver:
                await receiver.add_channel(ends[0])
                for _ in range(3):
                    completed = await receiver.sync()
                await receiver.wait_closed()
        except m.IntegrityError as exc:
            errors.append(exc)
    assert completed == rounds
    assert [(e.channel, e.field) for e in errors] == (
        [] if rounds == 3 else [(0, "header_checksum")]
    )
    assert all("a packet of this channel was lost, repeated or moved" in str(e) for e in errors)


async def test_a_checksummed_channels_packets_replayed_on_another_channel_fail() -> None:
    # The chain starts from each channel's own handshake: its id and the transfer's uuid.
    first, second = _checksummed_handshake(0), _checksummed_handshake(1)
    [sync] = _chained(first, [_packet(m.Flag.SYNC | m.Flag.CHECKSUMS)])
    _, dst = block_pair("mem", 4)
    connect, ends = memory_channels(2)
    await (await connect(0)).send_all(first + sync)
    await (await connect(1)).send_all(second + sync)
    with trio.fail_after(10), pytest.raises(m.IntegrityError) as info:
        async with m.open_receiver([dst], channels=2, integrity=True) as receiver:
            for end in ends:
                await receiver.add_channel(end)
            await receiver.sync()
    assert info.value.channel == 1


async def test_a_checksummed_tcp_channel_cut_cleanly_after_a_sync_fails_the_receiver() -> None:
    # A relay may pass a crashed sender's reset on as a plain end of stream. Right after
    # a SYNC, that end broke no chain and passed for the end of the transfer: a
    # checksummed channel ends in band, over TCP too.
    src, dst = block_pair("mem", 256, seed=5)

    async def body(sender: m.Sender) -> None:
        await sender.queue_pages(src, range(0, src.size // 2, PAGE))
        await sender.sync()
        await sender.queue_pages(src, range(src.size // 2, src.size, PAGE))

    with trio.fail_after(15):
        async with TcpLink.open() as link:
            proxy = CuttingProxy(link.port, At("sync", 0, HEADER), "close", link=link)
            async with proxy.running():
                link.route[0] = proxy.port
                options = {"integrity": True}
                outcome = await run_faulty_transfer(
                    link,
                    [src],
                    [dst],
                    channels=1,
                    body=body,
                    sender_options=options,
                    receiver_options=options,
                )
    assert type(outcome.receiver) is m.TransportError, repr(outcome.receiver)
    assert outcome.receiver.channel == 0
    assert "ended before the sender's final SYNC" in str(outcome.receiver)
    assert outcome.receiver_object is not None
    assert outcome.receiver_object.rounds_completed == 1


_SENDER_KILLED_AFTER_A_SYNC = """
import sys, trio, trio_multifd as m

async def main() -> None:
    port, integrity = int(sys.argv[1]), sys.argv[2] == "True"
    source = m.RAMBlock("mem", bytearray(b"\\x5a" * 256 * 4096))

    async def connect(channel: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    async with m.open_sender(connect, channels=2, integrity=integrity) as sender:
        await sender.queue_pages(source, range(0, source.size // 2, 4096))
        await sender.sync()
        await trio.sleep_forever()  # killed here: the second half is never queued

trio.run(main)
"""


@pytest.mark.parametrize("integrity", [False, True])
async def test_a_sender_killed_right_after_a_sync_is_a_failure_only_with_integrity(
    integrity: bool,
) -> None:
    # A killed process's kernel ends its TCP channels with a plain FIN (the receiver
    # never writes, so nothing unread turns it into a reset): without an end marker in
    # QEMU's format that is a finished transfer; with checksums the end is in band.
    _, dst = block_pair("mem", 256)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = str(listener.socket.getsockname()[1])
    command = [sys.executable, "-c", _SENDER_KILLED_AFTER_A_SYNC, port, str(integrity)]
    with trio.fail_after(30):
        async with listener, trio.open_nursery() as nursery:
            process = await nursery.start(partial(trio.run_process, command, check=False))
            try:
                async with m.open_receiver([dst], channels=2, integrity=integrity) as receiver:
                    await receiver.serve([listener])
                    assert await receiver.sync() == 1
                    process.send_signal(signal.SIGKILL)
                    await receiver.wait_closed()
            except m.TransportError as exc:
                error: m.TransportError | None = exc
            else:
                error = None
    assert process.returncode == -signal.SIGKILL
    assert receiver.rounds_completed == 1
    assert receiver.stats.normal_pages == 128  # of the 256 the sender meant to send
    if integrity:
        assert error is not None
        assert "ended before the sender's final SYNC" in str(error)
    else:
        assert error is None


async def test_a_header_checksum_error_names_the_packets_place_in_its_channel() -> None:
    # The header cannot be trusted to name itself (its packet_num may be the damage).
    handshake = _checksummed_handshake(0)
    syncs = _chained(handshake, [_packet(m.Flag.SYNC | m.Flag.CHECKSUMS)] * 3)
    damaged = bytearray(syncs[1])
    damaged[100] ^= 1
    _, dst = block_pair("mem", 4)
    connect, ends = memory_channels(1)
    await (await connect(0)).send_all(handshake + syncs[0] + damaged + syncs[2])
    with trio.fail_after(10), pytest.raises(m.IntegrityError) as info:
        async with m.open_receiver([dst], channels=1, integrity=True) as receiver:
            await receiver.add_channel(ends[0])
            await receiver.wait_closed()
    assert info.value.packet_num is None
    assert str(info.value).startswith(
        f"channel 0: header checksum of the channel's packet 2 (at byte {64 + HEADER} of"
        " its stream)"
    )
