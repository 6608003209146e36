"""The transfer engine: pages land, rounds complete, the newest content wins."""

from __future__ import annotations

import contextlib
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
import trio

import trio_multifd as m
from trio_multifd import _receiver

from .helpers import PAGE, block_pair, landed, memory_channels, pattern, random_pages, shuffled
from .proxy import TcpLink, unread_bytes
from .transfer import transfer

E = TypeVar("E", bound=m.MultiFDError)


@pytest.mark.parametrize("channels", [1, 2, 4, 8])
@pytest.mark.parametrize("via", ["tcp", "memory", "unix"])
async def test_every_page_of_several_blocks_lands(channels: int, via: str) -> None:
    a_src, a_dst = block_pair("pc.ram", 700, seed=1)
    b_src, b_dst = block_pair("vga", 300, seed=2)

    async def body(sender: m.Sender) -> None:
        await sender.queue_pages(a_src, shuffled(list(range(0, a_src.size, PAGE)), 3))
        await sender.queue_pages(b_src, range(0, b_src.size, PAGE))
        assert await sender.sync() == 1

    with trio.fail_after(30):
        sent, received, rounds = await transfer(
            [a_src, b_src], [a_dst, b_dst], body, channels=channels, via=via
        )
    assert a_dst.view == a_src.view
    assert b_dst.view == b_src.view
    assert rounds == [1, 2]  # the body's round and the one sent at exit
    assert sent.pages == received.pages == 1000
    assert sent.zero_pages == received.zero_pages == 100 + 43
    assert sent.bytes == received.bytes
    assert received.rounds == 2


async def test_pages_repeated_across_rounds_end_with_the_newest_content() -> None:
    src = random_pages(256, seed=5)
    source = m.RAMBlock("mem", src)
    target = m.RAMBlock("mem", pattern(len(src)))
    rng = random.Random(9)

    async def body(sender: m.Sender) -> None:
        for round_number in range(1, 11):
            pages = rng.sample(range(256), 64)
            for page in pages:
                src[page * PAGE : page * PAGE + 8] = round_number.to_bytes(8, "big")
            await sender.queue_pages(source, [p * PAGE for p in pages])
            assert await sender.sync() == round_number
        await sender.queue_pages(source, range(0, len(src), PAGE))

    with trio.fail_after(30):
        _, received, rounds = await transfer([source], [target], body, channels=4)
    assert target.view == source.view
    assert rounds == list(range(1, 12))
    assert received.rounds == 11


async def test_queue_page_one_at_a_time_and_block_switches_flush() -> None:
    a_src, a_dst = block_pair("a", 40, seed=3)
    b_src, b_dst = block_pair("b", 40, seed=4)

    async def body(sender: m.Sender) -> None:
        for page in range(40):
            await sender.queue_page(a_src, page * PAGE)
            await sender.queue_page(b_src, page * PAGE)

    with trio.fail_after(20):
        sent, _, _ = await transfer([a_src, b_src], [a_dst, b_dst], body, channels=2)
    assert a_dst.view == a_src.view
    assert b_dst.view == b_src.view
    # Alternating blocks: every packet holds one page (a page of another block flushes).
    assert sent.packets - sum(c.syncs for c in sent.channels) == 80


async def test_sender_without_zero_page_detection_sends_zero_pages_as_data() -> None:
    src, dst = block_pair("mem", 70, seed=8)

    async def body(sender: m.Sender) -> None:
        await sender.queue_pages(src, range(0, src.size, PAGE))

    with trio.fail_after(20):
        sent, _, _ = await transfer(
            [src], [dst], body, sender_options={"zero_page_detection": "none"}
        )
    assert dst.view == src.view
    assert sent.zero_pages == 0
    assert sent.normal_pages == 70


def known_zero_pair(data: bytearray) -> tuple[m.RAMBlock, bytearray, m.RAMBlock]:
    """A source block over ``data``, and a known-zero target block and its buffer."""
    target_buffer = bytearray(len(data))
    return m.RAMBlock("mem", data), target_buffer, m.RAMBlock("mem", target_buffer, zeroed=True)


async def test_known_zero_target_skips_zero_pages_never_written() -> None:
    data = random_pages(32, zero_every=2, seed=6)
    source, target_buffer, target = known_zero_pair(data)

    async def body(sender: m.Sender) -> None:
        await sender.queue_pages(source, range(0, len(data), PAGE))
        await sender.sync()
        data[0:PAGE] = b"\x01" * PAGE  # page 0 written, then zeroed again
        await sender.queue_page(source, 0)
        await sender.sync()
        data[0:PAGE] = bytes(PAGE)
        await sender.queue_page(source, 0)

    # A poisoned byte in a never-written zero page shows whether the receiver touched it.
    target_buffer[2 * PAGE] = 0x77
    with trio.fail_after(20):
        _, received, _ = await transfer([source], [target], body)
    assert target_buffer[2 * PAGE] == 0x77
    target_buffer[2 * PAGE] = 0
    assert target_buffer == data
    assert received.zero_pages == 17


async def test_known_zero_target_zeroes_only_the_written_stretch_of_a_zero_run() -> None:
    data = bytearray(8 * PAGE)
    data[2 * PAGE : 6 * PAGE] = random_pages(4, seed=7)
    source, target_buffer, target = known_zero_pair(data)

    async def body(sender: m.Sender) -> None:
        await sender.queue_pages(source, range(0, len(data), PAGE))
        await sender.sync()
        data[:] = bytes(len(data))
        # One packet, one run of eight zero pages: pages 2-5 were written, the rest not.
        await sender.queue_pages(source, range(0, len(data), PAGE))

    for page in (0, 1, 6, 7):
        target_buffer[page * PAGE] = 0x77
    with trio.fail_after(20):
        _, received, _ = await transfer([source], [target], body)
    assert target_buffer[2 * PAGE : 6 * PAGE] == bytes(4 * PAGE)
    for page in (0, 1, 6, 7):
        assert target_buffer[page * PAGE] == 0x77, page
    assert received.zero_pages == 4 + 8


def make_packet(name: str, pages: dict[int, bytes], *, flags: int = 0, num: int = 0) -> bytes:
    offsets = tuple(pages)
    header = m.PacketHeader(
        flags=flags,
        pages_alloc=128,
        normal_pages=len(offsets),
        next_packet_size=PAGE * len(offsets),
        packet_num=num,
        block_name=name,
        offsets=offsets,
    )
    return m.encode_packet_header(header) + b"".join(pages.values())


def sync_packet(num: int = 0, flags: int = m.Flag.SYNC) -> bytes:
    return m.encode_packet_header(
        m.PacketHeader(
            flags=flags, pages_alloc=128, normal_pages=0, next_packet_size=0, packet_num=num
        )
    )


def handshake(channel: int, uuid_int: int = 7) -> bytes:
    return m.encode_handshake(m.Handshake(uuid=uuid.UUID(int=uuid_int), channel_id=channel))


async def test_round_barrier_lets_the_newer_round_win_over_a_delayed_channel() -> None:
    # Channel 0 carries page 0 in round 1 but is delayed; channel 1 already carries the
    # page's round-2 content. Without the barrier the old content would land last.
    old, new = b"\x01" * PAGE, b"\x02" * PAGE
    target = m.RAMBlock("mem", pattern(2 * PAGE))
    connect, ends = memory_channels(2)
    s0, s1 = await connect(0), await connect(1)
    with trio.fail_after(10):
        async with m.open_receiver([target], channels=2) as receiver:
            await s0.send_all(handshake(0))
            await s1.send_all(
                handshake(1) + sync_packet() + make_packet("mem", {0: new}) + sync_packet()
            )
            await receiver.add_channel(ends[0])
            await receiver.add_channel(ends[1])
            await trio.sleep(0.2)
            assert receiver.rounds_completed == 0
            assert target.view == pattern(2 * PAGE)
            await s0.send_all(make_packet("mem", {0: old}) + sync_packet() + sync_packet())
            assert await receiver.sync() == 1
            assert await receiver.sync() == 2
            assert target.view == new + pattern(PAGE)
            await s0.send_eof()  # type: ignore[attr-defined]
            await s1.send_eof()  # type: ignore[attr-defined]
            await receiver.wait_closed()


async def one_channel_failure(sent: bytes, error: type[E], *, then_eof: bool = False) -> E:
    """The error a one-channel receiver of a 2-page block fails with on ``sent``."""
    target = m.RAMBlock("mem", pattern(2 * PAGE))
    connect, ends = memory_channels(1)
    s0 = await connect(0)
    await s0.send_all(sent)
    if then_eof:
        await s0.send_eof()  # type: ignore[attr-defined]
    with trio.fail_after(10), pytest.raises(error) as info:
        async with m.open_receiver([target], channels=1) as receiver:
            await receiver.add_channel(ends[0])
            await receiver.wait_closed()
    assert info.value.channel == 0
    return info.value


async def test_channel_ending_with_pages_after_its_last_sync_is_an_error() -> None:
    sent = handshake(0) + make_packet("mem", {0: b"x" * PAGE})
    error = await one_channel_failure(sent, m.TransferIncompleteError, then_eof=True)
    assert "after its last SYNC" in str(error)


async def test_a_stream_ending_while_another_channel_waits_at_sync_fails_its_channel() -> None:
    target = m.RAMBlock("mem", pattern(PAGE))
    with trio.fail_after(10):
        async with TcpLink.open() as link:
            s0, s1 = await link.connect(0), await link.connect(1)
            await s0.send_all(handshake(0) + sync_packet())
            await s1.send_all(handshake(1))
            with pytest.raises(m.TransferIncompleteError) as info:
                # One thread reads both channels: once it has read channel 0's SYNC, it
                # reads channel 1's end only after it has recorded that SYNC.
                async with m.open_receiver([target], channels=2, io_threads=1) as receiver:
                    await receiver.add_channel(await link.accept())
                    await receiver.add_channel(await link.accept())
                    # Polled: nothing signals that the receiver has read a socket.
                    while any(unread_bytes(s) for s in link.receiver_streams):  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    await s1.send_eof()  # type: ignore[attr-defined]
                    await receiver.wait_closed()
    assert info.value.channel == 1
    assert str(info.value) == (
        "channel 1: stream ended after round 0 while channel 0 waits at SYNC 1"
    )


async def test_a_sync_arriving_after_another_channel_ended_fails_the_arriving_channel(
    caplog: pytest.LogCaptureFixture,
) -> None:
    target = m.RAMBlock("mem", pattern(PAGE))
    connect, ends = memory_channels(2)
    s0, s1 = await connect(0), await connect(1)
    await s0.send_all(handshake(0))
    await s1.send_all(handshake(1))
    await s1.send_eof()  # type: ignore[attr-defined]
    ended = "receiver: channel 1 reached its end after round 0"
    with caplog.at_level(logging.INFO, logger="trio_multifd"), trio.fail_after(10):
        with pytest.raises(m.TransferIncompleteError) as info:
            async with m.open_receiver([target], channels=2) as receiver:
                await receiver.add_channel(ends[0])
                await receiver.add_channel(ends[1])
                # Polled: the log is the only sign that channel 1's end was recorded.
                while not any(r.getMessage() == ended for r in caplog.records):  # noqa: ASYNC110
                    await trio.sleep(0.01)
                await s0.send_all(sync_packet())
                await receiver.wait_closed()
    assert info.value.channel == 0
    assert str(info.value) == "channel 0: reached SYNC 1, but channel 1 ended after round 0"


async def test_receiver_sync_that_can_never_complete_raises() -> None:
    target = m.RAMBlock("mem", pattern(PAGE))
    connect, ends = memory_channels(1)
    s0 = await connect(0)
    await s0.send_all(handshake(0) + sync_packet())
    await s0.send_eof()  # type: ignore[attr-defined]
    with trio.fail_after(10):
        async with m.open_receiver([target], channels=1) as receiver:
            await receiver.add_channel(ends[0])
            assert await receiver.sync() == 1
            with pytest.raises(m.TransferIncompleteError, match="round 2 cannot complete"):
                await receiver.sync()
            await receiver.wait_closed()


async def test_uuid_none_adopts_the_first_channel_and_rejects_others() -> None:
    target = m.RAMBlock("mem", pattern(PAGE))
    connect, ends = memory_channels(2)
    s0, s1 = await connect(0), await connect(1)
    await s0.send_all(handshake(0, uuid_int=1))
    await s1.send_all(handshake(1, uuid_int=2))
    with trio.fail_after(10), pytest.raises(m.UUIDMismatchError) as info:
        async with m.open_receiver([target], channels=2) as receiver:
            assert await receiver.add_channel(ends[0]) == 0
            await receiver.add_channel(ends[1])
    assert info.value.channel == 1


async def test_stats_count_packets_pages_and_bytes_per_channel() -> None:
    src, dst = block_pair("mem", 256, seed=12)

    async def body(sender: m.Sender) -> None:
        await sender.queue_pages(src, range(0, src.size, PAGE))

    with trio.fail_after(20):
        sent, received, _ = await transfer([src], [dst], body, channels=2)
    assert sent.channels == received.channels
    header = m.header_size(128)
    expected_bytes = 2 * 64 + sent.packets * header + sent.normal_pages * PAGE
    assert sent.bytes == expected_bytes
    assert sent.page_bytes == 256 * PAGE
    assert sum(c.syncs for c in sent.channels) == 2


@contextlib.asynccontextmanager
async def sent_to(
    dst: m.RAMBlock, channels: int, body: Callable[[m.Sender], Awaitable[None]]
) -> AsyncIterator[m.Receiver]:
    """A receiver into ``dst`` whose sender (over memory streams) has run ``body`` and
    left its block; the receiver's block is still open, no round yet taken by sync()."""
    connect, ends = memory_channels(channels)
    async with m.open_receiver([dst], channels=channels) as receiver:
        async with trio.open_nursery() as nursery:
            for end in ends:
                nursery.start_soon(receiver.add_channel, end)
            async with m.open_sender(connect, channels=channels) as sender:
                await body(sender)
        yield receiver


async def test_round_figures_are_each_rounds_pages_until_sync_has_returned_a_later_round() -> None:
    src, dst = block_pair("mem", 64, seed=22)

    async def body(sender: m.Sender) -> None:
        await sender.queue_pages(src, range(0, src.size, PAGE))
        await sender.sync()
        await sender.queue_pages(src, range(0, PAGE * 8, PAGE))

    with trio.fail_after(20):
        async with sent_to(dst, 2, body) as receiver:
            # Recorded at completion (round 2 is the exit's), known before any sync().
            before = [receiver.round_figures(number) for number in (1, 2, 3)]
            assert await receiver.sync() == 1
            assert await receiver.sync() == 2
            after = [receiver.round_figures(number) for number in (1, 2)]
            await receiver.wait_closed()
    assert [None if f is None else f[0] for f in before] == [64, 8, None]
    assert all(f is not None and f[1] > 0 for f in before[:2])
    assert after == [None, before[1]]


async def test_round_figures_are_kept_for_a_bounded_number_of_rounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An application that never calls sync(), against a peer that rounds for ever, must
    # not keep a tuple per round: the oldest figures go first.
    monkeypatch.setattr(_receiver, "_KEPT_ROUND_FIGURES", 8)
    src, dst = block_pair("mem", 4, seed=23)

    async def body(sender: m.Sender) -> None:
        for _ in range(20):
            await sender.queue_page(src, 0)
            await sender.sync()

    with trio.fail_after(20):
        async with sent_to(dst, 1, body) as receiver:
            await receiver.wait_closed()
            kept = [receiver.round_figures(number) is not None for number in range(1, 22)]
    # 21 rounds (the exit's last one included), the last 8 kept.
    assert kept == [False] * 13 + [True] * 8


async def test_final_round_mark_reaches_the_receiver_even_when_it_lags() -> None:
    src, dst = block_pair("mem", 64, seed=21)
    finals: list[int | None] = []

    async def body(sender: m.Sender) -> None:
        await sender.queue_pages(src, range(0, src.size, PAGE))
        assert await sender.sync() == 1
        await sender.queue_pages(src, range(0, PAGE * 8, PAGE))
        assert await sender.sync(final_round=True) == 2

    with trio.fail_after(20):
        async with sent_to(dst, 2, body) as receiver:
            # The application only now looks at the rounds: the mark is already known.
            finals.append(receiver.final_round)
            marked = [receiver.is_final_round(number) for number in (1, 2, 3)]
            assert await receiver.sync() == 1
            assert await receiver.sync() == 2
            await receiver.wait_closed()
    assert finals == [2]
    assert marked == [False, True, False]
    assert dst.view == src.view


async def test_unsynced_pages_counts_the_pages_no_round_covers_yet() -> None:
    src, dst = block_pair("mem", 300, seed=22)
    counts: list[int] = []

    async def body(sender: m.Sender) -> None:
        counts.append(sender.unsynced_pages)
        await sender.queue_page(src, 0)  # gathered, not yet a packet
        await sender.queue_pages(src, range(0, 300 * PAGE, PAGE))
        counts.append(sender.unsynced_pages)
        await sender.sync()
        counts.append(sender.unsynced_pages)

    with trio.fail_after(20):
        await transfer([src], [dst], body, channels=2)
    assert counts == [0, 301, 0]
    assert dst.view == src.view


async def test_a_bad_offset_in_a_list_queues_none_of_its_pages() -> None:
    src, dst = block_pair("mem", 8, seed=3)

    async def body(sender: m.Sender) -> None:
        with pytest.raises(ValueError, match="page-aligned"):
            await sender.queue_pages(src, [0, PAGE, 2 * PAGE + 1])
        with pytest.raises(ValueError, match="page-aligned"):
            await sender.queue_pages(src, [PAGE, 8 * PAGE])
        with pytest.raises(ValueError, match="page-aligned"):
            await sender.queue_page(src, -PAGE)
        with pytest.raises(TypeError, match="an offset must be an integer, got float"):
            await sender.queue_pages(src, [0, float(PAGE)])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="an offset must be an integer, got str"):
            await sender.queue_page(src, "0")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="an offset must be an integer, got bool"):
            await sender.queue_pages(src, [PAGE, False])
        await sender.queue_page(src, 3 * PAGE)

    with trio.fail_after(30):
        sent, received, _ = await transfer([src], [dst], body, channels=2)
    assert sent.pages == received.pages == 1
    assert dst.view[3 * PAGE : 4 * PAGE] == src.view[3 * PAGE : 4 * PAGE]
    untouched = bytes(pattern(len(src.view)))
    assert dst.view[: 3 * PAGE] == untouched[: 3 * PAGE]
    assert dst.view[4 * PAGE :] == untouched[4 * PAGE :]


async def test_offsets_may_be_any_integers_such_as_numpys() -> None:
    import numpy as np

    src, dst = block_pair("mem", 8, seed=8)

    async def body(sender: m.Sender) -> None:
        await sender.queue_pages(src, np.arange(0, 4 * PAGE, PAGE, dtype=np.int64))
        await sender.queue_page(src, np.uint32(5 * PAGE))

    with trio.fail_after(30):
        sent, received, _ = await transfer([src], [dst], body, channels=2)
    assert sent.pages == received.pages == 5
    assert dst.view == landed(src.view, [0, 1, 2, 3, 5])


async def test_a_range_is_checked_by_its_ends_and_its_step() -> None:
    src, dst = block_pair("mem", 8, seed=4)

    async def body(sender: m.Sender) -> None:
        with pytest.raises(ValueError, match="page-aligned"):
            await sender.queue_pages(src, range(0, 9 * PAGE, PAGE))
        with pytest.raises(ValueError, match="range step"):
            await sender.queue_pages(src, range(0, 8 * PAGE, PAGE // 2))
        await sender.queue_pages(src, range(7 * PAGE, -1, -2 * PAGE))
        await sender.queue_pages(src, range(0, 0, PAGE))

    with trio.fail_after(30):
        sent, received, _ = await transfer([src], [dst], body, channels=2)
    assert sent.pages == received.pages == 4
    for page in range(8):
        chunk = slice(page * PAGE, (page + 1) * PAGE)
        expected = src.view[chunk] if page % 2 else pattern(len(src.view))[chunk]
        assert dst.view[chunk] == expected, page


async def test_pages_queued_one_by_one_across_blocks_all_land() -> None:
    # Pages gathered one by one are flushed at every change of block and at each sync,
    # and topped up to full packets by later lists and ranges of the same block.
    a_src, a_dst = block_pair("a", 300, seed=5)
    b_src, b_dst = block_pair("b", 300, seed=6)

    async def body(sender: m.Sender) -> None:
        for page in range(0, 300, 3):
            await sender.queue_page(a_src, page * PAGE)
            await sender.queue_page(b_src, page * PAGE)
        await sender.queue_page(a_src, PAGE)
        await sender.queue_pages(a_src, [p * PAGE for p in range(2, 300, 3)])
        await sender.sync()
        await sender.queue_page(b_src, PAGE)
        await sender.queue_pages(b_src, range(4 * PAGE, 300 * PAGE, 3 * PAGE))
        await sender.queue_pages(b_src, range(2 * PAGE, 300 * PAGE, 3 * PAGE))
        await sender.queue_pages(a_src, range(4 * PAGE, 300 * PAGE, 3 * PAGE))

    with trio.fail_after(30):
        sent, received, _ = await transfer([a_src, b_src], [a_dst, b_dst], body, channels=3)
    assert a_dst.view == a_src.view
    assert b_dst.view == b_src.view
    assert sent.pages == received.pages == 600


async def test_a_range_of_many_packets_lands_whole() -> None:
    src, dst = block_pair("mem", 128 * 40, seed=7)

    async def body(sender: m.Sender) -> None:
        await sender.queue_pages(src, range(0, src.size, PAGE))

    with trio.fail_after(60):
        sent, received, _ = await transfer([src], [dst], body, channels=4)
    assert dst.view == src.view
    assert sent.pages == received.pages == 128 * 40


async def test_a_cancelled_receiver_sync_gives_its_round_to_the_next_call() -> None:
    target = m.RAMBlock("mem", pattern(PAGE))
    connect, ends = memory_channels(1)
    s0 = await connect(0)
    await s0.send_all(handshake(0))
    with trio.fail_after(10):
        async with m.open_receiver([target], channels=1) as receiver:
            await receiver.add_channel(ends[0])
            with trio.CancelScope() as before_waiting:
                before_waiting.cancel()
                await receiver.sync()
            with trio.move_on_after(0.05) as while_waiting:
                await receiver.sync()
            assert before_waiting.cancelled_caught and while_waiting.cancelled_caught
            await s0.send_all(sync_packet(0) + sync_packet(1))
            assert await receiver.sync() == 1
            assert await receiver.sync() == 2
            await s0.send_eof()  # type: ignore[attr-defined]
            await receiver.wait_closed()


async def test_concurrent_receiver_syncs_keep_their_rounds_when_one_is_cancelled() -> None:
    target = m.RAMBlock("mem", pattern(PAGE))
    connect, ends = memory_channels(1)
    s0 = await connect(0)
    await s0.send_all(handshake(0))
    rounds: list[int] = []

    async def wait_for_a_round() -> None:
        rounds.append(await receiver.sync())

    with trio.fail_after(10):
        async with m.open_receiver([target], channels=1) as receiver, trio.open_nursery() as waits:
            await receiver.add_channel(ends[0])
            with trio.CancelScope() as first:

                async def cancel_first() -> None:
                    await trio.testing.wait_all_tasks_blocked()
                    first.cancel()

                waits.start_soon(wait_for_a_round)  # round 2: taken while round 1 waits
                waits.start_soon(cancel_first)
                await receiver.sync()  # round 1, until cancelled
            assert rounds == []
            await s0.send_all(sync_packet(0))
            # Round 1 again, given back by the cancelled call.
            assert await receiver.sync() == 1
            await s0.send_all(sync_packet(1))
            await s0.send_eof()  # type: ignore[attr-defined]
            await receiver.wait_closed()
    assert rounds == [2]


async def test_an_end_of_stream_flag_is_refused_on_a_channel_that_did_not_announce_it() -> None:
    # QEMU's channels end with the stream itself; bytes after the flag would go unread.
    sent = handshake(0) + sync_packet(0, m.Flag.SYNC | m.Flag.END_OF_STREAM)
    assert "did not announce it" in str(await one_channel_failure(sent, m.FlagsError))


async def test_an_end_of_stream_flag_without_sync_is_refused() -> None:
    # Only the final SYNC ends a stream; the flag elsewhere left the rest unread.
    announcing = m.encode_handshake(
        m.Handshake(uuid=uuid.UUID(int=7), channel_id=0, features=m.Feature.IN_BAND_END)
    )
    sent = announcing + sync_packet(0, m.Flag.END_OF_STREAM)
    assert "without SYNC" in str(await one_channel_failure(sent, m.FlagsError))
