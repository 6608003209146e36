"""Tutorial, part 2: send a numpy array from one Trio program to another, zstd-compressed.

    python examples/tutorial_numpy.py receive --port 4445
    python examples/tutorial_numpy.py send --port 4445

or, with no command, both at once (the receiver in a second process, on a free port)::

    python examples/tutorial_numpy.py

``--compression none`` sends the pages as they are; ``--size`` is in MiB.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
import numpy.typing as npt
import trio

import trio_multifd

CHANNELS = 4


def make_readings(size: int) -> npt.NDArray[np.float64]:
    """Temperature-like readings with one decimal: float64s that compress about 5x."""
    count = size // 8
    rng = np.random.default_rng(7)
    wave = 20 + 5 * np.sin(np.arange(count) / 5000)
    return np.round(wave + rng.normal(0, 0.5, count), 1)


async def receive(port: int, size: int, compression: str = "zstd") -> None:
    # The target: any writable C-contiguous array of the same number of bytes.
    target = np.empty(size // 8, dtype=np.float64)
    block = trio_multifd.RAMBlock("readings", target)
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio_multifd.open_receiver(
        [block], channels=CHANNELS, compression=compression
    ) as receiver:
        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.serve, listeners)
            print(f"receiver: listening on port {port}", flush=True)
            await receiver.sync()
        for listener in listeners:
            await listener.aclose()
        ok = bool(np.array_equal(target, make_readings(size)))
        print(f"receiver: {target.size} readings verified: {ok}, mean {target.mean():.2f}")
        if not ok:
            raise SystemExit(1)
        await receiver.wait_closed()


async def send(port: int, size: int, compression: str = "zstd") -> None:
    readings = make_readings(size)
    block = trio_multifd.RAMBlock("readings", readings)  # no copy: the array's memory

    async def connect(channel_id: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    start = time.perf_counter()
    async with trio_multifd.open_sender(
        connect, channels=CHANNELS, compression=compression
    ) as sender:
        await sender.queue_pages(block, range(0, block.size, block.page_size))
        await sender.sync()
    seconds = time.perf_counter() - start
    stats = sender.stats
    print(
        f"sender: {stats.page_bytes / 2**20:.0f} MiB of pages as {stats.bytes / 2**20:.1f} MiB"
        f" on the wire ({stats.page_bytes / stats.bytes:.1f}x) in {seconds:.2f} s"
    )


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
    parser.add_argument("--port", type=int, default=4445)
    parser.add_argument("--size", type=int, default=64, help="MiB to send (default 64)")
    parser.add_argument("--compression", default="zstd", help="none, zlib or zstd")
    args = parser.parse_args(argv)
    if args.command is None:
        return run_both(args.size, args.compression)
    end = receive if args.command == "receive" else send
    trio.run(end, args.port, args.size * 2**20, args.compression)
    return 0


if __name__ == "__main__":
    sys.exit(main())
