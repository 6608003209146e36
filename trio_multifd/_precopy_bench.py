"""Pre-copy bench: migrations with a concurrent writer at fixed dirty rates, and the cost
of hash detection.

Run ``python -m trio_multifd._precopy_bench --help``. Everything runs in one process over
loopback TCP, so sender, receiver and writer share the machine's cores: the figures
compare settings with each other, they are not a link's capacity.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Sequence

import trio

from ._block import RAMBlock
from ._precopy import DirtyTracker, PrecopyReport, precopy, receive_precopy
from ._receiver import open_receiver
from ._sender import open_sender

__all__ = ["main", "parse_args", "run"]

_PAGE = 4096
_MIB = 1024 * 1024
_GIB = 1024 * _MIB


class _Writer:
    """Writes ``rate`` random pages per second (in 1 ms ticks) and marks them."""

    def __init__(self, block: RAMBlock, tracker: DirtyTracker | None, rate: int) -> None:
        self.block = block
        self.tracker = tracker
        self.rate = rate
        self.rng = random.Random(1)
        self.writes = 0
        self.stop_requested = False
        self.stopped = trio.Event()
        self.started = time.perf_counter()

    async def run(self) -> None:
        view, count, rng = self.block.view, self.block.page_count, self.rng
        try:
            self.started = time.perf_counter()
            while not self.stop_requested and self.rate:
                due = int((time.perf_counter() - self.started) * self.rate) - self.writes
                for _ in range(max(0, due)):
                    position = rng.randrange(count) * _PAGE + rng.randrange(_PAGE - 8)
                    view[position : position + 8] = rng.randbytes(8)
                    if self.tracker is not None:
                        self.tracker.mark(self.block, position, 8)
                    self.writes += 1
                await trio.sleep(0.001)
        finally:
            self.stopped.set()

    async def stop(self) -> None:
        self.stop_requested = True
        await self.stopped.wait()

    def achieved(self) -> float:
        return self.writes / max(1e-9, time.perf_counter() - self.started)


async def _migrate(
    size: int, rate: int, *, detect: str, channels: int, downtime_limit: float, max_rounds: int
) -> tuple[PrecopyReport, float, bool]:
    source = bytearray(os.urandom(size))
    target = bytearray(b"\xa5" * size)
    block, target_block = RAMBlock("ram", source), RAMBlock("ram", target)
    tracker = DirtyTracker([block], detect=detect)
    writer = _Writer(block, tracker if detect == "marks" else None, rate)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def connect(channel: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    async with (
        open_receiver([target_block], channels=channels) as receiver,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(receiver.serve, listeners)

        async def receive() -> None:
            await receive_precopy(receiver)
            await receiver.wait_closed()

        nursery.start_soon(receive)
        nursery.start_soon(writer.run)
        async with open_sender(connect, channels=channels) as sender:
            report = await precopy(
                sender,
                tracker,
                on_stop=writer.stop,
                downtime_limit=downtime_limit,
                max_rounds=max_rounds,
            )
    for listener in listeners:
        await listener.aclose()
    return report, writer.achieved(), source == target


def _print_migration(rate: int, achieved: float, report: PrecopyReport, same: bool) -> None:
    iterative = [r for r in report.rounds if not r.final]
    expected = iterative[-1].expected_downtime if iterative else None
    print(
        f"  rate {rate:>7}/s (achieved {achieved:>8.0f}/s): {len(report.rounds):>2} rounds,"
        f" {report.total_bytes / _MIB:7.1f} MiB sent, expected downtime"
        f" {'-' if expected is None else f'{expected * 1e3:.2f} ms'}, measured"
        f" {(report.downtime or 0) * 1e3:.2f} ms, converged={report.converged},"
        f" identical={same}"
    )


async def _hash_cost(size: int) -> None:
    block = RAMBlock("ram", bytearray(os.urandom(size)))
    tracker = DirtyTracker([block], detect="hash")
    gaps: list[float] = []
    running = True

    async def heartbeat() -> None:
        last = time.perf_counter()
        while running:
            await trio.lowlevel.checkpoint()
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def timed(label: str) -> None:
        gaps.clear()
        started = time.perf_counter()
        await tracker.collect()
        seconds = time.perf_counter() - started
        print(
            f"  {label:<28} {seconds * _GIB / size:6.3f} s/GiB; gaps of a Trio task spinning"
            f" on checkpoints: max {max(gaps) * 1e3:.2f} ms,"
            f" p99 {statistics.quantiles(gaps, n=100)[98] * 1e3:.3f} ms"
        )

    rng = random.Random(3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeat)
        await timed("first scan (every page)")
        await timed("rescan, nothing changed")
        for _ in range(block.page_count // 100):
            block.view[rng.randrange(block.page_count) * _PAGE] ^= 1
        await timed("rescan, 1% of pages changed")
        for page in range(0, block.page_count, 2):
            block.view[page * _PAGE] ^= 1
        await timed("rescan, 50% of pages changed")
        running = False


async def run(args: argparse.Namespace) -> None:
    """Run the bench with parsed arguments (see :func:`parse_args`) and print its figures.

    Args:
        args: The parsed command line.
    """
    size = args.size * _MIB
    print(f"hash detection over {args.hash_size} MiB (xxh3-64, worker threads, 1 ms chunks):")
    await _hash_cost(args.hash_size * _MIB)
    for detect in args.detect:
        print(
            f"pre-copy of {args.size} MiB, {args.channels} TCP channels, detect={detect},"
            f" downtime_limit={args.downtime_limit * 1e3:g} ms, max_rounds={args.max_rounds}:"
        )
        for rate in args.rates:
            report, achieved, same = await _migrate(
                size,
                rate,
                detect=detect,
                channels=args.channels,
                downtime_limit=args.downtime_limit,
                max_rounds=args.max_rounds,
            )
            _print_migration(rate, achieved, report, same)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the bench's command line.

    Args:
        argv: Command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(prog="python -m trio_multifd._precopy_bench")
    parser.add_argument("--size", type=int, default=64, help="MiB migrated (default 64)")
    parser.add_argument("--hash-size", type=int, default=256, help="MiB hashed (default 256)")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument(
        "--rates",
        type=int,
        nargs="+",
        default=[0, 10_000, 50_000, 200_000],
        help="pages written per second by the concurrent writer",
    )
    parser.add_argument("--detect", nargs="+", default=["marks", "hash"])
    parser.add_argument("--downtime-limit", type=float, default=0.01, help="seconds")
    parser.add_argument("--max-rounds", type=int, default=30)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the pre-copy bench and print its figures.

    Args:
        argv: Command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    trio.run(run, parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
