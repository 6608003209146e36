"""The ``zstd`` method, framed as QEMU's ``migration/multifd-zstd.c``.

One zstd frame per channel, started by the channel's first payload and never ended.
Within a packet the pages are fed with ``ZSTD_e_continue`` and the stream is flushed with
``ZSTD_e_flush`` after the last one, so every payload ends on a block boundary and decodes
in full given the stream so far. A fresh decoder per packet would be wrong: blocks refer
back to earlier packets' bytes (the window) and reuse their repeat offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO, ClassVar, cast, final

import zstandard

from .._errors import DecompressionError
from .._wire import PACKET_SIZE, Compression
from ._base import (
    Decoder,
    Encoder,
    Method,
    StreamDecoder,
    compressed_payload_bound,
    size_error,
)

__all__ = ["MAX_WINDOW_SIZE", "ZstdMethod"]

MAX_WINDOW_SIZE = 1 << 25
"""The largest window a channel's frame may ask the decoder to allocate.

QEMU's highest level, 20, compresses with a 32 MiB window (``windowLog`` 25); zstd's own
limit, 128 MiB, would let any peer make every channel allocate that much.
"""

# A chunk larger than any packet's payload: the chunker then hands over each packet's
# payload whole at its flush, with no join.
_CHUNK_SIZE = compressed_payload_bound(PACKET_SIZE)


@final
class _ZstdEncoder(Encoder):
    def __init__(self, level: int) -> None:
        # Single-threaded, no checksum, no content size: the frame header that QEMU's
        # ZSTD_initCStream(level) writes. The chunker measured faster than a
        # compressobj on incompressible pages (2.8 against 2.2 GB/s), as fast elsewhere.
        self._chunker = zstandard.ZstdCompressor(level=level).chunker(chunk_size=_CHUNK_SIZE)

    def encode(self, runs: Sequence[memoryview]) -> bytes:
        # Writing a run of pages at once is the same ZSTD_e_continue stream as writing
        # its pages one by one, with fewer calls.
        chunker = self._chunker
        chunks: list[bytes] = []
        for run in runs:
            chunks += chunker.compress(run)
        # zstandard's stub leaves flush() unannotated; it yields bytes.
        chunks += chunker.flush()  # type: ignore[no-untyped-call]
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# The stream writer calls ZSTD_decompressStream only while input is left, so output that
# does not fit its buffer when the payload's last byte is read stays inside the decoder
# and would surface in the next packet. A buffer larger than any packet's pages never
# fills with a valid payload, and with a surplus it fills at once: the sink then sees at
# most one such chunk before it refuses, which bounds the memory a bomb can claim.
_WRITE_SIZE = PACKET_SIZE + 1


class _Surplus(Exception):
    """Raised by the sink, through the stream writer, at the first byte past the pages."""


@final
class _RunSink:
    """Copies the decoder's output chunks into the packet's runs, and no byte more."""

    __slots__ = ("_offset", "_run", "_runs", "decoded", "expected")

    def __init__(self) -> None:
        self.start((), 0)

    def start(self, runs: Sequence[memoryview], expected: int) -> None:
        self._runs = runs
        self._run = 0
        self._offset = 0
        self.decoded = 0
        self.expected = expected

    def finish(self) -> int:
        """Drop the references to the target memory; return the bytes decoded."""
        decoded = self.decoded
        self.start((), 0)
        return decoded

    def write(self, chunk: bytes) -> int:
        size = len(chunk)
        self.decoded += size
        if self.decoded > self.expected:
            raise _Surplus
        source = memoryview(chunk)
        done = 0
        while done < size:
            run = self._runs[self._run]
            take = min(len(run) - self._offset, size - done)
            run[self._offset : self._offset + take] = source[done : done + take]
            done += take
            self._offset += take
            if self._offset == len(run):
                self._run += 1
                self._offset = 0
        return size


@final
class _ZstdDecoder(StreamDecoder):
    max_packet_bytes = PACKET_SIZE

    def __init__(self) -> None:
        self._sink = _RunSink()
        self._writer = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE).stream_writer(
            cast(IO[bytes], self._sink), write_size=_WRITE_SIZE
        )

    def _decode(
        self, payload: bytes | bytearray | memoryview, runs: Sequence[memoryview], expected: int
    ) -> None:
        sink = self._sink
        sink.start(runs, expected)
        try:
            self._writer.write(payload)
        except _Surplus:
            raise size_error(sink.decoded, expected, surplus=True) from None
        except zstandard.ZstdError as exc:
            raise DecompressionError(
                f"corrupt zstd payload: {exc}", field="payload", limit=expected
            ) from exc
        finally:
            decoded = sink.finish()
        if decoded != expected:
            raise size_error(decoded, expected)


@final
class ZstdMethod(Method):
    """zstd compression (QEMU's ``multifd-compression zstd``): compression field 0x4."""

    name: ClassVar[str] = "zstd"
    flag: ClassVar[int] = int(Compression.ZSTD)
    levels: ClassVar[range | None] = range(21)
    default_level: ClassVar[int | None] = 1
    compresses: ClassVar[bool] = True
    qemu_compatible: ClassVar[bool] = True

    def payload_bound(self, page_bytes: int) -> int:
        """Return the largest payload a zstd packet of ``page_bytes`` of pages can have.

        Covers ``ZSTD_compressBound()``, the frame header and the block flush.

        Args:
            page_bytes: The packet's normal pages times the page size.

        Returns:
            ``page_bytes + page_bytes // 64 + 1024``.

        Raises:
            ValueError: ``page_bytes`` is negative.
        """
        return compressed_payload_bound(page_bytes)

    def new_encoder(self, level: int | None = None) -> Encoder:
        """Return the compressing end of a new channel's stream.

        Args:
            level: 0 (zstd's default, 3) to 20, or ``None`` for QEMU's default, 1.

        Returns:
            The encoder.

        Raises:
            ValueError: The level is out of range.
        """
        checked = self.check_level(level)
        assert checked is not None
        return _ZstdEncoder(checked)

    def new_decoder(self) -> Decoder:
        """Return the decompressing end of a new channel's stream.

        Returns:
            The decoder.
        """
        return _ZstdDecoder()
