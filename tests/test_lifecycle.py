"""Teardown and errors: one clear exception, nothing left running or open."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing

import trio_multifd as m
from trio_multifd import _transport

from . import captures
from .helpers import (
    PAGE,
    TrackedStream,
    block_pair,
    memory_channels,
    pattern,
    run_both_ends,
)
from .transfer import listening


async def test_a_header_cut_short_reports_the_bytes_of_the_whole_header() -> None:
    # The first read brings part of the header, the rest never comes: the message counts
    # from the header's first byte, not from the part still missing.
    header = m.header_size(128)
    connect, ends = memory_channels(1)
    feed = await connect(0)
    await feed.send_all(captures.load("nocomp")[: m.HANDSHAKE_SIZE + 500])
    await feed.send_eof()  # type: ignore[attr-defined]
    target = m.RAMBlock("mem", pattern(captures.GUEST_RAM_SIZE))
    with trio.fail_after(20), pytest.raises(m.TruncatedError) as info:
        async with m.open_receiver([target], channels=1, uuid=uuid.UUID(int=0)) as receiver:
            assert await receiver.add_channel(ends[0]) == 0
            await receiver.wait_closed()
    assert (info.value.value, info.value.limit) == (500, header)
    assert f"inside a packet header after 500 of {header} bytes" in str(info.value)


async def test_qemu_capture_replays_into_a_receiver_then_reports_the_cut() -> None:
    data = captures.load("nocomp")
    ram = captures.nocomp_guest_ram()
    target = m.RAMBlock("mem", pattern(captures.GUEST_RAM_SIZE))
    connect, ends = memory_channels(1)
    feed = await connect(0)
    await feed.send_all(data)
    await feed.send_eof()  # type: ignore[attr-defined]
    with trio.fail_after(20), pytest.raises(m.TruncatedError) as info:
        async with m.open_receiver([target], channels=1, uuid=uuid.UUID(int=0)) as receiver:
            assert await receiver.add_channel(ends[0]) == 0
            assert await receiver.sync() == 1
            await receiver.wait_closed()
    assert info.value.channel == 0
    assert str(info.value).startswith("channel 0")
    assert "inside a payload" in str(info.value)
    # Whole packets: pages 0..895 (offsets 0, 1 MiB, ... in runs of 128). The cut packet
    # (pages 1792..1919 here) may have landed a prefix, and one page partly.
    whole = {p for n in range(7) for p in range(n * 256, n * 256 + 128)}
    partly = 0
    for page in range(captures.GUEST_RAM_SIZE // PAGE):
        got = bytes(target.view[page * PAGE : (page + 1) * PAGE])
        want = ram[page * PAGE : (page + 1) * PAGE]
        if page in whole:
            assert got == want, page
        elif 1792 <= page < 1920 and got != want and got != pattern(PAGE):
            partly += 1
        elif not 1792 <= page < 1920:
            assert got == pattern(PAGE), page
    assert partly <= 1
    assert receiver.stats.normal_pages == 896


async def _send_all_then_sync(
    connect: Callable[[int], Awaitable[trio.abc.Stream]], block: m.RAMBlock
) -> m.MultiFDError | None:
    """Send every page of ``block`` and a SYNC over 2 channels; the sender's error."""
    try:
        async with m.open_sender(connect, channels=2) as sender:
            await sender.queue_pages(block, range(0, block.size, PAGE))
            await sender.sync()
    except m.MultiFDError as exc:
        return exc
    return None


async def _sender_with_broken_channel(
    via_memory: bool,
) -> tuple[list[TrackedStream], BaseException, BaseException]:
    src, dst = block_pair("mem", 512, seed=1)
    tracked: list[TrackedStream] = []
    receiver_error: BaseException | None = None
    sender_error: BaseException | None = None

    # Channel 1 breaks inside the first packet it sends after its handshake: which
    # channel's thread takes which batch of pages is up to the sender (under load one
    # thread may take them all), but every channel sends at least its SYNC.
    cut = m.HANDSHAKE_SIZE + m.header_size(128) // 2

    def wrap(channel: int, stream: trio.abc.Stream) -> trio.abc.Stream:
        t = TrackedStream(stream, break_after=cut if channel == 1 else None)
        tracked.append(t)
        return t

    async def run_receiver(
        ends: list[trio.abc.Stream], task_status: trio.TaskStatus[m.Receiver]
    ) -> None:
        nonlocal receiver_error
        try:
            async with m.open_receiver([dst], channels=2) as receiver:
                task_status.started(receiver)
                for end in ends:
                    await receiver.add_channel(end)
                await receiver.wait_closed()
        except m.MultiFDError as exc:
            receiver_error = exc

    connect, ends = memory_channels(2, wrap=wrap)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_receiver, ends)
        sender_error = await _send_all_then_sync(connect, m.RAMBlock("mem", src.view))
    assert sender_error is not None and receiver_error is not None
    return tracked, sender_error, receiver_error


async def test_a_channel_failing_mid_transfer_fails_both_ends_and_closes_everything() -> None:
    with trio.fail_after(20):
        tracked, sender_error, receiver_error = await _sender_with_broken_channel(True)
    assert isinstance(sender_error, m.TransportError)
    assert sender_error.channel == 1
    # The sender cuts channel 1 first, then the others as it tears down; the receiver
    # reads each channel in a thread of its own (memory streams), so it may see another
    # channel's cut first: it names the channel it saw end.
    assert isinstance(
        receiver_error, m.TruncatedError | m.TransportError | m.TransferIncompleteError
    )
    assert receiver_error.channel in (0, 1)
    assert str(receiver_error).startswith(f"channel {receiver_error.channel}")
    assert all(t.closed for t in tracked)
    # The stream's own failure, not the transfer's nursery group.
    assert isinstance(sender_error.__cause__, trio.BrokenResourceError)
    assert str(sender_error.__cause__) == "injected fault"


async def test_application_exception_passes_through_unchanged_and_closes_channels() -> None:
    src, dst = block_pair("mem", 16)
    connect, ends = memory_channels(2, wrap=lambda i, s: TrackedStream(s))
    opened: list[trio.abc.Stream] = []

    async def tracking_connect(channel: int) -> trio.abc.Stream:
        stream = await connect(channel)
        opened.append(stream)
        return stream

    class Boom(Exception):
        pass

    boom = Boom()
    with trio.fail_after(10), pytest.raises(m.TransportError) as received:
        async with m.open_receiver([dst], channels=2) as receiver:
            async with trio.open_nursery() as nursery:
                for end in ends:
                    nursery.start_soon(receiver.add_channel, end)
                with pytest.raises(Boom) as info:
                    async with m.open_sender(tracking_connect, channels=2) as sender:
                        await sender.queue_pages(src, range(0, src.size, PAGE))
                        raise boom
                assert info.value is boom
                assert all(isinstance(s, TrackedStream) and s.closed for s in opened)
            await receiver.wait_closed()
    # Memory streams cannot be reset: the sender wrote its failure signal on each channel,
    # and the receiver says so on the first channel it read it from.
    error = received.value
    assert type(error) is m.TransportError
    assert error.channel in (0, 1)
    assert str(error).startswith(f"channel {error.channel}: ")
    assert "failure signal" in str(error)


def track(tracked: list[TrackedStream], stream: trio.abc.Stream) -> TrackedStream:
    """Wrap ``stream`` in a :class:`TrackedStream` kept in ``tracked``."""
    tracked.append(TrackedStream(stream))
    return tracked[-1]


async def test_keyboard_interrupt_in_the_body_shuts_down_cleanly() -> None:
    src, _ = block_pair("mem", 4)
    tracked: list[TrackedStream] = []
    connect, _ = memory_channels(1, wrap=lambda i, s: track(tracked, s))
    with trio.fail_after(10), pytest.raises(KeyboardInterrupt):
        async with m.open_sender(connect, channels=1) as sender:
            await sender.queue_page(src, 0)
            raise KeyboardInterrupt
    assert len(tracked) == 1
    assert tracked[0].closed


async def test_cancellation_from_outside_shuts_the_sender_down() -> None:
    src, _ = block_pair("mem", 4)
    tracked: list[TrackedStream] = []
    connect, _ = memory_channels(2, wrap=lambda i, s: track(tracked, s))
    with trio.fail_after(10):
        # Long enough for a loaded machine to open both channels and reach sync().
        with trio.move_on_after(1) as scope:
            async with m.open_sender(connect, channels=2) as sender:
                await sender.queue_page(src, 0)
                await sender.sync()  # nobody reads: waits until cancelled
        assert scope.cancelled_caught
    assert len(tracked) == 2
    assert all(stream.closed for stream in tracked)


async def _receive_until_it_ends(
    nursery: trio.Nursery,
    listeners: list[trio.SocketListener],
    target: m.RAMBlock,
    rounds: list[int],
    errors: list[m.MultiFDError],
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """Receive ``target`` over two channels from ``listeners``, recording the rounds the
    application saw and the receiver's error; started once it listens."""
    try:
        async with m.open_receiver([target], channels=2) as receiver:
            await nursery.start(receiver.serve, listeners)
            task_status.started()
            while True:
                rounds.append(await receiver.sync())
    except m.TransferIncompleteError:
        pass
    except m.MultiFDError as exc:
        errors.append(exc)


@pytest.mark.parametrize("via", ["tcp", "unix"])
async def test_a_sender_cancelled_after_a_round_is_a_transport_error_at_the_receiver(
    via: str,
) -> None:
    # On TCP the cancelled sender resets its channels; a Unix socket has no reset, so it
    # writes its failure signal: either way the receiver names a channel and says the
    # sender failed, rather than reporting a packet header cut after one byte.
    src, dst = block_pair("mem", 256)
    rounds: list[int] = []
    errors: list[m.MultiFDError] = []
    with trio.fail_after(20):
        async with listening(via) as (listeners, connect):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    _receive_until_it_ends, nursery, listeners, dst, rounds, errors
                )
                with trio.CancelScope() as scope:
                    async with m.open_sender(connect, channels=2) as sender:
                        await sender.queue_pages(src, range(0, src.size, PAGE))
                        await sender.sync()
                        scope.cancel()
                        await trio.lowlevel.checkpoint()  # cancelled in the body
                assert scope.cancelled_caught
    assert rounds == [1]
    assert dst.view == src.view  # the completed round is all there
    [error] = errors
    assert isinstance(error, m.TransportError)
    assert error.channel in (0, 1)
    if via == "unix":
        assert "failure signal" in str(error)


async def test_receiver_failure_reaches_the_sender_as_a_multifd_error_over_tcp() -> None:
    src, _ = block_pair("mem", 256)
    wrong = m.RAMBlock("other", pattern(256 * PAGE))
    sender_error: BaseException | None = None
    rounds: list[int] = []
    errors: list[m.MultiFDError] = []
    with trio.fail_after(20):
        async with listening("tcp") as (listeners, connect):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    _receive_until_it_ends, nursery, listeners, wrong, rounds, errors
                )
                sender_error = await _send_all_then_sync(connect, src)
    assert rounds == []
    [error] = errors
    assert isinstance(error, m.UnknownBlockError)
    assert isinstance(sender_error, m.TransportError | m.DeliveryError)


async def test_sender_exit_reports_failure_when_the_receiver_leaves_early() -> None:
    src, dst = block_pair("mem", 8)

    async def receive_then_leave() -> None:
        async with m.open_receiver([dst], channels=2) as receiver:
            await receiver.serve(listeners)
        # Left before the transfer completed: every channel was reset.

    with trio.fail_after(20):
        async with listening("tcp") as (listeners, connect):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive_then_leave)
                with pytest.raises((m.DeliveryError, m.TransportError)) as info:
                    async with m.open_sender(connect, channels=2) as sender:
                        await sender.queue_pages(src, range(0, src.size, PAGE))
    assert info.value.channel in (0, 1)


@pytest.mark.parametrize("io_threads", [1, 4])
async def test_a_receiver_leaving_on_an_exception_after_a_complete_transfer_confirms_it(
    io_threads: int,
) -> None:
    # The receiver follows the rounds until sync() says the sender has ended, and leaves
    # with that exception: the transfer completed, so the sender still gets its clean
    # close, whether the channels share a thread or not.
    src, dst = block_pair("mem", 600, seed=6)
    rounds: list[int] = []

    async def follow_rounds_then_leave() -> None:
        with pytest.raises(m.TransferIncompleteError):
            async with m.open_receiver([dst], channels=4, io_threads=io_threads) as receiver:
                await receiver.serve(listeners)
                while True:
                    rounds.append(await receiver.sync())

    with trio.fail_after(20):
        async with listening("tcp") as (listeners, connect):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow_rounds_then_leave)
                async with m.open_sender(connect, channels=4, io_threads=io_threads) as sender:
                    await sender.queue_pages(src, range(0, src.size, PAGE))
                    await sender.sync()
    assert rounds == [1, 2]
    assert dst.view == src.view


async def test_a_bug_in_another_task_stays_visible_behind_the_transfers_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reset = _transport.Transport.reset

    async def buggy_reset(self: _transport.Transport) -> None:
        if self.channel == 0:
            raise ZeroDivisionError("a bug in channel 0's teardown")
        await reset(self)

    monkeypatch.setattr(_transport.Transport, "reset", buggy_reset)
    src, dst = block_pair("mem", 256, seed=3)
    # Channel 1 breaks inside its first packet (every channel sends at least its SYNC).
    cut = m.HANDSHAKE_SIZE + m.header_size(128) // 2
    connect, ends = memory_channels(
        2, wrap=lambda i, s: TrackedStream(s, break_after=cut if i == 1 else None)
    )
    sender_error: BaseException | None = None

    async def run_receiver() -> None:
        with contextlib.suppress(m.MultiFDError):
            async with m.open_receiver([dst], channels=2) as receiver:
                for end in ends:
                    await receiver.add_channel(end)
                await receiver.wait_closed()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_receiver)
            sender_error = await _send_all_then_sync(connect, src)
    assert isinstance(sender_error, m.TransportError)
    assert sender_error.channel == 1
    # The transfer's nursery group is chained, over the error's own cause, because it
    # holds the other task's bug, which must not vanish.
    group = sender_error.__cause__
    assert isinstance(group, BaseExceptionGroup)
    bugs, _ = group.split(ZeroDivisionError)
    assert bugs is not None


class _SlowSendStream(TrackedStream):
    """A stream whose send_all waits before it writes a byte (a rate limiter, a lock
    around a shared transport): a cancel lands there with nothing of the packet sent."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.sleep(0.05)
        await super().send_all(data)


@pytest.mark.parametrize("channels", [1, 2])
async def test_a_sender_cancelled_inside_send_all_is_never_taken_for_a_finished_transfer(
    channels: int,
) -> None:
    # Cut before any byte of a packet, on streams without a reset: no failure byte can
    # follow, and every channel ends right after a SYNC. Only the in-band end of the
    # final SYNC tells a finished transfer from this one.
    pairs = [trio.testing.memory_stream_pair() for _ in range(channels)]
    sending = [_SlowSendStream(a) for a, _ in pairs]
    src, dst = block_pair("mem", 256, seed=5)
    receiver_errors: list[m.MultiFDError] = []

    async def connect(channel: int) -> trio.abc.Stream:
        return sending[channel]

    async def run_receiver() -> None:
        try:
            async with m.open_receiver([dst], channels=channels) as receiver:
                for _, end in pairs:
                    await receiver.add_channel(end)
                await receiver.wait_closed()
        except m.MultiFDError as exc:
            receiver_errors.append(exc)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_receiver)
            with trio.CancelScope() as scope:
                async with m.open_sender(connect, channels=channels) as sender:
                    await sender.queue_pages(src, range(0, 128 * PAGE, PAGE))
                    await sender.sync()
                    await sender.queue_pages(src, range(128 * PAGE, src.size, PAGE))
                    await trio.sleep(0.02)  # the threads wait inside send_all
                    scope.cancel()
                    await trio.sleep_forever()
    [error] = receiver_errors
    assert isinstance(error, m.TransportError)
    assert error.message == (
        "the stream ended before the sender's final SYNC (its handshake announced an"
        " in-band end): the sender failed or was cancelled"
    )


async def test_a_slow_handshake_is_bounded_by_handshake_timeout_not_receive_timeout() -> None:
    ours, theirs = trio.testing.memory_stream_pair()

    async def hello_later() -> None:
        await trio.sleep(0.5)
        await ours.send_all(m.encode_handshake(m.Handshake(uuid=uuid.uuid4(), channel_id=0)))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hello_later)
            async with m.open_receiver(
                [m.RAMBlock("mem", bytearray(PAGE))],
                channels=1,
                receive_timeout=0.1,
                handshake_timeout=5,
            ) as receiver:
                assert await receiver.add_channel(theirs) == 0
                # Leaving early: the channel is reset, the sender would see its failure.


async def test_add_channel_after_the_receivers_block_refuses_and_closes_the_stream() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    async with m.open_receiver([m.RAMBlock("mem", bytearray(PAGE))], channels=1) as receiver:
        pass
    with pytest.raises(RuntimeError, match="the receiver's block is over"):
        await receiver.add_channel(theirs)
    # Closed as a failure: the failure byte, then the end.
    assert await ours.receive_some() == b"!"
    assert await ours.receive_some() == b""


async def test_a_stream_added_twice_is_refused_at_once_and_left_to_its_channel() -> None:
    src, dst = block_pair("mem", 8, seed=6)
    connect, ends = memory_channels(2)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with m.open_receiver([dst], channels=2) as receiver:
                nursery.start_soon(receiver.add_channel, ends[0])
                await trio.testing.wait_all_tasks_blocked()  # reading its handshake
                with pytest.raises(ValueError, match="this stream was added before"):
                    await receiver.add_channel(ends[0])
                nursery.start_soon(receiver.add_channel, ends[1])
                assert await _send_all_then_sync(connect, src) is None
                await receiver.wait_closed()
    assert dst.view == src.view


@pytest.mark.parametrize("call", ["sync", "wait_closed"])
@pytest.mark.parametrize("ending", ["exit", "failure", "before-the-call"])
async def test_a_task_outside_the_receivers_block_waiting_for_it_is_woken_when_it_ends(
    call: str, ending: str
) -> None:
    connect, ends = memory_channels(1)
    feed = await connect(0)
    await feed.send_all(m.encode_handshake(m.Handshake(uuid=uuid.uuid4(), channel_id=0)))
    woken: list[RuntimeError] = []

    async def wait_outside(receiver: m.Receiver) -> None:
        over = "the transfer failed" if ending == "failure" else "the receiver's block is over"
        with pytest.raises(RuntimeError, match=over) as info:
            await getattr(receiver, call)()
        woken.append(info.value)

    with trio.fail_after(10):
        async with trio.open_nursery() as outside:
            with contextlib.suppress(m.MagicError):
                async with m.open_receiver([m.RAMBlock("mem", bytearray(PAGE))]) as receiver:
                    await receiver.add_channel(ends[0])
                    if ending != "before-the-call":
                        outside.start_soon(wait_outside, receiver)
                        await trio.testing.wait_all_tasks_blocked()
                    if ending == "failure":
                        await feed.send_all(bytes(m.header_size(128)))  # no magic
                        await trio.sleep_forever()
            if ending == "before-the-call":
                await wait_outside(receiver)
    [error] = woken
    assert isinstance(error.__cause__, m.MagicError) == (ending == "failure")


async def test_a_call_after_a_failed_receivers_block_has_the_error_as_cause_while_it_is_held() -> (
    None
):
    # The receiver holds its error only weakly once its block is over (a strong
    # reference would tie it to its own traceback); a call still says that it failed.
    connect, ends = memory_channels(1)
    feed = await connect(0)
    await feed.send_all(m.encode_handshake(m.Handshake(uuid=uuid.uuid4(), channel_id=0)))
    with trio.fail_after(10):
        with pytest.raises(m.MagicError) as failure:
            async with m.open_receiver([m.RAMBlock("mem", bytearray(PAGE))]) as receiver:
                await receiver.add_channel(ends[0])
                await feed.send_all(bytes(m.header_size(128)))  # no magic
                await trio.sleep_forever()
        with pytest.raises(RuntimeError, match=r"^the transfer failed: ") as held:
            await receiver.sync()
        assert held.value.__cause__ is failure.value
        del failure, held
        with pytest.raises(RuntimeError, match=r"^the transfer failed: "):
            await receiver.wait_closed()


@pytest.mark.parametrize("ending", ["failure", "cancel-from-outside"])
async def test_shielded_waits_in_the_receivers_block_are_woken_when_the_transfer_ends(
    ending: str,
) -> None:
    # The block's own tasks, shielded (cleanup that must not be cut short), wait for a
    # round and for the end. The block's exit waits for them: they must not wait for a
    # transfer that is over.
    connect, ends = memory_channels(1)
    feed = await connect(0)
    await feed.send_all(m.encode_handshake(m.Handshake(uuid=uuid.uuid4(), channel_id=0)))
    outcomes: dict[str, RuntimeError] = {}

    async def shielded(name: str, call: Callable[[], Awaitable[object]]) -> None:
        # A deadline of its own: the test's fail_after cannot reach into the shield.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
            try:
                await call()
            except RuntimeError as exc:
                outcomes[name] = exc

    with trio.fail_after(10), trio.CancelScope() as outside:
        with contextlib.suppress(m.MagicError):
            async with m.open_receiver([m.RAMBlock("mem", bytearray(PAGE))]) as receiver:
                await receiver.add_channel(ends[0])
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(shielded, "sync", receiver.sync)
                    nursery.start_soon(shielded, "wait_closed", receiver.wait_closed)
                    await trio.testing.wait_all_tasks_blocked()
                    if ending == "failure":
                        await feed.send_all(bytes(m.header_size(128)))  # no magic
                    else:
                        outside.cancel()
    expected = "the transfer failed" if ending == "failure" else "the transfer was cancelled"
    assert str(outcomes["sync"]) == f"{expected}: round 1 did not complete"
    assert str(outcomes["wait_closed"]) == f"{expected}: the sender did not finish"
    assert isinstance(outcomes["sync"].__cause__, m.MagicError) == (ending == "failure")


async def test_a_refusal_uncaught_in_the_receivers_cleanup_leaves_as_the_transfers_error() -> None:
    # The cleanup's RuntimeError only says the transfer failed: the block raises the
    # transfer's own error, which an application catches as it would without it.
    connect, ends = memory_channels(1)
    feed = await connect(0)
    await feed.send_all(m.encode_handshake(m.Handshake(uuid=uuid.uuid4(), channel_id=0)))
    with trio.fail_after(10), pytest.raises(m.MagicError) as info:
        async with m.open_receiver([m.RAMBlock("mem", bytearray(PAGE))]) as receiver:
            await receiver.add_channel(ends[0])
            try:
                await feed.send_all(bytes(m.header_size(128)))  # no magic
                await trio.sleep_forever()
            finally:
                # A deadline of its own: the test's fail_after cannot reach into the shield.
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
                    await receiver.sync()
    assert info.value.channel == 0


@pytest.mark.parametrize("end", ["sender", "receiver"])
async def test_a_cancel_from_outside_leaves_the_block_as_one_cancelled_not_a_group(
    end: str,
) -> None:
    # What a plain await in the cancelled scope raises: code that inspects it (or a
    # scope in between) sees no nursery group of every task's Cancelled.
    src, dst = block_pair("mem", 64, seed=9)
    scopes = {"sender": trio.CancelScope(), "receiver": trio.CancelScope()}
    left: list[BaseException] = []
    both_up = trio.Event()

    @contextlib.asynccontextmanager
    async def recorded(name: str) -> AsyncIterator[None]:
        # The other end's failure (its peer left) is not what this test is about.
        with scopes[name], contextlib.suppress(m.MultiFDError):
            try:
                yield
            except BaseException as exc:
                if name == end:
                    left.append(exc)
                raise

    async def receive() -> None:
        async with recorded("receiver"), m.open_receiver([dst], channels=2) as receiver:
            await receiver.serve(listeners)  # returns once both channels have joined
            both_up.set()
            await receiver.wait_closed()

    async def send() -> None:
        async with recorded("sender"), m.open_sender(connect, channels=2) as sender:
            await sender.queue_pages(src, range(0, src.size, PAGE))
            await sender.sync()
            await both_up.wait()
            scopes[end].cancel()
            await trio.sleep_forever()

    with trio.fail_after(10):
        async with listening("tcp") as (listeners, connect), trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(send)
    assert [type(exc) for exc in left] == [trio.Cancelled]


async def test_a_stream_added_after_the_transfer_completed_is_refused_without_failing_it() -> None:
    # The sender left its block with delivery confirmed: a stray connection (a scanner, a
    # late retry) is not part of that transfer and must not fail it after the fact.
    src, dst = block_pair("mem", 64, seed=10)
    refused: list[RuntimeError] = []
    with trio.fail_after(10):
        async with listening("tcp") as (listeners, connect):

            async def send() -> None:
                async with m.open_sender(connect, channels=2) as sender:
                    await sender.queue_pages(src, range(0, src.size, PAGE))

            async def receive() -> None:
                async with m.open_receiver([dst], channels=2) as receiver:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(receiver.serve, listeners)
                        await receiver.wait_closed()
                    stray = await connect(0)
                    await stray.send_all(
                        m.encode_handshake(m.Handshake(uuid=uuid.uuid4(), channel_id=0))
                    )
                    with pytest.raises(RuntimeError) as info:
                        await receiver.add_channel(await listeners[0].accept())
                    refused.append(info.value)
                    # Closed, unread: the stray sees its connection reset.
                    with pytest.raises(trio.BrokenResourceError):
                        await stray.receive_some(1)
                    await stray.aclose()

            assert await run_both_ends(send, receive) == (None, None)
    assert dst.view == src.view
    assert [str(exc) for exc in refused] == ["the transfer is complete: no channel can be added"]


async def test_a_shielded_sync_wakes_on_a_cancel_before_any_channel_joined() -> None:
    outcome: list[RuntimeError] = []
    with trio.fail_after(10), trio.CancelScope() as outside:
        async with m.open_receiver([m.RAMBlock("mem", bytearray(PAGE))]) as receiver:
            try:
                outside.cancel()
                await trio.sleep_forever()
            finally:
                # A deadline of its own: the test's fail_after cannot reach into the shield.
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
                    try:
                        await receiver.sync()
                    except RuntimeError as exc:
                        outcome.append(exc)
    assert [str(exc) for exc in outcome] == [
        "the transfer was cancelled: round 1 did not complete"
    ]


async def test_a_receiver_made_directly_refuses_work_instead_of_waiting_for_ever() -> None:
    receiver = m.Receiver(
        [m.RAMBlock("mem", bytearray(PAGE))],
        channels=1,
        uuid=None,
        compression="none",
        handshake_timeout=None,
        receive_timeout=None,
        integrity=False,
        io_threads=None,
    )
    stream = TrackedStream(trio.testing.memory_stream_pair()[0])
    not_opened = r"not opened: make it with open_receiver\(\)"
    with trio.fail_after(10):
        for call in (receiver.sync(), receiver.wait_closed(), receiver.serve([])):
            with pytest.raises(RuntimeError, match=not_opened):
                await call
        # The receiver owns the stream from the call on: it is closed.
        with pytest.raises(RuntimeError, match=not_opened):
            await receiver.add_channel(stream)
    assert stream.closed


async def test_a_handshake_that_ends_after_the_receivers_block_resets_its_connection() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as outside:
            async with m.open_receiver([m.RAMBlock("mem", bytearray(PAGE))]) as receiver:

                async def add() -> None:
                    with pytest.raises(RuntimeError, match="channel 0 connected too late"):
                        await receiver.add_channel(theirs)

                outside.start_soon(add)
                await trio.testing.wait_all_tasks_blocked()  # reading the handshake
            await ours.send_all(m.encode_handshake(m.Handshake(uuid=uuid.uuid4(), channel_id=0)))
    # Closed as a failure: the failure byte, then the end.
    assert await ours.receive_some() == b"!"
    assert await ours.receive_some() == b""


async def test_a_bad_handshake_after_the_receivers_block_is_raised_and_resets_its_stream() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as outside:
            async with m.open_receiver([m.RAMBlock("mem", bytearray(PAGE))]) as receiver:

                async def add() -> None:
                    with pytest.raises(m.MagicError) as info:
                        await receiver.add_channel(theirs)
                    assert info.value.channel is None
                    # Recorded, though nothing is left to cancel: later calls say so.
                    with pytest.raises(RuntimeError, match="the transfer failed") as refused:
                        await receiver.sync()
                    assert refused.value.__cause__ is info.value

                outside.start_soon(add)
                await trio.testing.wait_all_tasks_blocked()  # reading the handshake
            await ours.send_all(bytes(m.HANDSHAKE_SIZE))
    assert await ours.receive_some() == b"!"
    assert await ours.receive_some() == b""


class CloseFails(TrackedStream):
    async def aclose(self) -> None:
        await super().aclose()
        raise trio.BrokenResourceError("injected fault in aclose")


async def test_a_sender_stream_whose_close_fails_after_the_confirmation_still_succeeds() -> None:
    src, dst = block_pair("mem", 8, seed=8)
    connect, ends = memory_channels(1, wrap=lambda _, stream: CloseFails(stream))
    with trio.fail_after(10):
        async with m.open_receiver([dst], channels=1) as receiver:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver.add_channel, ends[0])
                async with m.open_sender(connect, channels=1) as sender:
                    await sender.queue_pages(src, range(0, src.size, PAGE))
            await receiver.wait_closed()
    assert dst.view == src.view


class CloseHangs(TrackedStream):
    """A close whose goodbye (as TLS's close_notify) the peer never answers."""

    async def aclose(self) -> None:
        self.closed = True
        try:
            await trio.sleep_forever()
        finally:
            await trio.aclose_forcefully(self.inner)


async def test_a_stream_whose_close_hangs_is_given_five_seconds_then_forced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    theirs, ours = trio.testing.memory_stream_pair()
    transport = _transport.open_transport(CloseHangs(ours), channel=0)
    await transport.aclose()
    assert trio.current_time() == pytest.approx(5.0)
    with pytest.raises(trio.ClosedResourceError):
        await ours.send_all(b"x")  # the stream under it was closed after all
    assert await theirs.receive_some() == b""


async def assert_closed_as_a_failure(kind: str, stream: trio.abc.Stream) -> None:
    """``stream``'s peer closed it as a failure: a reset, or on a Unix socket (which has
    none) the failure byte then the end."""
    try:
        if kind == "tcp":
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some()
        else:
            assert await stream.receive_some() == b"!"
            assert await stream.receive_some() == b""
    finally:
        await stream.aclose()


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_serve_stops_when_the_receivers_block_ends_and_resets_handshakes_under_way(
    kind: str,
) -> None:
    async with listening(kind) as (listeners, connect):
        with trio.fail_after(10):
            async with trio.open_nursery() as outside:
                async with m.open_receiver(
                    [m.RAMBlock("mem", bytearray(PAGE))], handshake_timeout=None
                ) as receiver:
                    await outside.start(receiver.serve, listeners)
                    late = await connect(0)
                    await trio.testing.wait_all_tasks_blocked()  # reading the handshake
                # The outside nursery exits only once serve() has returned.
            await assert_closed_as_a_failure(kind, late)


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_a_silent_connection_does_not_hold_serve_once_every_channel_is_set_up(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    src, dst = block_pair("mem", 16, seed=3)
    async with listening(kind) as (listeners, connect):
        with trio.fail_after(10):
            async with m.open_receiver([dst], channels=2, handshake_timeout=None) as receiver:
                async with trio.open_nursery() as nursery:
                    await nursery.start(receiver.serve, listeners)
                    silent = await connect(0)
                    await trio.testing.wait_all_tasks_blocked()  # reading its handshake
                    async with m.open_sender(connect, channels=2) as sender:
                        await sender.queue_pages(src, range(0, src.size, PAGE))
                await receiver.wait_closed()
            await assert_closed_as_a_failure(kind, silent)
    assert dst.view == src.view
    assert any(
        "dropped 1 connection(s) still in their handshake: all 2 channels are set up"
        in record.getMessage()
        for record in caplog.records
    )


async def test_a_listener_closed_under_serve_ends_it_with_its_own_error() -> None:
    first = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    second = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    under_way: list[trio.SocketStream] = []

    async def close_the_first_during_a_handshake_on_the_second() -> None:
        port = second.socket.getsockname()[1]
        under_way.append(await trio.open_tcp_stream("127.0.0.1", port))
        await trio.testing.wait_all_tasks_blocked()  # reading its handshake
        await first.aclose()

    try:
        with trio.fail_after(10):
            async with m.open_receiver(
                [m.RAMBlock("mem", bytearray(PAGE))], handshake_timeout=None
            ) as receiver:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(close_the_first_during_a_handshake_on_the_second)
                    # Not inside a group of serve()'s nurseries: as the listener raised it.
                    with pytest.raises(trio.ClosedResourceError):
                        await receiver.serve([first, second])
            await assert_closed_as_a_failure("tcp", under_way[0])
    finally:
        await second.aclose()


async def test_serve_logs_a_refused_connection_with_its_peers_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with listening("tcp") as (listeners, connect):
        with trio.fail_after(10):
            async with (
                m.open_receiver(
                    [m.RAMBlock("mem", bytearray(PAGE))], uuid=uuid.uuid4()
                ) as receiver,
                trio.open_nursery() as nursery,
            ):
                await nursery.start(receiver.serve, listeners)
                stray = await connect(0)
                assert isinstance(stray, trio.SocketStream)
                host, port = stray.socket.getsockname()
                await stray.send_all(m.encode_handshake(m.Handshake(uuid.uuid4(), 0)))
                await assert_closed_as_a_failure("tcp", stray)
                await trio.testing.wait_all_tasks_blocked()  # done with it: logged
                nursery.cancel_scope.cancel()
    assert any(
        f"refused a connection from {host}:{port}: channel 0: handshake uuid is"
        in record.getMessage()
        for record in caplog.records
    )


async def test_serve_returns_at_once_when_every_channel_is_set_up() -> None:
    src, dst = block_pair("mem", 8, seed=8)
    connect, ends = memory_channels(1)
    async with listening("tcp") as (listeners, _):
        with trio.fail_after(10):
            async with m.open_receiver([dst], channels=1) as receiver:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(receiver.add_channel, ends[0])
                    async with m.open_sender(connect, channels=1) as sender:
                        await sender.queue_pages(src, range(0, src.size, PAGE))
                await receiver.serve(listeners)
                await receiver.wait_closed()
    assert dst.view == src.view


async def test_a_connect_that_returns_one_stream_for_two_channels_fails_the_transfer() -> None:
    src, _ = block_pair("mem", 4)
    ours, _theirs = trio.testing.memory_stream_pair()

    async def connect(channel: int) -> trio.abc.Stream:
        return ours

    with trio.fail_after(10), pytest.raises(m.TransportError) as info:
        async with m.open_sender(connect, channels=2) as sender:
            await sender.queue_pages(src, range(0, src.size, PAGE))
    assert info.value.channel in (0, 1)  # whichever connected second
    assert "a stream it returned for another channel" in str(info.value)


class _GreedyStream(TrackedStream):
    """Returns whatever it holds, however few bytes ``receive_some`` asked for: a stream
    that breaks Trio's contract."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await super().receive_some(None)


async def test_a_stream_returning_more_than_asked_fails_the_channel_with_a_transport_error() -> (
    None
):
    # The sender writes a header and its payload in one send_all: the receiver's read of
    # the header alone gets the payload too.
    connect, ends = memory_channels(1)
    src, dst = block_pair("mem", 8)

    async def send() -> None:
        async with m.open_sender(connect, channels=1) as sender:
            await sender.queue_pages(src, range(0, src.size, PAGE))

    async def receive() -> None:
        async with m.open_receiver([dst], channels=1) as receiver:
            await receiver.add_channel(_GreedyStream(ends[0]))
            await receiver.wait_closed()

    with trio.fail_after(20):
        _, error = await run_both_ends(send, receive)
    assert isinstance(error, m.TransportError)
    assert error.channel == 0
    assert "when asked for at most" in str(error)
    assert "_GreedyStream.receive_some" in str(error)
