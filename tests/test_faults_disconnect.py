"""Disconnects: a proxy on 127.0.0.1 cuts channel 1 at an exact byte of the sender's
stream, by closing both sides or by resetting them (``SO_LINGER`` 0), while channel 0
stays healthy and direct.

What each end raises (class, channel), by where the cut falls:

===============================  ===========================  =================  =================
cut                              receiver, ``close``          receiver,          sender (both)
                                                              ``reset``
===============================  ===========================  =================  =================
during the handshake             TruncatedError, None (from   TransportError,    TransportError,
                                 ``add_channel``)             None (same)        0 or 1
inside a packet header           TruncatedError, 1            TransportError, 1  TransportError, 0
inside a payload                 TruncatedError, 1            TransportError, 1  TransportError, 0
between packets                  TransferIncompleteError, 1   TransportError, 1  TransportError, 0
while the sender waits in sync   TruncatedError, 1            TransportError, 1  TransportError, 0
while the receiver waits at a    TransferIncompleteError, 1   TransportError, 1  TransportError, 0
SYNC barrier
while the sender's exit waits    TransferIncompleteError, 1   TransportError, 1  DeliveryError, 0
for the confirmation
===============================  ===========================  =================  =================

The receiver's side is cut first, so what it reports does not depend on timing. The
sender's error names the channel whose failure it meets first: a write fails
(``TransportError``), or, only once it has written everything and waits at its exit, it
finds no clean close from the receiver (``DeliveryError``). Each end moves its channels
in one thread (``io_threads=1``), which waits on both, and the proxy cuts the sender's side
of channel 1 only once the receiver has closed its own; from the packets on, the receiver
resets channel 0 first, so the sender names channel 0. A cut handshake is another race:
``add_channel`` closes channel 1 at once, before the failed transfer resets channel 0, and
the sender names whichever reset reaches it first (usually channel 1).
"""

from __future__ import annotations

from typing import Literal

import attrs
import pytest
import trio

import trio_multifd as m

from .helpers import PAGE, block_pair, page_states
from .proxy import (
    HEADER,
    At,
    CuttingProxy,
    Outcome,
    TcpLink,
    queue_everything,
    run_faulty_transfer,
)
from .transfer import listening

PAGES = 512  # four packets of 128 pages: channel 1 carries at least one of them

How = Literal["close", "reset"]


@attrs.frozen
class Case:
    at: At
    position: int | None  # the absolute byte of the cut, when it does not depend on routing
    in_sync: bool = False  # cut only once the sender waits in sync()
    hold: float = 0.0
    patience: float = 5.0  # how long the sender waits for the receiver's verdict


CASES = {
    "handshake": Case(At("handshake", offset=30), 30),
    "header": Case(At("header", 0, 100), 64 + 100),
    "payload": Case(At("payload", 0, 5000), 64 + HEADER + 5000),
    "between-packets": Case(At("header", 1, 0), None),
    "sender-in-sync": Case(At("payload", 0, 5000), 64 + HEADER + 5000, in_sync=True, hold=0.2),
    "receiver-at-barrier": Case(At("sync", 0, 0), None, hold=0.3),
    # Round 1 is complete; the cut swallows channel 1's final SYNC (round 2) while the
    # sender, done writing, waits at its exit for the receiver's clean close.
    "sender-awaits-confirmation": Case(At("sync", 1, 0), None, hold=0.3, patience=0),
}

# (receiver's exception, its channel) by case and by how the cut is made.
RECEIVER_SEES: dict[tuple[str, How], tuple[type[m.MultiFDError], int | None]] = {
    ("handshake", "close"): (m.TruncatedError, None),
    ("handshake", "reset"): (m.TransportError, None),
    ("header", "close"): (m.TruncatedError, 1),
    ("header", "reset"): (m.TransportError, 1),
    ("payload", "close"): (m.TruncatedError, 1),
    ("payload", "reset"): (m.TransportError, 1),
    ("between-packets", "close"): (m.TransferIncompleteError, 1),
    ("between-packets", "reset"): (m.TransportError, 1),
    ("sender-in-sync", "close"): (m.TruncatedError, 1),
    ("sender-in-sync", "reset"): (m.TransportError, 1),
    ("receiver-at-barrier", "close"): (m.TransferIncompleteError, 1),
    ("receiver-at-barrier", "reset"): (m.TransportError, 1),
    ("sender-awaits-confirmation", "close"): (m.TransferIncompleteError, 1),
    ("sender-awaits-confirmation", "reset"): (m.TransportError, 1),
}

# (the sender's exception, the channels it may name) by case, however the cut is made.
SENDER_SEES: dict[str, tuple[type[m.MultiFDError], set[int]]] = {
    "handshake": (m.TransportError, {0, 1}),
    "header": (m.TransportError, {0}),
    "payload": (m.TransportError, {0}),
    "between-packets": (m.TransportError, {0}),
    "sender-in-sync": (m.TransportError, {0}),
    "receiver-at-barrier": (m.TransportError, {0}),
    "sender-awaits-confirmation": (m.DeliveryError, {0}),
}


@attrs.define
class Run:
    outcome: Outcome
    proxy: CuttingProxy
    src: m.RAMBlock
    dst: m.RAMBlock
    sync_returned: bool


async def cut_channel_1(case: Case, how: How) -> Run:
    src, dst = block_pair("mem", PAGES, seed=7)
    in_sync = trio.Event()
    sync_returned = False

    async def body(sender: m.Sender) -> None:
        nonlocal sync_returned
        await sender.queue_pages(src, range(0, src.size, PAGE))
        in_sync.set()
        await sender.sync()
        sync_returned = True

    async with TcpLink.open() as link:
        proxy = CuttingProxy(
            link.port,
            case.at,
            how,
            after=in_sync if case.in_sync else None,
            hold=case.hold,
            link=link,
        )
        link.sndbuf = 32 * 1024
        async with proxy.running():
            link.route[1] = proxy.port
            # One thread a side: which channel's failure the sender meets first does
            # not depend on how many cores share out the channels.
            outcome = await run_faulty_transfer(
                link,
                [src],
                [dst],
                body=body,
                patience=case.patience,
                sender_options={"io_threads": 1},
                receiver_options={"io_threads": 1},
            )
            with trio.fail_after(3):
                await proxy.cut.wait()
    return Run(outcome, proxy, src, dst, sync_returned)


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("where", list(CASES))
async def test_a_cut_channel_fails_both_ends_with_the_documented_errors(
    where: str, how: How
) -> None:
    case = CASES[where]
    with trio.fail_after(15):
        run = await cut_channel_1(case, how)
    outcome = run.outcome
    expected, channel = RECEIVER_SEES[where, how]
    assert type(outcome.receiver) is expected, repr(outcome.receiver)
    assert outcome.receiver.channel == channel
    if where == "handshake":
        assert outcome.added == [outcome.receiver]
    sender_expected, sender_channels = SENDER_SEES[where]
    assert type(outcome.sender) is sender_expected, repr(outcome.sender)
    assert outcome.sender.channel in sender_channels
    assert outcome.sender_closed and outcome.receiver_closed
    if case.position is not None:
        assert run.proxy.forwarded == case.position
    # Whole pages of the source, but for the payload each channel was cut inside.
    states = page_states(run.src.view, run.dst.view)
    assert "damaged" not in states
    assert states.count("partly") <= 2


async def test_a_header_cut_on_a_socket_reports_the_bytes_of_the_whole_header() -> None:
    with trio.fail_after(15):
        run = await cut_channel_1(CASES["header"], "close")
    error = run.outcome.receiver
    assert type(error) is m.TruncatedError
    assert (error.value, error.limit) == (100, HEADER)
    assert f"after 100 of {HEADER} bytes" in str(error)


async def test_a_cut_while_the_sender_waits_in_sync_ends_that_sync() -> None:
    with trio.fail_after(15):
        run = await cut_channel_1(CASES["sender-in-sync"], "reset")
    assert not run.sync_returned


async def test_a_cut_while_the_receiver_waits_at_a_barrier_leaves_the_round_open() -> None:
    with trio.fail_after(15):
        run = await cut_channel_1(CASES["receiver-at-barrier"], "close")
    receiver = run.outcome.receiver_object
    assert receiver is not None
    assert receiver.rounds_completed == 0
    assert receiver.stats.channels[0].syncs == 1  # channel 0 was waiting at SYNC 1
    assert receiver.stats.channels[1].syncs == 0
    assert "pages after its last SYNC" in str(run.outcome.receiver)


async def test_a_cut_swallowing_the_final_sync_fails_the_sender_exit() -> None:
    # Channel 1's sender sees an orderly close from the proxy, as if confirmed; the
    # receiver's reset of channel 0 still keeps the sender from reporting success.
    with trio.fail_after(15):
        run = await cut_channel_1(CASES["sender-awaits-confirmation"], "close")
    assert run.sync_returned
    assert type(run.outcome.sender) is m.DeliveryError
    assert run.outcome.sender.channel == 0
    assert "channel 0 waits at SYNC 2" in str(run.outcome.receiver)
    assert run.dst.view == run.src.view  # round 1 was complete


async def test_a_stream_that_ends_before_the_cut_point_passes_through_whole() -> None:
    # The proxy itself is transparent: with the cut beyond the stream, the transfer works.
    src, dst = block_pair("mem", 64, seed=8)
    with trio.fail_after(15):
        async with TcpLink.open() as link:
            proxy = CuttingProxy(link.port, At("stream", offset=10**9), "reset", link=link)
            async with proxy.running():
                link.route[1] = proxy.port
                async with m.open_receiver([dst], channels=2) as receiver:
                    async with trio.open_nursery() as nursery:

                        async def add_two() -> None:
                            for _ in range(2):
                                await receiver.add_channel(await link.accept())

                        nursery.start_soon(add_two)
                        async with m.open_sender(link.connect, channels=2) as sender:
                            await queue_everything([src], sender)
                    await receiver.wait_closed()
                assert not proxy.reached.is_set()
            assert link.all_closed("sender") and link.all_closed("receiver")
    assert dst.view == src.view


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_a_receiver_that_closed_before_the_final_sync_is_no_delivery(kind: str) -> None:
    # A FIN with nothing unread, as a crashed receiver's, must not pass for the clean
    # close that confirms delivery, even when the sender is never idle long enough for
    # its idle check to see it (it then finds it before writing the final SYNC).
    src, _ = block_pair("mem", 16)
    closed = trio.Event()
    streams: list[trio.SocketStream] = []
    async with listening(kind) as (listeners, connect):

        async def closing_receiver() -> None:
            for _ in range(2):
                stream = await listeners[0].accept()
                await stream.receive_some(m.HANDSHAKE_SIZE)  # the handshake only
                await stream.send_eof()
                streams.append(stream)
            closed.set()

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(closing_receiver)
                with pytest.raises(m.TransportError) as info:
                    async with m.open_sender(connect, channels=2) as sender:
                        await closed.wait()
                        await sender.queue_pages(src, range(0, src.size, PAGE))
            for stream in streams:
                await stream.aclose()
    assert info.value.channel in (0, 1)
    assert "the receiver closed the channel while" in str(info.value)


@pytest.mark.parametrize(("kind", "in_band"), [("tcp", False), ("unix", True)])
async def test_only_a_sender_over_tcp_leaves_its_end_to_the_stream(
    kind: str, in_band: bool
) -> None:
    # A Unix socket has no reset, and its failure byte cannot go in while the receiver
    # is behind and the socket's buffer full: its stream ended right after a SYNC then,
    # which passed for the end of the transfer. Like a memory stream's, its end is now
    # announced in the handshake and flagged on the final SYNC.
    src, _ = block_pair("mem", 4)
    received = bytearray()
    async with listening(kind) as (listeners, connect):

        async def reading_receiver() -> None:
            async with await listeners[0].accept() as stream:
                while data := await stream.receive_some():
                    received.extend(data)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reading_receiver)
                async with m.open_sender(connect, channels=1) as sender:
                    await sender.queue_pages(src, range(0, src.size, PAGE))
    handshake = m.decode_handshake(received[: m.HANDSHAKE_SIZE], channels=1)
    assert bool(handshake.features & m.Feature.IN_BAND_END) == in_band
    last = m.decode_packet_header(received[-HEADER:], page_count=128)
    assert last.is_sync
    assert bool(last.flags & m.Flag.END_OF_STREAM) == in_band
