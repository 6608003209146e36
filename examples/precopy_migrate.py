"""Live pre-copy: migrate a buffer while a task keeps writing to it.

The sending side marks every write in a ``DirtyTracker`` and runs
:func:`trio_multifd.precopy`: rounds of the pages written since the round before, until
the rest would take less than ``downtime_limit``; then it stops the writer and sends the
final round. The receiving side follows the rounds with
:func:`trio_multifd.receive_precopy`. Both ends run in this one program, over loopback
TCP; ``--size`` is in MiB.

    python examples/precopy_migrate.py              # converges; the copy is verified
    python examples/precopy_migrate.py --give-up    # force_stop=False and a limit never
                                                    # met: the receiver's PrecopyAbortedError
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Awaitable, Callable, Sequence

import trio

import trio_multifd

CHANNELS = 4


async def send(
    connect: Callable[[int], Awaitable[trio.abc.Stream]],
    buffer: bytearray,
    *,
    downtime_limit: float = 0.3,
    max_rounds: int = 30,
    force_stop: bool = True,
) -> trio_multifd.PrecopyReport:
    ram = trio_multifd.RAMBlock("ram", buffer)
    tracker = trio_multifd.DirtyTracker([ram])  # detect="marks"
    stop_requested = False
    stopped = trio.Event()

    async def writer() -> None:
        rng = random.Random(7)
        while not stop_requested:
            offset = rng.randrange(len(buffer) - 8)  # whatever the application does
            buffer[offset : offset + 8] = rng.randbytes(8)
            tracker.mark(ram, offset, 8)  # after the write, never before
            await trio.lowlevel.checkpoint()
        stopped.set()

    async def stop_writers() -> None:
        nonlocal stop_requested
        stop_requested = True
        await stopped.wait()  # no write happens after this

    # The writers' nursery inside the sender's block: a failed transfer comes out of
    # open_sender as its one MultiFDError, not wrapped in the nursery's ExceptionGroup.
    async with (
        trio_multifd.open_sender(connect, channels=CHANNELS) as sender,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(writer)
        report = await trio_multifd.precopy(
            sender,
            tracker,
            on_stop=stop_writers,
            downtime_limit=downtime_limit,
            max_rounds=max_rounds,
            force_stop=force_stop,
        )
        if not report.completed:
            await stop_writers()  # precopy gave up without calling on_stop
    return report


async def receive(
    listeners: Sequence[trio.SocketListener],
    target: bytearray,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    block = trio_multifd.RAMBlock("ram", target)
    try:
        async with trio_multifd.open_receiver([block], channels=CHANNELS) as receiver:
            # Awaited here, not in a nursery of ours, so that what receive_precopy raises
            # arrives as it is rather than inside an ExceptionGroup.
            await receiver.serve(listeners, task_status=task_status)  # every channel up
            final = await trio_multifd.receive_precopy(receiver)
            # target now holds every page as it was when stop_writers() returned
            await receiver.wait_closed()  # the sender's exit waits for this
    except trio_multifd.PrecopyAbortedError as exc:
        print(f"receiver: {type(exc).__name__}: {exc}")
        return
    print(f"receiver: final round {final.number} complete")


async def main(size: int, give_up: bool) -> bool:
    source = bytearray(random.Random(1).randbytes(size))
    target = bytearray(size)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def connect(channel_id: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    async with trio.open_nursery() as nursery:
        await nursery.start(receive, listeners, target)
        if give_up:
            # A limit no round can meet while the writer runs, and no forced stop.
            report = await send(
                connect, source, downtime_limit=0.0, max_rounds=2, force_stop=False
            )
        else:
            report = await send(connect, source)
    for listener in listeners:
        await listener.aclose()
    print(
        f"sender: converged={report.converged}, completed={report.completed},"
        f" rounds {len(report.rounds)}, {report.total_bytes} page bytes, downtime"
        f" {'-' if report.downtime is None else f'{report.downtime * 1000:.1f} ms'}"
    )
    if not report.completed:
        return give_up  # what --give-up is for
    verified = target == source
    print(f"copy verified: {verified}")
    return verified


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Live pre-copy of a buffer being written.")
    parser.add_argument("--size", type=int, default=16, help="MiB (default 16)")
    parser.add_argument("--give-up", action="store_true", help="show an aborted migration")
    args = parser.parse_args()
    if not trio.run(main, args.size * 2**20, args.give_up):
        sys.exit(1)
