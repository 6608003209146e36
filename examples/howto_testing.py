"""How-to: test code that uses trio_multifd, in memory, with no sockets.

``trio.testing.memory_stream_pair()`` gives two connected in-memory streams: the sender's
``connect`` returns one end, the receiver takes the other with ``add_channel``. Under
pytest-trio (``trio_mode = true``) these functions are tests as they are; the timeout
test wants pytest-trio's ``autojump_clock`` fixture (here: a ``MockClock``). The transfer
test runs on the real clock: the library's worker threads are invisible to the autojump
clock, which would leap over its timeouts while they work (docs/howto/testing.rst).

    python examples/howto_testing.py
    python -m pytest examples/howto_testing.py
"""

from __future__ import annotations

import os

import trio
import trio.testing

import trio_multifd


async def transfer_in_memory(source: bytearray, channels: int = 2) -> bytearray:
    """Send ``source`` through ``channels`` memory stream pairs; return what arrived."""
    pairs = [trio.testing.memory_stream_pair() for _ in range(channels)]

    async def connect(channel_id: int) -> trio.abc.Stream:
        return pairs[channel_id][0]

    target = bytearray(len(source))
    sending = trio_multifd.RAMBlock("mem", source)
    async with trio_multifd.open_receiver(
        [trio_multifd.RAMBlock("mem", target)], channels=channels
    ) as receiver:
        async with trio.open_nursery() as nursery:
            for _, receiver_end in pairs:
                # Waits for the channel's handshake, then starts its receive task.
                nursery.start_soon(receiver.add_channel, receiver_end)
            async with trio_multifd.open_sender(connect, channels=channels) as sender:
                await sender.queue_pages(sending, range(0, sending.size, sending.page_size))
                assert await sender.sync() == 1
                assert await receiver.sync() == 1  # round 1 is complete on the receiver
                assert target == source
        await receiver.wait_closed()
    return target


async def test_a_buffer_crosses_memory_streams() -> None:
    source = bytearray(os.urandom(1024 * 4096))
    with trio.fail_after(10):  # a test that could hang gets a deadline
        assert await transfer_in_memory(source, channels=4) == source


async def test_a_silent_peer_times_out(autojump_clock: trio.testing.MockClock) -> None:
    # Nobody writes to this stream: the handshake times out after 10 s of virtual time.
    _, receiver_end = trio.testing.memory_stream_pair()
    block = trio_multifd.RAMBlock("mem", bytearray(4096))
    try:
        # Virtual seconds too: without a deadline, a timeout that never fired would
        # hang the test rather than fail it.
        with trio.fail_after(60):
            async with trio_multifd.open_receiver(
                [block], channels=1, handshake_timeout=10.0
            ) as receiver:
                await receiver.add_channel(receiver_end)
    except trio_multifd.HandshakeTimeoutError as exc:
        assert trio.current_time() >= 10.0
        print(f"as expected: {type(exc).__name__}: {exc}")
    else:
        raise AssertionError("no HandshakeTimeoutError")


def main() -> None:
    trio.run(test_a_buffer_crosses_memory_streams)
    print("test_a_buffer_crosses_memory_streams passed")
    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(test_a_silent_peer_times_out, clock, clock=clock)
    print("test_a_silent_peer_times_out passed")


if __name__ == "__main__":
    main()
