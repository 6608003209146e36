"""The ``zlib`` method, framed as QEMU's ``migration/multifd-zlib.c``.

One deflate stream per channel with the zlib wrapper (``deflateInit(level)``: 32 KiB
window, 2-byte header at the start of the channel's first payload, never finished).
Within a packet the pages are fed with ``Z_NO_FLUSH`` and the stream is flushed with
``Z_SYNC_FLUSH`` after the last one, so every payload ends on a byte boundary with the
empty stored block ``00 00 ff ff`` and inflates in full given the stream so far.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import ClassVar, final

from .._errors import DecompressionError
from .._wire import Compression
from ._base import (
    Decoder,
    Encoder,
    Method,
    StreamDecoder,
    compressed_payload_bound,
    scatter,
    size_error,
)

__all__ = ["ZlibMethod"]


@final
class _ZlibEncoder(Encoder):
    def __init__(self, level: int) -> None:
        # compressobj's defaults (wbits 15, memLevel 8) are deflateInit's.
        self._deflate = zlib.compressobj(level)

    def encode(self, runs: Sequence[memoryview]) -> bytes:
        # Feeding a run of pages in one call is the same Z_NO_FLUSH stream as feeding its
        # pages one by one, with fewer calls.
        deflate = self._deflate
        parts = [deflate.compress(run) for run in runs]
        parts.append(deflate.flush(zlib.Z_SYNC_FLUSH))
        return b"".join(parts)


@final
class _ZlibDecoder(StreamDecoder):
    def __init__(self) -> None:
        self._inflate = zlib.decompressobj()

    def _decode(
        self, payload: bytes | bytearray | memoryview, runs: Sequence[memoryview], expected: int
    ) -> None:
        inflate = self._inflate
        try:
            # max_length bounds the output (0 would mean no bound); the packet's output is
            # inflated whole and then scattered, as there is no inflate-into in Python.
            data = inflate.decompress(payload, expected) if expected else b""
            rest = inflate.unconsumed_tail if expected else payload
            # The pages can be complete before inflate has read the packet's last bytes
            # (at least the sync flush's empty block): those must yield no byte more.
            # With room left in the output, one call reads all of its input.
            surplus = len(inflate.decompress(rest, 1)) if rest else 0
        except zlib.error as exc:
            raise DecompressionError(
                f"corrupt zlib payload: {exc}", field="payload", limit=expected
            ) from exc
        if surplus:
            raise size_error(len(data) + surplus, expected, surplus=True)
        if inflate.eof:
            # QEMU never ends the stream; no later payload could be decoded.
            raise DecompressionError(
                "zlib payload ends the channel's stream", field="payload", limit=expected
            )
        if len(data) != expected:
            raise size_error(len(data), expected)
        scatter(memoryview(data), runs)


@final
class ZlibMethod(Method):
    """zlib compression (QEMU's ``multifd-compression zlib``): compression field 0x2."""

    name: ClassVar[str] = "zlib"
    flag: ClassVar[int] = int(Compression.ZLIB)
    levels: ClassVar[range | None] = range(10)
    default_level: ClassVar[int | None] = 1
    compresses: ClassVar[bool] = True
    qemu_compatible: ClassVar[bool] = True

    def payload_bound(self, page_bytes: int) -> int:
        """Return the largest payload a zlib packet of ``page_bytes`` of pages can have.

        Covers zlib's ``compressBound()``, the stream header and the sync flush.

        Args:
            page_bytes: The packet's normal pages times the page size.

        Returns:
            ``page_bytes + page_bytes // 64 + 1024``.

        Raises:
            ValueError: ``page_bytes`` is negative.
        """
        return compressed_payload_bound(page_bytes)

    def new_encoder(self, level: int | None = None) -> Encoder:
        """Return the deflate end of a new channel's stream.

        Args:
            level: 0 (store) to 9 (smallest), or ``None`` for QEMU's default, 1.

        Returns:
            The encoder.

        Raises:
            ValueError: The level is out of range.
        """
        checked = self.check_level(level)
        assert checked is not None
        return _ZlibEncoder(checked)

    def new_decoder(self) -> Decoder:
        """Return the inflate end of a new channel's stream.

        Returns:
            The decoder.
        """
        return _ZlibDecoder()
