"""How-to: run the channels over a Unix domain socket (two programs on one machine).

Every channel connects to the same socket path. Unix sockets take the same zero-copy
path as TCP (``sendmsg`` / ``recvmsg_into``). They have no reset: a receiver that fails
writes one byte before it closes the channel, which a sender waiting for the delivery
confirmation reports as a ``DeliveryError``.

    python examples/howto_unix_socket.py
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile

import trio

import trio_multifd

CHANNELS = 4
SIZE = 16 * 2**20


async def open_unix_listener(path: str) -> trio.SocketListener:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(CHANNELS)
    return trio.SocketListener(sock)


async def main() -> None:
    source = bytearray(os.urandom(SIZE))
    target = bytearray(SIZE)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "multifd.sock")
        listener = await open_unix_listener(path)

        async def connect(channel_id: int) -> trio.abc.Stream:
            return await trio.open_unix_socket(path)

        receiving = trio_multifd.RAMBlock("buffer", target)
        sending = trio_multifd.RAMBlock("buffer", source)
        async with (
            listener,
            trio_multifd.open_receiver([receiving], channels=CHANNELS) as receiver,
        ):
            async with trio.open_nursery() as nursery:
                await nursery.start(receiver.serve, [listener])
                async with trio_multifd.open_sender(connect, channels=CHANNELS) as sender:
                    await sender.queue_pages(sending, range(0, sending.size, sending.page_size))
            await receiver.wait_closed()
    print(f"{sender.stats.page_bytes} bytes over {path}, verified: {target == source}")
    if target != source:
        sys.exit(1)


if __name__ == "__main__":
    trio.run(main)
