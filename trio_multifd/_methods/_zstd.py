"""The ``zstd`` method, framed as QEMU's ``migration/multifd-zstd.c``.

One zstd frame per channel, started by the channel's first payload and never ended.
Within a packet the pages are fed with ``ZSTD_e_continue`` and the stream is flushed with
``ZSTD_e_flush`` after the last one, so every payload ends on a block boundary and decodes
in full given the stream so far. A fresh decoder per packet would be wrong: blocks refer
back to earlier packets' bytes (the window) and reuse their repeat offsets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import IO, ClassVar, cast, final

import zstandard

try:
    # libzstd's C API as python-zstandard's CFFI backend binds it (untyped, as it is
    # there). Builds without that backend (free-threaded wheels, some distributions)
    # get the C backend's chunker instead: the same stream, one copy more per byte.
    from zstandard._cffi import ffi, lib  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - the CI's wheels have it
    ffi = lib = None

from .._errors import DecompressionError
from .._wire import PACKET_SIZE, Compression
from ._base import (
    Decoder,
    Encoder,
    StreamDecoder,
    StreamMethod,
    compressed_payload_bound,
    scatter,
    size_error,
)

__all__ = ["MAX_WINDOW_SIZE", "ZstdMethod"]

MAX_WINDOW_SIZE = 1 << 25
"""The largest window a channel's frame may ask the decoder to allocate.

QEMU's highest level, 20, compresses with a 32 MiB window (``windowLog`` 25); zstd's own
limit, 128 MiB, would let any peer make every channel allocate that much.
"""

# libzstd's own streaming call, through the CFFI binding that zstandard's wheels ship: it
# compresses into a buffer the encoder keeps, where the C backend's chunker and
# compressobj return each payload as a new bytes object, one more copy of every byte.
# Measured on 2 cores, 4 channels, random data, alternating runs: 0.72-0.80 against
# 0.79-0.90 CPU s/GB in the sender. The decoder needs no such thing: zstandard's stream
# reader already decodes straight into the target.
_OUTPUT_SIZE = compressed_payload_bound(PACKET_SIZE)
if lib is not None:
    # Looked up once: an attribute of the CFFI library costs a lookup per packet.
    _compress_stream = lib.ZSTD_compressStream2_simpleArgs
    _is_error = lib.ZSTD_isError
    _CONTINUE = lib.ZSTD_e_continue
    _FLUSH = lib.ZSTD_e_flush


@final
class _ZstdEncoder(Encoder):
    """libzstd's ZSTD_compressStream2 into a buffer the encoder keeps."""

    def __init__(self, level: int) -> None:
        cctx = lib.ZSTD_createCCtx()
        if cctx == ffi.NULL:
            raise MemoryError("zstd: cannot allocate a compression context")
        self._cctx = ffi.gc(cctx, lib.ZSTD_freeCCtx)
        # Single-threaded, no checksum, no content size: the frame header that QEMU's
        # ZSTD_initCStream(level) writes.
        _check(lib.ZSTD_CCtx_setParameter(self._cctx, lib.ZSTD_c_compressionLevel, level))
        self._output = bytearray(_OUTPUT_SIZE)
        self._dst = ffi.from_buffer(self._output)
        self._view = memoryview(self._output)
        self._out_pos = ffi.new("size_t *")
        self._in_pos = ffi.new("size_t *")
        self._closed = False

    def encode(self, runs: Sequence[memoryview]) -> memoryview:
        # Feeding a run of pages at once is the same ZSTD_e_continue stream as feeding its
        # pages one by one, with fewer calls; the last run is fed with ZSTD_e_flush.
        if self._closed:
            raise ValueError("the zstd encoder is closed")
        self._out_pos[0] = 0
        last = len(runs) - 1
        for index, run in enumerate(runs):
            self._feed(run, _FLUSH if index == last else _CONTINUE)
        return self._view[: self._out_pos[0]]

    def _feed(self, run: memoryview, mode: int) -> None:
        cctx, dst, out_pos, in_pos = self._cctx, self._dst, self._out_pos, self._in_pos
        size = len(run)
        in_pos[0] = 0
        with ffi.from_buffer(run) as src:
            while True:
                left = _check(
                    _compress_stream(cctx, dst, _OUTPUT_SIZE, out_pos, src, size, in_pos, mode)
                )
                if in_pos[0] == size and (mode == _CONTINUE or not left):
                    return
                # The buffer holds any packet's payload: a full one is a broken bound.
                if out_pos[0] == _OUTPUT_SIZE:
                    raise RuntimeError("zstd: a packet's payload outgrew its bound")

    def close(self) -> None:
        # The context is freed here, not at collection: encode() must not reach it after.
        self._closed = True
        ffi.release(self._dst)
        ffi.release(self._cctx)


def _check(result: int) -> int:
    if _is_error(result):
        name = ffi.string(lib.ZSTD_getErrorName(result)).decode()
        raise RuntimeError(f"zstd compression failed: {name}")
    return result


@final
class _ZstdChunkerEncoder(Encoder):
    """The same stream through zstandard's C backend, for builds without its CFFI one."""

    def __init__(self, level: int) -> None:
        # A chunk larger than any packet's payload: the chunker hands over each packet's
        # payload whole at its flush.
        self._chunker = zstandard.ZstdCompressor(level=level).chunker(chunk_size=_OUTPUT_SIZE)

    def encode(self, runs: Sequence[memoryview]) -> bytes:
        chunker = self._chunker
        chunks: list[bytes] = []
        for run in runs:
            chunks += chunker.compress(run)
        # zstandard's stub leaves flush() unannotated; it yields bytes.
        chunks += chunker.flush()  # type: ignore[no-untyped-call]
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_ENCODER: Callable[[int], Encoder] = _ZstdChunkerEncoder if lib is None else _ZstdEncoder


_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"
_DICT_ID_SIZES = (0, 1, 2, 4)
_CONTENT_SIZE_SIZES = (0, 2, 4, 8)


def _block_error(payload: bytes | bytearray | memoryview, frame_start: bool) -> str | None:
    """Why ``payload`` is not whole zstd blocks that leave the frame open (after the
    frame's header when ``frame_start``), or ``None``.

    QEMU flushes a block at the end of each packet and never ends the frame, so every
    payload is whole blocks. Checked before decoding: a stray byte at the end would
    start a block header that yields nothing yet, and the next packet would be the one
    to fail (its pages written with garbage first). The blocks' contents are libzstd's
    to check.
    """
    pos, end = 0, len(payload)
    if frame_start:
        if end < 5 or bytes(payload[:4]) != _FRAME_MAGIC:
            return "does not start with a zstd frame header, as a channel's first must"
        descriptor = payload[4]
        single_segment = descriptor >> 5 & 1
        pos = (
            5
            + (1 - single_segment)
            + _DICT_ID_SIZES[descriptor & 3]
            + (_CONTENT_SIZE_SIZES[descriptor >> 6] or single_segment)
        )
        if pos > end:
            return f"ends inside its frame header ({end} of its {pos} bytes)"
    while pos < end:
        if end - pos < 3:
            return f"ends inside a block header ({end - pos} of its 3 bytes)"
        header = payload[pos] | payload[pos + 1] << 8 | payload[pos + 2] << 16
        if header & 1:
            return "ends the channel's zstd frame (a last block), which QEMU never does"
        # An RLE block (type 1) holds one byte, whatever size it decodes to.
        pos += 3 + (1 if header >> 1 & 3 == 1 else header >> 3)
    if pos > end:
        return f"ends inside a block ({pos - end} bytes short)"
    return None


class _Exhausted(Exception):
    """Raised through the stream reader when it asks for input past the payload."""


# An empty raw block: a 3-byte block header of type raw, size 0, not the last. It decodes
# to nothing and leaves the window and the repeat offsets as they are.
_EMPTY_BLOCK = memoryview(bytes(3))


@final
class _PayloadSource:
    """The stream reader's source: each packet's payload once, then :class:`_Exhausted`.

    With ``nudge`` set, one empty block follows the payload: zstandard's reader calls
    ``ZSTD_decompressStream`` only with input at hand, so output that zstd decoded but
    could not hand over (its target was full) stays inside it until more input comes.
    Never an empty read: the reader takes it as the end of its input, for good.
    """

    __slots__ = ("nudge", "payload")

    def __init__(self) -> None:
        self.payload: memoryview | None = None
        self.nudge = False

    def read(self, size: int) -> memoryview:
        payload = self.payload
        if payload is not None:
            self.payload = None
            return payload
        if self.nudge:
            self.nudge = False
            return _EMPTY_BLOCK
        raise _Exhausted


@final
class _ZstdDecoder(StreamDecoder):
    max_packet_bytes = PACKET_SIZE

    def __init__(self) -> None:
        self._source = _PayloadSource()
        self._reader: zstandard.ZstdDecompressionReader | None = zstandard.ZstdDecompressor(
            max_window_size=MAX_WINDOW_SIZE
        ).stream_reader(cast(IO[bytes], self._source))
        # Pages that are not one run are decoded here first, then scattered.
        self._scratch = memoryview(bytearray(PACKET_SIZE))
        self._surplus = memoryview(bytearray(1))
        self._frame_started = False

    def _decode(
        self, payload: bytes | bytearray | memoryview, runs: Sequence[memoryview], expected: int
    ) -> None:
        # One contiguous window of exactly the pages' size: the target run itself when
        # the pages are one run (no copy), else the scratch. readinto1 runs
        # ZSTD_decompressStream until it has output and asks the source for input only
        # when it has none left: _Exhausted loses no decoded byte, and output pending
        # inside zstd means the window is full. Then one more read, into a spare byte,
        # with one empty block as extra input: at a block boundary it decodes to
        # nothing, so any output is a surplus (pending, in the payload, or the empty
        # block read as the rest of a cut block), which never reaches the next packet.
        # Nothing is written outside the packet's pages.
        # Not zstandard's stream_writer with a sink that raises at the first surplus
        # byte: 0.25 then leaks the writer's output buffer, which a peer could repeat at
        # will.
        reader, source = self._reader, self._source
        if reader is None:
            raise ValueError("the zstd decoder is closed")
        problem = _block_error(payload, frame_start=not self._frame_started)
        if problem is not None:
            raise DecompressionError(f"zstd payload {problem}", field="payload", limit=expected)
        self._frame_started = True
        window = runs[0] if len(runs) == 1 else self._scratch[:expected]
        decoded = 0
        source.payload = memoryview(payload) if len(payload) else None
        source.nudge = False
        try:
            while decoded < expected:
                step = reader.readinto1(window[decoded:])
                if not step:
                    # Only once the reader has taken its input as ended, for good.
                    raise _Exhausted
                decoded += step
            source.nudge = True
            decoded += reader.readinto1(self._surplus)
        except _Exhausted:
            pass
        except zstandard.ZstdError as exc:
            raise DecompressionError(
                f"corrupt zstd payload: {exc}", field="payload", limit=expected
            ) from exc
        finally:
            source.payload = None
        if decoded > expected:
            raise size_error(decoded, expected, surplus=True)
        if decoded != expected:
            raise size_error(decoded, expected)
        if len(runs) > 1:
            scatter(window, runs)

    def close(self) -> None:
        # libzstd's window (up to MAX_WINDOW_SIZE, resident once filled) goes with the
        # reader, freed here rather than at collection: a failed transfer's reference
        # cycles can keep the decoder until the cyclic collector runs.
        self._reader = None


@final
class ZstdMethod(StreamMethod):
    """zstd compression (QEMU's ``multifd-compression zstd``): compression field 0x4.

    Levels 0 (zstd's default, 3) to 20, default 1 (QEMU's).
    """

    name: ClassVar[str] = "zstd"
    flag: ClassVar[int] = int(Compression.ZSTD)
    levels: ClassVar[range | None] = range(21)
    default_level: ClassVar[int | None] = 1

    def _encoder(self, level: int) -> Encoder:
        return _ENCODER(level)

    def new_decoder(self) -> Decoder:
        """Return the decompressing end of a new channel's stream.

        Returns:
            The decoder.
        """
        return _ZstdDecoder()
