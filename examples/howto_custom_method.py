"""How-to: register a compression method of your own.

A method is a :class:`trio_multifd.Method` subclass: a name, a flag (its value in the
packet's compression field, ``flags & 0x3e``), its levels, a payload bound, and factories
for one :class:`~trio_multifd.Encoder` per sending channel and one
:class:`~trio_multifd.Decoder` per receiving channel. This one is raw deflate (zlib's
algorithm without the zlib header); both ends must register it.

    python examples/howto_custom_method.py
"""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Sequence
from typing import ClassVar

import trio

import trio_multifd


class RawDeflateEncoder(trio_multifd.Encoder):
    def __init__(self, level: int) -> None:
        # One stream per channel, never reset: each packet continues the stream.
        self._deflate = zlib.compressobj(level, zlib.DEFLATED, -15)

    def encode(self, runs: Sequence[memoryview]) -> bytes:
        parts = [self._deflate.compress(run) for run in runs]
        # Flush at the end of every packet, so the receiver can decode it in full.
        parts.append(self._deflate.flush(zlib.Z_SYNC_FLUSH))
        return b"".join(parts)


class RawDeflateDecoder(trio_multifd.Decoder):
    def __init__(self) -> None:
        self._inflate = zlib.decompressobj(-15)

    def decode_into(
        self, payload: bytes | bytearray | memoryview, runs: Sequence[memoryview]
    ) -> None:
        expected = sum(len(run) for run in runs)
        try:
            # max_length bounds the output: a payload that would inflate to more than
            # its pages (a "bomb") costs at most one byte more than the pages.
            data = self._inflate.decompress(payload, expected)
            surplus = self._inflate.decompress(self._inflate.unconsumed_tail, 1)
        except zlib.error as exc:
            raise trio_multifd.DecompressionError(
                f"corrupt raw deflate payload: {exc}", field="payload", limit=expected
            ) from exc
        if len(data) != expected or surplus:
            raise trio_multifd.DecompressionError(
                f"payload does not decode to the {expected} bytes of its pages",
                field="payload",
                value=len(data) + len(surplus),
                limit=expected,
            )
        at = 0
        for run in runs:  # the pages, in offset order
            run[:] = data[at : at + len(run)]
            at += len(run)


class RawDeflate(trio_multifd.Method):
    name: ClassVar[str] = "deflate-raw"
    flag: ClassVar[int] = 0x6  # unused by QEMU, which gives its methods single bits
    levels: ClassVar[range | None] = range(10)
    default_level: ClassVar[int | None] = 1
    compresses: ClassVar[bool] = True

    def payload_bound(self, page_bytes: int) -> int:
        # Covers deflate's worst case (stored blocks) plus the flush of every packet.
        return page_bytes + page_bytes // 64 + 1024

    def new_encoder(self, level: int | None) -> trio_multifd.Encoder:
        checked = self.check_level(level)
        assert checked is not None
        return RawDeflateEncoder(checked)

    def new_decoder(self) -> trio_multifd.Decoder:
        return RawDeflateDecoder()


async def main() -> None:
    trio_multifd.register_method(RawDeflate())
    size = 8 * 2**20
    source = bytearray(os.urandom(size // 2)) + bytes(range(256)) * (size // 512)
    target = bytearray(size)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def connect(channel_id: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    sending = trio_multifd.RAMBlock("buffer", source)
    async with trio_multifd.open_receiver(
        [trio_multifd.RAMBlock("buffer", target)], channels=2, compression="deflate-raw"
    ) as receiver:
        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.serve, listeners)
            async with trio_multifd.open_sender(
                connect, channels=2, compression="deflate-raw", compression_level=6
            ) as sender:
                await sender.queue_pages(sending, range(0, sending.size, sending.page_size))
        await receiver.wait_closed()
    for listener in listeners:
        await listener.aclose()
    trio_multifd.unregister_method("deflate-raw")
    stats = sender.stats
    print(f"{stats.page_bytes} bytes of pages as {stats.bytes} bytes on the wire")
    print(f"verified: {target == source}")
    if target != source:
        sys.exit(1)


if __name__ == "__main__":
    trio.run(main)
