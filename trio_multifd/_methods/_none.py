"""The ``none`` method: the payload is the pages themselves, in offset order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, final

from .._errors import DecompressionError
from .._wire import Compression
from ._base import Decoder, Encoder, Method, scatter

__all__ = ["NoneMethod"]


@final
class _NoneEncoder(Encoder):
    # The engine sends uncompressed pages zero-copy and never calls this: it serves
    # generic code paths and tests.
    def encode(self, runs: Sequence[memoryview]) -> bytes:
        return b"".join(runs)


@final
class _NoneDecoder(Decoder):
    def decode_into(
        self, payload: bytes | bytearray | memoryview, runs: Sequence[memoryview]
    ) -> None:
        expected = sum(len(run) for run in runs)
        if len(payload) != expected:
            raise DecompressionError(
                f"uncompressed payload is {len(payload)} bytes,"
                f" not the {expected} bytes of its pages",
                field="payload",
                value=len(payload),
                limit=expected,
            )
        scatter(memoryview(payload), runs)


@final
class NoneMethod(Method):
    """No compression (QEMU's ``multifd-compression none``): compression field 0."""

    name: ClassVar[str] = "none"
    flag: ClassVar[int] = int(Compression.NONE)
    levels: ClassVar[range | None] = None
    default_level: ClassVar[int | None] = None
    compresses: ClassVar[bool] = False
    qemu_compatible: ClassVar[bool] = True

    def payload_bound(self, page_bytes: int) -> int:
        """Return ``page_bytes``: an uncompressed payload is exactly its pages.

        Args:
            page_bytes: The packet's normal pages times the page size.

        Returns:
            ``page_bytes``.

        Raises:
            ValueError: ``page_bytes`` is negative.
        """
        if page_bytes < 0:
            raise ValueError(f"page_bytes must not be negative, got {page_bytes}")
        return page_bytes

    def new_encoder(self, level: int | None = None) -> Encoder:
        """Return an encoder that joins the pages (the engine sends them zero-copy instead).

        Args:
            level: Must be ``None``: the method takes no level.

        Returns:
            The encoder.

        Raises:
            ValueError: A level was given.
        """
        self.check_level(level)
        return _NoneEncoder()

    def new_decoder(self) -> Decoder:
        """Return a decoder that copies the payload into the pages.

        Returns:
            The decoder.
        """
        return _NoneDecoder()
