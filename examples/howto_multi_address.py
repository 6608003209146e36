"""How-to: spread the channels over several addresses (several NICs or paths).

``connect(channel_id)`` is called once per channel, so each channel can go to its own
address, and leave through its own local address (``local_address`` picks the source
address, hence the NIC, on the sender). Here the receiver listens on two loopback
addresses, 127.0.0.1 and 127.0.0.2 (Linux routes all of 127.0.0.0/8 to loopback); on real
machines use the addresses of the receiver's NICs.

    python examples/howto_multi_address.py
"""

from __future__ import annotations

import os
import sys

import trio

import trio_multifd

CHANNELS = 4
SIZE = 16 * 2**20
# (receiver address, sender's local address) per path; one channel in turn on each.
PATHS = [("127.0.0.1", "127.0.0.1"), ("127.0.0.2", "127.0.0.2")]


async def main() -> None:
    source = bytearray(os.urandom(SIZE))
    target = bytearray(SIZE)

    # One listener per address, all on the same port number.
    first = (await trio.open_tcp_listeners(0, host=PATHS[0][0]))[0]
    port = first.socket.getsockname()[1]
    listeners = [first]
    for address, _ in PATHS[1:]:
        listeners += await trio.open_tcp_listeners(port, host=address)

    async def connect(channel_id: int) -> trio.abc.Stream:
        address, local_address = PATHS[channel_id % len(PATHS)]
        return await trio.open_tcp_stream(address, port, local_address=local_address)

    receiving = trio_multifd.RAMBlock("buffer", target)
    sending = trio_multifd.RAMBlock("buffer", source)
    # A thread per channel on each end: a slow path then holds up only its own channels.
    async with trio_multifd.open_receiver(
        [receiving], channels=CHANNELS, io_threads=CHANNELS
    ) as receiver:
        async with trio.open_nursery() as nursery:
            # serve() accepts from every listener until all channels are set up.
            await nursery.start(receiver.serve, listeners)
            async with trio_multifd.open_sender(
                connect, channels=CHANNELS, io_threads=CHANNELS
            ) as sender:
                await sender.queue_pages(sending, range(0, sending.size, sending.page_size))
        await receiver.wait_closed()
    for listener in listeners:
        await listener.aclose()
    for channel_id, stats in enumerate(sender.stats.channels):
        address = PATHS[channel_id % len(PATHS)][0]
        print(f"channel {channel_id} via {address}: {stats.page_bytes / 2**20:.1f} MiB")
    print(f"verified: {target == source}")
    if target != source:
        sys.exit(1)


if __name__ == "__main__":
    trio.run(main)
