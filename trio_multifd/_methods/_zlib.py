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
    StreamDecoder,
    StreamMethod,
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


# What Z_SYNC_FLUSH ends every packet's payload with: an empty stored block. Checked
# because a stray byte after it would start a block that yields nothing yet, and the
# next packet would be the one to fail. The cheap first test, with the clearer message;
# _ends_between_blocks() is the exact one.
_SYNC_FLUSH_END = b"\x00\x00\xff\xff"
# An empty final block (fixed Huffman codes, end of block at once), byte-aligned: what a
# stream that stopped between blocks can take next, then its adler32 trailer.
_LAST_EMPTY_BLOCK = b"\x03\x00"


def _ends_between_blocks(inflate: zlib._Decompress, adler: int) -> bool:
    """Whether ``inflate`` stopped between two blocks, ``adler`` being the adler32 of
    everything it has output.

    Python's inflate does not say where it stopped (no ``Z_BLOCK``, no ``data_type``),
    so a copy of it is ended there: only a stream between blocks takes an empty last
    block and then the right trailer. A payload cut inside a block header whose last
    four bytes happen to read ``00 00 ff ff`` fails here, on its own packet.
    """
    probe = inflate.copy()
    try:
        rest = probe.decompress(_LAST_EMPTY_BLOCK + adler.to_bytes(4, "big"))
    except zlib.error:
        return False
    return probe.eof and not rest and not probe.unused_data


def _asks_for_dictionary(header: bytes) -> bool:
    """Whether ``header``, a payload's first 2 bytes (it has at least the 4 of its sync
    flush), is a zlib header that inflate accepts up to its FDICT bit."""
    cmf, flg = header[0], header[1]
    # inflate's order: the check bits, the method (8, deflate), the window (at most
    # 32 KiB), and only then the preset dictionary.
    return (cmf << 8 | flg) % 31 == 0 and cmf & 0x0F == 8 and cmf >> 4 <= 7 and bool(flg & 0x20)


@final
class _ZlibDecoder(StreamDecoder):
    def __init__(self) -> None:
        self._inflate = zlib.decompressobj()
        self._started = False
        # adler32 of the stream's output so far: the trailer _ends_between_blocks needs.
        self._adler = 1

    def _decode(
        self, payload: bytes | bytearray | memoryview, runs: Sequence[memoryview], expected: int
    ) -> None:
        if bytes(payload[-len(_SYNC_FLUSH_END) :]) != _SYNC_FLUSH_END:
            raise DecompressionError(
                "zlib payload does not end with a sync flush (00 00 ff ff), as QEMU's"
                " packets do: it ends inside the stream's next block",
                field="payload",
                limit=expected,
            )
        inflate = self._inflate
        try:
            # max_length bounds the output (0 would mean no bound); the packet's output is
            # inflated whole and then scattered, as there is no inflate-into in Python.
            data = inflate.decompress(payload, expected) if expected else b""
            rest = inflate.unconsumed_tail if expected else payload
            # The pages can be complete before inflate has read the packet's last bytes
            # (at least the sync flush's empty block): those must yield no byte more.
            # With room left in the output, one call reads all of its input. Called even
            # with no input left: a match cut off by max_length leaves output pending
            # inside inflate, which would otherwise start the next packet's pages.
            surplus = len(inflate.decompress(rest, 1))
        except zlib.error as exc:
            if not self._started and _asks_for_dictionary(bytes(payload[:2])):
                # inflate reports this as a bare "Error 2" (Z_NEED_DICT).
                raise DecompressionError(
                    "zlib stream header asks for a preset dictionary (FDICT), which"
                    " QEMU's deflateInit never sets",
                    field="payload",
                    limit=expected,
                ) from exc
            raise DecompressionError(
                f"corrupt zlib payload: {exc}", field="payload", limit=expected
            ) from exc
        self._started = True
        if surplus:
            raise size_error(len(data) + surplus, expected, surplus=True)
        if inflate.eof:
            # QEMU never ends the stream; no later payload could be decoded.
            raise DecompressionError(
                "zlib payload ends the channel's stream", field="payload", limit=expected
            )
        if len(data) != expected:
            raise size_error(len(data), expected)
        adler = zlib.adler32(data, self._adler)
        if not _ends_between_blocks(inflate, adler):
            raise DecompressionError(
                "zlib payload ends inside a block, not where QEMU's sync flush ends it",
                field="payload",
                limit=expected,
            )
        self._adler = adler
        scatter(memoryview(data), runs)


@final
class ZlibMethod(StreamMethod):
    """zlib compression (QEMU's ``multifd-compression zlib``): compression field 0x2.

    Levels 0 (store) to 9 (smallest), default 1 (QEMU's).
    """

    name: ClassVar[str] = "zlib"
    flag: ClassVar[int] = int(Compression.ZLIB)
    levels: ClassVar[range | None] = range(10)
    default_level: ClassVar[int | None] = 1

    def _encoder(self, level: int) -> Encoder:
        return _ZlibEncoder(level)

    def new_decoder(self) -> Decoder:
        """Return the decompressing end of a new channel's stream.

        Returns:
            The decoder.
        """
        return _ZlibDecoder()
