"""How-to: handle a failed transfer, and cancel one.

Each end raises one exception, a :class:`trio_multifd.MultiFDError` subclass whose
``channel`` names the channel at fault (``None`` for the transfer as a whole), never the
internal tasks' exception group. Cancelling from outside shuts every task and stream down
and raises nothing of the library's own.

    python examples/howto_errors.py
"""

from __future__ import annotations

import logging
import math
import os

import trio

import trio_multifd

SIZE = 8 * 2**20
RECEIVER_DEADLINE = 10.0


def describe(exc: trio_multifd.MultiFDError) -> str:
    # str(exc) starts with "channel N" when exc.channel is set.
    return f"{type(exc).__name__}: {exc}"


async def transfer(
    *,
    sender_compression: str = "none",
    receiver_compression: str = "none",
    give_up_after: float = math.inf,
) -> None:
    """Run both ends over loopback TCP and print how each one ended."""
    source = bytearray(os.urandom(SIZE))
    target = bytearray(SIZE)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def connect(channel_id: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    async def receive(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        block = trio_multifd.RAMBlock("buffer", target)
        # A deadline of the receiver's own: a sender that gives up before its channels
        # connect would leave serve() waiting for them for ever.
        with trio.move_on_after(RECEIVER_DEADLINE) as scope:
            try:
                async with trio_multifd.open_receiver(
                    [block], channels=2, compression=receiver_compression
                ) as receiver:
                    await receiver.serve(listeners, task_status=task_status)
                    await receiver.wait_closed()
            except trio_multifd.MultiFDError as exc:
                print(f"  receiver: {describe(exc)}")
                return
        if scope.cancelled_caught:
            print(f"  receiver: cancelled; no whole transfer within {RECEIVER_DEADLINE} s")
        else:
            print(f"  receiver: complete, verified: {target == source}")

    async def send() -> None:
        block = trio_multifd.RAMBlock("buffer", source)
        try:
            with trio.move_on_after(give_up_after) as scope:
                async with trio_multifd.open_sender(
                    connect, channels=2, compression=sender_compression
                ) as sender:
                    for offset in range(0, block.size, block.page_size):
                        await sender.queue_page(block, offset)
                        await trio.sleep(0 if math.isinf(give_up_after) else 0.0001)
        except trio_multifd.MultiFDError as exc:
            print(f"  sender: {describe(exc)}")
            return
        if scope.cancelled_caught:
            print("  sender: cancelled; every channel closed with a reset")
        else:
            # Only now is the transfer known to be complete on the receiver.
            print("  sender: done, and the receiver confirmed it")

    async with trio.open_nursery() as nursery:
        await nursery.start(receive)
        await send()
    for listener in listeners:
        await listener.aclose()


async def main() -> None:
    print("a transfer that works:")
    await transfer()
    print("the two ends disagree on the method:")
    await transfer(sender_compression="none", receiver_compression="zstd")
    print("the sender gives up (a cancel scope) part-way:")
    await transfer(give_up_after=0.05)


if __name__ == "__main__":
    # The library logs under "trio_multifd" (channels, rounds, errors; never per page).
    logging.basicConfig(level=logging.WARNING, format="  log: %(name)s: %(message)s")
    trio.run(main)
