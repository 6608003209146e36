"""How-to: measure which channel count and method suit your data and your link.

Sends the same buffer over loopback TCP with each combination and prints the rate and
the bytes on the wire. Replace ``make_data`` with a sample of your own data, and the
addresses with your real link, to choose with figures that matter to you.

    python examples/howto_choose.py --size 64
"""

from __future__ import annotations

import argparse
import itertools
import random
import time

import trio

import trio_multifd


def make_data(size: int) -> bytearray:
    """A stand-in for real data: a third random, a third text-like, a third zero."""
    third = size // 3 // 4096 * 4096
    data = bytearray(size)
    data[:third] = random.Random(1).randbytes(third)
    words = b"multifd moves pages of memory over parallel streams "
    data[third : 2 * third] = (words * (third // len(words) + 1))[:third]
    return data


async def measure(data: bytearray, channels: int, compression: str) -> tuple[float, int]:
    """Send ``data`` once; return (seconds, bytes on the wire)."""
    target = bytearray(len(data))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def connect(channel_id: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    source = trio_multifd.RAMBlock("data", data)
    async with trio_multifd.open_receiver(
        [trio_multifd.RAMBlock("data", target)], channels=channels, compression=compression
    ) as receiver:
        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.serve, listeners)
            start = time.perf_counter()
            async with trio_multifd.open_sender(
                connect, channels=channels, compression=compression
            ) as sender:
                await sender.queue_pages(source, range(0, source.size, source.page_size))
            seconds = time.perf_counter() - start
        await receiver.wait_closed()
    for listener in listeners:
        await listener.aclose()
    assert target == data
    return seconds, sender.stats.bytes


async def main(size: int) -> None:
    data = make_data(size)
    print(f"{'method':>6} {'channels':>8} {'GB/s':>6} {'wire MiB':>9}")
    for compression, channels in itertools.product(["none", "zlib", "zstd"], [1, 2, 4]):
        seconds, wire = await measure(data, channels, compression)
        rate = len(data) / seconds / 1e9
        print(f"{compression:>6} {channels:>8} {rate:>6.2f} {wire / 2**20:>9.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="MiB per run (default 64)")
    trio.run(main, parser.parse_args().size * 2**20)
