"""The interface of a compression method: a :class:`Method` makes one :class:`Encoder` per
sending channel and one :class:`Decoder` per receiving channel.

Pure and synchronous: nothing here imports Trio. The engine runs ``encode`` and
``decode_into`` in worker threads, one call at a time per encoder or decoder.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar

from .._errors import DecompressionError

__all__ = [
    "Decoder",
    "Encoder",
    "Method",
    "StreamDecoder",
    "StreamMethod",
    "compressed_payload_bound",
    "scatter",
    "size_error",
]


class Encoder(abc.ABC):
    """The compressing end of one channel's stream.

    Created at channel setup and never reset: like QEMU's, the stream's context carries
    from one packet to the next, so packets must be decoded in the order they were
    encoded, by one :class:`Decoder`.
    """

    @abc.abstractmethod
    def encode(self, runs: Sequence[memoryview]) -> bytes | bytearray | memoryview:
        """Compress the normal pages of one packet.

        Every page is fed in order with no flush, and the stream is flushed after the
        last one (zlib ``Z_SYNC_FLUSH``, zstd ``ZSTD_e_flush``), as QEMU's
        ``multifd-zlib.c`` and ``multifd-zstd.c`` do, so the payload decodes in full
        given the stream so far.

        Args:
            runs: The packet's normal pages in offset order, grouped into runs of
                contiguous pages; each is a memoryview of a whole number of pages.

        Returns:
            The payload: ``next_packet_size`` bytes, at most
            :meth:`Method.payload_bound` of the pages' size. It may be a view of a
            buffer the encoder reuses: valid until the next call or :meth:`close`.
        """

    # Not abstract: most encoders hold nothing that needs releasing before collection.
    def close(self) -> None:  # noqa: B027
        """Release what the encoder holds; it must not be used afterwards."""


class Decoder(abc.ABC):
    """The decompressing end of one channel's stream; state carries across packets.

    After a :class:`~trio_multifd.DecompressionError` the stream's state is unknown: the
    engine uses the decoder no more, and the built-in decoders raise the error again on
    any later call.
    """

    @abc.abstractmethod
    def decode_into(
        self, payload: bytes | bytearray | memoryview, runs: Sequence[memoryview]
    ) -> None:
        """Decode one packet's payload into its pages.

        Memory stays bounded whatever the payload claims: decoding stops a bounded step
        (for the built-in methods, one byte) past the size of ``runs``.

        Args:
            payload: The packet's ``next_packet_size`` bytes.
            runs: The target pages' memory, runs of contiguous pages in offset order.

        Raises:
            DecompressionError: The payload is corrupt or does not decode to exactly
                ``sum(len(r) for r in runs)`` bytes. ``value`` is the number of bytes
                decoded (a lower bound when decoding stopped early, ``None`` when the
                stream is corrupt), ``limit`` the number expected.
        """

    # Not abstract: most decoders hold nothing that needs releasing before collection.
    def close(self) -> None:  # noqa: B027
        """Release what the decoder holds; it must not be used afterwards."""


class Method(abc.ABC):
    """A compression method: its wire identity, its levels and its coders.

    A subclass sets the class attributes and implements :meth:`payload_bound`,
    :meth:`new_encoder` and :meth:`new_decoder`; an instance is registered with
    :func:`~trio_multifd.register_method`.
    """

    name: ClassVar[str]
    """The name users select the method by (``"none"``, ``"zlib"``, ``"zstd"``...)."""
    flag: ClassVar[int]
    """The value of the packet's compression field (``flags & 0x3e``)."""
    levels: ClassVar[range | None]
    """The levels the method accepts, or ``None`` for a method without levels."""
    default_level: ClassVar[int | None]
    """The level used when none is given (``None`` for a method without levels)."""
    compresses: ClassVar[bool]
    """Whether payloads are compressed; if not, the engine sends the pages zero-copy."""
    qemu_compatible: ClassVar[bool] = False
    """Whether the payloads are byte-compatible with QEMU's method of the same flag."""

    def check_level(self, level: int | None) -> int | None:
        """Check a compression level against :attr:`levels`.

        Args:
            level: The level asked for, or ``None`` for the default.

        Returns:
            The level to use: ``level``, or :attr:`default_level` when it is ``None``.

        Raises:
            TypeError: ``level`` is not an integer.
            ValueError: ``level`` is outside :attr:`levels`, or given to a method
                without levels.
        """
        if level is None:
            return self.default_level
        if not isinstance(level, int) or isinstance(level, bool):
            raise TypeError(f"a compression level is an int, got {type(level).__name__}")
        if self.levels is None:
            raise ValueError(f"compression method {self.name!r} takes no level, got {level}")
        if level not in self.levels:
            raise ValueError(
                f"compression method {self.name!r} takes a level from {self.levels.start}"
                f" to {self.levels.stop - 1}, got {level}"
            )
        return level

    @abc.abstractmethod
    def payload_bound(self, page_bytes: int) -> int:
        """Return the largest valid ``next_packet_size`` for ``page_bytes`` of pages.

        The receiver rejects a larger claim before reading the payload, so the bound
        must cover the method's worst case (incompressible pages, stream headers,
        the flush at the end of every packet).

        Args:
            page_bytes: The packet's normal pages times the page size.

        Returns:
            The bound in bytes.
        """

    @abc.abstractmethod
    def new_encoder(self, level: int | None) -> Encoder:
        """Return the encoder of a new channel.

        Args:
            level: The compression level, or ``None`` for the default.

        Returns:
            A fresh encoder, its stream not yet started.

        Raises:
            ValueError: A bad level (see :meth:`check_level`).
        """

    @abc.abstractmethod
    def new_decoder(self) -> Decoder:
        """Return the decoder of a new channel.

        Returns:
            A fresh decoder, its stream not yet started.
        """

    def __repr__(self) -> str:
        return f"<compression method {self.name!r} flag={self.flag:#x}>"


def compressed_payload_bound(page_bytes: int) -> int:
    """Return a payload bound that covers zlib's and zstd's worst cases.

    Args:
        page_bytes: The packet's normal pages times the page size.

    Returns:
        ``page_bytes + page_bytes // 64 + 1024``.

    Raises:
        ValueError: ``page_bytes`` is negative.
    """
    if page_bytes < 0:
        raise ValueError(f"page_bytes must not be negative, got {page_bytes}")
    # zlib's compressBound() is n + n/4096 + n/16384 + n/2**25 + 13 (a 5-byte stored-block
    # header per 16 KiB of incompressible input); zstd's ZSTD_compressBound() is n + n/256
    # + (128 KiB - n)/2048 below 128 KiB (a 3-byte header per 128 KiB block). On top of
    # those a packet can carry the stream's header (zlib 2 bytes, zstd's frame header up to
    # 18) and its flush (zlib's empty stored block of 5 bytes, a zstd block header): n/64
    # and 1 KiB cover all of it with room to spare, and cost nothing but a larger bound on
    # an allocation the receiver makes once per channel.
    return page_bytes + (page_bytes >> 6) + 1024


def scatter(data: memoryview, runs: Sequence[memoryview]) -> None:
    """Copy ``data`` into ``runs``, one after the other: a slice assignment per run.

    Args:
        data: Exactly ``sum(len(run) for run in runs)`` bytes.
        runs: The target memory.
    """
    start = 0
    for run in runs:
        end = start + len(run)
        run[:] = data[start:end]
        start = end


def size_error(decoded: int, expected: int, *, surplus: bool = False) -> DecompressionError:
    """Return the error for a payload that decodes to the wrong number of bytes.

    Args:
        decoded: Bytes decoded; with ``surplus``, how many were seen when decoding stopped.
        expected: The packet's normal pages times the page size.
        surplus: Whether the payload decodes to more than ``expected``.

    Returns:
        A :class:`~trio_multifd.DecompressionError` for field ``payload``.
    """
    if surplus:
        message = f"payload decodes to more than the {expected} bytes of its pages"
    else:
        message = f"payload decodes to {decoded} bytes, not the {expected} bytes of its pages"
    return DecompressionError(message, field="payload", value=decoded, limit=expected)


class StreamDecoder(Decoder):
    """A :class:`Decoder` whose stream is unusable after its first error."""

    max_packet_bytes: ClassVar[int | None] = None
    """The most bytes of pages one call can decode, if the implementation has a limit."""
    _failed: bool = False

    def decode_into(
        self, payload: bytes | bytearray | memoryview, runs: Sequence[memoryview]
    ) -> None:
        """Decode one packet's payload straight into its pages (see :class:`Decoder`).

        Raises:
            DecompressionError: The payload is corrupt or decodes to the wrong size, or
                an earlier payload did.
            ValueError: ``runs`` hold more than :attr:`max_packet_bytes`.
        """
        expected = sum(len(run) for run in runs)
        if self.max_packet_bytes is not None and expected > self.max_packet_bytes:
            raise ValueError(
                f"a packet holds at most {self.max_packet_bytes} bytes of pages, got {expected}"
            )
        if self._failed:
            raise DecompressionError(
                "the channel's compressed stream is unusable after an earlier error",
                field="payload",
                limit=expected,
            )
        # Any exception leaves the stream part-way through a packet, so the next packet
        # could only decode to garbage.
        self._failed = True
        self._decode(payload, runs, expected)
        self._failed = False

    @abc.abstractmethod
    def _decode(
        self, payload: bytes | bytearray | memoryview, runs: Sequence[memoryview], expected: int
    ) -> None:
        """Decode into ``runs`` exactly ``expected`` bytes or raise DecompressionError."""


class StreamMethod(Method):
    """A method framed as QEMU's zlib and zstd: one compression stream per channel,
    flushed per packet, with the bound of :func:`compressed_payload_bound`.

    A subclass sets :class:`Method`'s attributes and implements :meth:`_encoder` and
    :meth:`new_decoder`.
    """

    compresses: ClassVar[bool] = True
    qemu_compatible: ClassVar[bool] = True

    def payload_bound(self, page_bytes: int) -> int:
        """:func:`compressed_payload_bound`: the library's worst case, the stream's header
        and the per-packet flush."""
        return compressed_payload_bound(page_bytes)

    def new_encoder(self, level: int | None = None) -> Encoder:
        """Return the compressing end of a new channel's stream.

        Args:
            level: A level from :attr:`levels`, or ``None`` for :attr:`default_level`.

        Returns:
            The encoder.

        Raises:
            ValueError: The level is out of range.
        """
        checked = self.check_level(level)
        assert checked is not None
        return self._encoder(checked)

    @abc.abstractmethod
    def _encoder(self, level: int) -> Encoder:
        """Return a new channel's encoder at a checked ``level``."""
