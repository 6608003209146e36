"""The exception hierarchy: everything trio_multifd raises for a failed transfer.

Misuse by the caller (a bad argument, a block that does not fit) raises the built-in
:class:`ValueError` / :class:`TypeError` instead, so that code which catches
:class:`MultiFDError` only ever sees what the peer, the network or the file behind a
mapped block did.
"""

from __future__ import annotations

__all__ = [
    "BlockNameError",
    "ChannelIdError",
    "CompressionMismatchError",
    "CopyError",
    "DecompressionError",
    "DeliveryError",
    "DuplicateChannelError",
    "FeatureError",
    "FlagsError",
    "HandshakeTimeoutError",
    "IntegrityError",
    "MagicError",
    "MappingError",
    "MultiFDError",
    "OffsetError",
    "PageCountError",
    "PayloadSizeError",
    "PrecopyAbortedError",
    "ProtocolError",
    "ReceiveTimeoutError",
    "SendStalledError",
    "TooManyChannelsError",
    "TransferIncompleteError",
    "TransportError",
    "TruncatedError",
    "UUIDMismatchError",
    "UnknownBlockError",
    "UnsupportedCompressionError",
    "VersionError",
]


class MultiFDError(Exception):
    """Base class of every error of a transfer.

    Attributes:
        message: The description of the error, without the channel and packet prefix
            that ``str()`` adds.
        channel: The channel id the error belongs to, or ``None`` when it concerns the
            transfer as a whole (or the channel is not known yet, as before a
            handshake). The message starts with ``channel N:`` when it is set.
        packet_num: The ``packet_num`` of the packet at fault, when there is one.
    """

    channel: int | None
    packet_num: int | None

    def __init__(
        self, message: str, *, channel: int | None = None, packet_num: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.channel = channel
        self.packet_num = packet_num

    def __str__(self) -> str:
        where = []
        if self.channel is not None:
            where.append(f"channel {self.channel}")
        if self.packet_num is not None:
            where.append(f"packet {self.packet_num}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class ProtocolError(MultiFDError):
    """The peer sent bytes that break the multifd protocol.

    Attributes:
        field: The name of the wire field at fault (e.g. ``"magic"``, ``"normal_pages"``).
        value: The value the peer sent.
        limit: The value or bound it was checked against, when there is one.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str,
        value: object = None,
        limit: object = None,
        channel: int | None = None,
        packet_num: int | None = None,
    ) -> None:
        super().__init__(message, channel=channel, packet_num=packet_num)
        self.field = field
        self.value = value
        self.limit = limit


class MagicError(ProtocolError):
    """A handshake or packet header does not start with the multifd magic."""


class VersionError(ProtocolError):
    """A handshake or packet header has a version other than 1."""


class UUIDMismatchError(ProtocolError):
    """A channel's handshake names another transfer's uuid."""


class ChannelIdError(ProtocolError):
    """A handshake's channel id is not below the configured channel count."""


class DuplicateChannelError(ProtocolError):
    """A second handshake arrived for a channel id that is already set up."""


class TooManyChannelsError(ProtocolError):
    """More channels connected than the receiver was configured for."""


class FeatureError(ProtocolError):
    """The handshake's features word does not match the receiver's settings."""


class PageCountError(ProtocolError):
    """``pages_alloc``, ``normal_pages`` or ``zero_pages`` is out of range."""


class BlockNameError(ProtocolError):
    """The ``ramblock`` field is not a NUL-terminated UTF-8 name."""


class UnknownBlockError(ProtocolError):
    """A packet with pages names a block the receiver does not have."""


class OffsetError(ProtocolError):
    """A page offset lies beyond its block or is not page-aligned."""


class FlagsError(ProtocolError):
    """The packet's flags carry bits this receiver does not accept."""


class UnsupportedCompressionError(FlagsError):
    """The packet's compression field names a method that is not available here."""


class CompressionMismatchError(FlagsError):
    """A packet's compression method differs from the one the receiver was opened with."""


class PayloadSizeError(ProtocolError):
    """``next_packet_size`` is outside the bounds of the packet's method."""


class TruncatedError(ProtocolError):
    """The stream ended inside a handshake, a header or a payload (a clean end inside a
    round is a :class:`TransferIncompleteError`)."""


class DecompressionError(ProtocolError):
    """A compressed payload is corrupt or does not decode to exactly its pages."""


class IntegrityError(ProtocolError):
    """A checksum of a header or a payload does not match the bytes received."""


class PrecopyAbortedError(MultiFDError):
    """A pre-copy migration ended without its final round: the sender gave up
    (``force_stop=False``), or left or died before :func:`~trio_multifd.precopy` finished.
    """


class TransportError(MultiFDError):
    """A channel's stream failed (connection refused, reset, broken pipe).

    The underlying exception is chained as ``__cause__``.
    """


class HandshakeTimeoutError(MultiFDError):
    """A channel did not complete its handshake within ``handshake_timeout``."""


class SendStalledError(MultiFDError):
    """The peer accepted no bytes of a channel for longer than ``send_timeout``."""


class ReceiveTimeoutError(MultiFDError):
    """No byte arrived inside a packet for longer than ``receive_timeout``."""


class TransferIncompleteError(MultiFDError):
    """The transfer ended before what was asked for could complete.

    Raised by ``Receiver.sync()`` for a round that can never complete because every
    channel has ended, and when a channel ends while a round is still open.
    """


class MappingError(MultiFDError):
    """Pages of a block over a mapped file (an ``mmap`` of a file, a view or slice of
    one, a numpy ``memmap``) could not be made present: the file behind the mapping is
    shorter than the block (truncated), or its file system is full. Raised when the
    engine faults a packet's pages in, before it touches them, instead of the ``SIGBUS``
    that touching them would be."""


class DeliveryError(MultiFDError):
    """The sender could not confirm that the receiver completed the transfer."""


class CopyError(Exception):
    """A file copy (``trio-multifd send`` / ``recv``) failed; the message is the one line
    the command prints. Not a :class:`MultiFDError`: it concerns the files and the
    control stream, not the transfer's channels."""
