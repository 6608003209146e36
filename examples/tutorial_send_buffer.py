"""Tutorial: send a large buffer from one Trio program to another over TCP, 4 channels.

Run the receiver in one terminal, then the sender in another::

    python examples/tutorial_send_buffer.py receive --port 4444
    python examples/tutorial_send_buffer.py send --port 4444

or, with no command, both at once (the receiver in a second process, on a free port)::

    python examples/tutorial_send_buffer.py

``--compression zstd`` (on both sides) compresses the pages; ``--size`` is in MiB.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time

import trio

import trio_multifd

CHANNELS = 4


def make_data(size: int) -> bytearray:
    """The buffer to send: random bytes, then a last quarter still all zero.

    Both programs build it from the same seed, so the receiver can check what it got.
    """
    data = bytearray(size)
    random_part = size // 4 * 3
    data[:random_part] = random.Random(42).randbytes(random_part)
    return data


async def receive(port: int, size: int, compression: str = "none") -> None:
    target = bytearray(size)  # where the pages land, written in place
    block = trio_multifd.RAMBlock("buffer", target)
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio_multifd.open_receiver(
        [block], channels=CHANNELS, compression=compression
    ) as receiver:
        async with trio.open_nursery() as nursery:
            # serve() accepts connections until all 4 channels are set up.
            await nursery.start(receiver.serve, listeners)
            print(f"receiver: listening on port {port}", flush=True)
            # Returns once SYNC round 1 (the sender's first sync()) is complete on
            # every channel: every page queued before it is in `target`.
            round_number = await receiver.sync()
        for listener in listeners:
            await listener.aclose()
        ok = target == make_data(size)
        print(f"receiver: round {round_number} complete, {size} bytes verified: {ok}")
        if not ok:
            raise SystemExit(1)
        # The sender's exit sends one more round; then every channel ends cleanly.
        await receiver.wait_closed()
    stats = receiver.stats
    print(
        f"receiver: {stats.pages} pages ({stats.normal_pages} with data,"
        f" {stats.zero_pages} zero), {stats.bytes} bytes on the wire, {stats.rounds} rounds"
    )


async def send(port: int, size: int, compression: str = "none") -> None:
    source = make_data(size)
    block = trio_multifd.RAMBlock("buffer", source)

    async def connect(channel_id: int) -> trio.abc.Stream:
        # Called once per channel: here every channel goes to the same address.
        return await trio.open_tcp_stream("127.0.0.1", port)

    start = time.perf_counter()
    async with trio_multifd.open_sender(
        connect, channels=CHANNELS, compression=compression
    ) as sender:
        await sender.queue_pages(block, range(0, block.size, block.page_size))
        round_number = await sender.sync()
        print(f"sender: round {round_number} written on every channel")
    # Leaving the block normally means the receiver confirmed the whole transfer.
    seconds = time.perf_counter() - start
    stats = sender.stats
    print(
        f"sender: {stats.page_bytes / 2**20:.0f} MiB of pages in {seconds:.2f} s"
        f" ({stats.page_bytes / seconds / 1e9:.2f} GB/s); {stats.packets} packets,"
        f" {stats.zero_pages} zero pages, {stats.bytes} bytes on the wire"
    )
    for channel_id, channel in enumerate(stats.channels):
        print(f"  channel {channel_id}: {channel.packets} packets, {channel.pages} pages")


def run_both(size_mib: int, compression: str) -> int:
    """Start the receiver as a second process on a free port, then send to it."""
    command = ["receive", "--port", "0", "--size", str(size_mib), "--compression", compression]
    receiver = subprocess.Popen(
        [sys.executable, __file__, *command],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdout is not None
    first_line = receiver.stdout.readline()  # "receiver: listening on port N"
    print(first_line, end="")
    try:
        port = int(first_line.split()[-1])
    except (ValueError, IndexError):
        receiver.kill()
        return 1
    try:
        trio.run(send, port, size_mib * 2**20, compression)
    except BaseException:
        receiver.kill()  # the sender failed: do not leave the receiver waiting
        raise
    print(receiver.stdout.read(), end="")
    return receiver.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=["receive", "send"])
    parser.add_argument("--port", type=int, default=4444)
    parser.add_argument("--size", type=int, default=64, help="MiB to send (default 64)")
    parser.add_argument("--compression", default="none", help="none, zlib or zstd")
    args = parser.parse_args(argv)
    if args.command is None:
        return run_both(args.size, args.compression)
    end = receive if args.command == "receive" else send
    trio.run(end, args.port, args.size * 2**20, args.compression)
    return 0


if __name__ == "__main__":
    sys.exit(main())
