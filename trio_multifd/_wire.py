"""The multifd wire format: a sans-I/O codec for the handshake and the packet header.

Byte for byte QEMU's ``MultiFDInit_t`` and ``MultiFDPacket_t`` in current QEMU's layout
(QEMU 7.2 and later: ``zero_pages`` sits in what the 2020 layout called ``unused``). All
integers are big-endian. Nothing here does I/O or imports Trio: decoders take bytes and
return frozen values or raise a :class:`~trio_multifd.ProtocolError` subclass naming the
field, the value seen and the limit.
"""

from __future__ import annotations

import enum
import functools
import numbers
import operator
import struct
import uuid as uuid_mod
from collections.abc import Iterable, Sequence

import attrs
import xxhash

from ._errors import (
    BlockNameError,
    ChannelIdError,
    FlagsError,
    MagicError,
    PageCountError,
    UUIDMismatchError,
    VersionError,
)

__all__ = [
    "BLOCK_NAME_SIZE",
    "COMPRESSION_MASK",
    "HANDSHAKE_SIZE",
    "HEADER_FIXED_SIZE",
    "MAGIC",
    "PACKET_SIZE",
    "VERSION",
    "Compression",
    "Feature",
    "Flag",
    "Handshake",
    "PacketHeader",
    "as_integer",
    "chain_start",
    "check_header_start",
    "check_transfer_args",
    "checked_count",
    "checked_seconds",
    "decode_handshake",
    "decode_packet_header",
    "encode_handshake",
    "encode_packet_header",
    "header_checksum",
    "header_size",
    "pack_packet_header",
    "page_count_for",
    "payload_checksum",
    "seal_header",
    "stored_header_checksum",
]

MAGIC = 0x11223344
"""First four bytes of every handshake and packet header."""
VERSION = 1
"""The only multifd version there is."""
HANDSHAKE_SIZE = 64
"""Length of ``MultiFDInit_t``."""
HEADER_FIXED_SIZE = 320
"""Length of ``MultiFDPacket_t`` before its ``offset[]`` array."""
BLOCK_NAME_SIZE = 256
"""Size of the NUL-terminated ``ramblock`` field (names are at most 255 bytes)."""
PACKET_SIZE = 512 * 1024
"""Page bytes per packet (QEMU's ``MULTIFD_PACKET_SIZE``): 128 pages of 4 KiB."""
COMPRESSION_MASK = 0x3E
"""The bits of ``flags`` that name the compression method, compared for equality."""


class Flag(enum.IntFlag):
    """Bits of a packet header's ``flags`` word.

    QEMU allocates its flags upward from bit 0; trio_multifd's own extensions take bits
    downward from 31 so that a stream without them stays byte-identical to QEMU's.
    """

    SYNC = 0x1
    """The packet ends a SYNC round on its channel."""
    ZLIB = 0x2
    ZSTD = 0x4
    QPL = 0x8
    UADK = 0x10
    QATZIP = 0x20
    DEVICE_STATE = 0x40
    """QEMU 10's device-state packets, not supported here and always rejected."""
    END_OF_STREAM = 0x20000000
    """This SYNC is the sender's last, on streams without a reset (all but TCP) and on
    every stream with checksums (trio_multifd)."""
    FINAL_ROUND = 0x40000000
    """This SYNC closes the final pre-copy round (trio_multifd)."""
    CHECKSUMS = 0x80000000
    """The header carries xxh3-64 checksums at offsets 40 and 48 (trio_multifd)."""


class Compression(enum.IntEnum):
    """Values of the compression field (``flags & COMPRESSION_MASK``)."""

    NONE = 0x0
    ZLIB = 0x2
    ZSTD = 0x4
    QPL = 0x8
    UADK = 0x10
    QATZIP = 0x20


class Feature(enum.IntFlag):
    """Bits of the handshake's features word (be64 at offset 32, QEMU's ``unused2[0]``)."""

    CHECKSUMS = 0x1
    """Every packet of the channel carries header and payload checksums."""
    IN_BAND_END = 0x2
    """The channel's final SYNC carries ``END_OF_STREAM``, and an end of stream before it
    is the sender's failure: for streams without a reset (all but TCP: Unix sockets, TLS,
    memory and custom streams), where a failure byte may not go in (a ``send_all`` cut
    short, a full buffer before a receiver that is behind), and for every stream with
    ``CHECKSUMS`` (a relay may pass a TCP reset on as a plain end)."""


# Plain ints for the per-packet checks: operators on enum members cost a microsecond each.
_KNOWN_FLAGS = int(
    Flag.SYNC | COMPRESSION_MASK | Flag.END_OF_STREAM | Flag.FINAL_ROUND | Flag.CHECKSUMS
)
_SYNC = int(Flag.SYNC)
_DEVICE_STATE = int(Flag.DEVICE_STATE)

_HANDSHAKE = struct.Struct(">II16sB7xQQQQ")
# magic, version, flags, pages_alloc, normal_pages, next_packet_size, packet_num,
# zero_pages, unused32, header checksum, payload checksum, unused64, ramblock.
_HEADER = struct.Struct(">IIIIIIQIIQQQ256s")
assert _HANDSHAKE.size == HANDSHAKE_SIZE
assert _HEADER.size == HEADER_FIXED_SIZE

_CHECKSUM_AT = 40
_ZERO_CHECKSUM = bytes(8)

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1


@functools.cache
def _offsets_struct(count: int) -> struct.Struct:
    # One precomputed format per count, so a header's offsets decode in one C call.
    return struct.Struct(f">{count}Q")


def checked_count(name: str, value: object, low: int, high: int | None = None) -> int:
    """Return ``value``, a count the caller gave: an ``int`` from ``low`` to ``high``
    (no upper bound when ``None``).

    Raises:
        TypeError: ``value`` is not an ``int`` (a ``bool`` is not one here).
        ValueError: ``value`` is outside the bounds.
    """
    if type(value) is not int:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"{low}..{high}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def checked_seconds(name: str, value: object, *, zero: bool = False) -> float:
    """Return ``value``, a duration the caller gave, as a ``float`` of seconds: above 0
    (at least 0 with ``zero``); infinity is a duration too.

    Raises:
        TypeError: ``value`` is not a real number (a ``bool`` is not one here).
        ValueError: ``value`` is below the bound, or NaN.
    """
    # Any real number (numpy's scalars too), but a bool is no duration.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if not (seconds >= 0 if zero else seconds > 0):
        raise ValueError(f"{name} must be {'>= 0' if zero else 'positive'}, got {value!r}")
    return seconds


def check_transfer_args(channels: object, uuid: object) -> None:
    """Check what both ends are given: a channel count that the handshake's id (one
    byte) can number, and a uuid that is a :class:`uuid.UUID` or ``None``.

    Raises:
        TypeError: ``channels`` is not an int, or ``uuid`` is neither a UUID nor None.
        ValueError: ``channels`` is not from 1 to 255.
    """
    checked_count("channels", channels, 1, 255)
    if uuid is not None and not isinstance(uuid, uuid_mod.UUID):
        raise TypeError(f"uuid must be a uuid.UUID or None, got {type(uuid).__name__}")


def page_count_for(page_size: int) -> int:
    """Return how many pages fit in one packet (QEMU's ``page_count``) for ``page_size``.

    Raises:
        TypeError: ``page_size`` is not an integer (anything with ``__index__``, such as
            numpy's integers, is one; a ``bool`` is not).
        ValueError: ``page_size`` is not a power of two between 512 and
            :data:`PACKET_SIZE`.
    """
    page_size = as_integer("page_size", page_size)
    if not (512 <= page_size <= PACKET_SIZE) or page_size & (page_size - 1):
        raise ValueError(
            f"page_size must be a power of two from 512 to {PACKET_SIZE}, got {page_size}"
        )
    return PACKET_SIZE // page_size


def header_size(pages_alloc: int) -> int:
    """Return the length of a packet header with ``pages_alloc`` offset slots."""
    return HEADER_FIXED_SIZE + 8 * pages_alloc


@attrs.frozen
class Handshake:
    """``MultiFDInit_t``: the first 64 bytes of every channel.

    Attributes:
        uuid: Identifies the transfer (QEMU: the VM's uuid). Every channel of one
            transfer carries the same.
        channel_id: The channel's 0-based id.
        features: trio_multifd's features word (:class:`Feature`); 0 for QEMU.
    """

    uuid: uuid_mod.UUID
    channel_id: int
    features: int = 0


@attrs.frozen
class PacketHeader:
    """``MultiFDPacket_t``: the header in front of every packet's payload.

    Attributes:
        flags: The flags word (:class:`Flag` bits and the compression field).
        pages_alloc: Offset slots in the header (QEMU's ``page_count``, 128 for 4 KiB).
        normal_pages: Pages whose data follows in the payload.
        next_packet_size: Payload bytes after the header.
        packet_num: The sender's global packet sequence number.
        zero_pages: Pages that are all zero (no data sent); their offsets follow the
            normal pages' offsets.
        block_name: The RAM block the pages belong to ("" on early SYNC packets).
        offsets: ``normal_pages + zero_pages`` byte offsets into the block, the normal
            pages' first.
        header_checksum: xxh3-64 of the header (with :attr:`Flag.CHECKSUMS`), else 0.
        payload_checksum: xxh3-64 of the payload (with :attr:`Flag.CHECKSUMS`), else 0.
    """

    flags: int
    pages_alloc: int
    normal_pages: int
    next_packet_size: int
    packet_num: int
    zero_pages: int = 0
    block_name: str = ""
    offsets: tuple[int, ...] = ()
    header_checksum: int = 0
    payload_checksum: int = 0

    @property
    def compression(self) -> int:
        """The compression field, ``flags & COMPRESSION_MASK``."""
        return self.flags & COMPRESSION_MASK

    @property
    def is_sync(self) -> bool:
        """Whether the packet carries :attr:`Flag.SYNC`."""
        return bool(self.flags & _SYNC)

    @property
    def carries_pages(self) -> bool:
        """Whether the packet names any page (normal or zero)."""
        return self.normal_pages + self.zero_pages > 0


def encode_handshake(handshake: Handshake) -> bytes:
    """Return the 64 wire bytes of ``handshake``.

    Raises:
        ValueError: The channel id does not fit a byte or the features word 64 bits.
        TypeError: The uuid is not a :class:`uuid.UUID`, or the channel id or the
            features word not an integer.
    """
    if not isinstance(handshake.uuid, uuid_mod.UUID):
        raise TypeError(f"uuid must be a uuid.UUID, got {type(handshake.uuid).__name__}")
    channel_id = _checked_uint("channel_id", handshake.channel_id, 0xFF)
    features = _checked_uint("features", handshake.features, _U64_MAX)
    return _HANDSHAKE.pack(MAGIC, VERSION, handshake.uuid.bytes, channel_id, features, 0, 0, 0)


def as_integer(name: str, value: object) -> int:
    """Return ``value`` as an ``int``: anything with ``__index__`` (numpy's integers)
    qualifies, floats and bools do not.

    Checked here rather than left to struct or to arithmetic: their errors say neither
    which field nor that it is the caller's mistake, and attrs classes check no types.

    Raises:
        TypeError: ``value`` is not an integer, or is a ``bool``; the message names
            ``name``.
    """
    if value.__class__ is bool:
        # A bool has __index__, but False would silently stand for 0 (a page, a count).
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None


def _checked_uint(name: str, value: object, limit: int) -> int:
    number = as_integer(name, value)
    if not 0 <= number <= limit:
        raise ValueError(f"{name} must be 0..{limit}, got {number}")
    return number


def decode_handshake(
    data: bytes | bytearray | memoryview,
    *,
    channels: int,
    uuid: uuid_mod.UUID | None = None,
) -> Handshake:
    """Decode and check the 64 bytes of a channel's handshake.

    Args:
        data: Exactly :data:`HANDSHAKE_SIZE` bytes.
        channels: The receiver's channel count; the id must be below it.
        uuid: The transfer's uuid, or ``None`` to accept any.

    Raises:
        MagicError: The magic is wrong.
        VersionError: The version is not 1.
        UUIDMismatchError: The uuid differs from ``uuid``.
        ChannelIdError: The id is not below ``channels``.
        ValueError: ``data`` is not 64 bytes long.

    Each :class:`~trio_multifd.ProtocolError` but :class:`~trio_multifd.MagicError` has
    ``channel`` set to the id byte as received; a wrong magic means the bytes are not a
    handshake, so ``channel`` is ``None``.
    """
    if len(data) != HANDSHAKE_SIZE:
        raise ValueError(f"a handshake is {HANDSHAKE_SIZE} bytes, got {len(data)}")
    magic, version, raw_uuid, channel_id, features, _, _, _ = _HANDSHAKE.unpack(data)
    if magic != MAGIC:
        # Not a multifd handshake at all (a port scanner, an HTTP client): its 25th byte
        # names no channel. 0x16 0x03 opens a TLS record carrying a ClientHello.
        tls = magic >> 16 == 0x1603
        hint = " (a TLS ClientHello: the sender uses TLS, this receiver does not)" if tls else ""
        raise MagicError(
            f"handshake magic is {magic:#010x}, expected {MAGIC:#010x}{hint}",
            field="magic",
            value=magic,
            limit=MAGIC,
        )
    if version != VERSION:
        raise VersionError(
            f"handshake version is {version}, expected {VERSION}",
            field="version",
            value=version,
            limit=VERSION,
            channel=channel_id,
        )
    peer_uuid = uuid_mod.UUID(bytes=raw_uuid)
    if uuid is not None and peer_uuid != uuid:
        raise UUIDMismatchError(
            f"handshake uuid is {peer_uuid}, expected {uuid}",
            field="uuid",
            value=peer_uuid,
            limit=uuid,
            channel=channel_id,
        )
    if channel_id >= channels:
        raise ChannelIdError(
            f"handshake channel id is {channel_id}, must be below the channel count {channels}",
            field="id",
            value=channel_id,
            limit=channels,
            channel=channel_id,
        )
    return Handshake(uuid=peer_uuid, channel_id=channel_id, features=features)


def encode_packet_header(header: PacketHeader, *, page_size: int | None = None) -> bytes:
    """Return the wire bytes of ``header``: ``header_size(header.pages_alloc)`` bytes.

    Offset slots past ``normal_pages + zero_pages`` are zero.

    Args:
        header: The header to encode.
        page_size: The transfer's page size: when given, every offset must be a multiple
            of it. A header carries no page size, so without it alignment is not checked
            (tests of a receiver's checks encode misaligned offsets on purpose).

    Raises:
        ValueError: A count does not fit its field or ``pages_alloc``, an offset does
            not fit 64 bits or is not a multiple of ``page_size``, ``page_size`` is not
            a valid page size (see :func:`page_count_for`), the block name is longer
            than 255 bytes of UTF-8 or contains NUL, or the number of offsets differs
            from ``normal_pages + zero_pages``.
        TypeError: A count, an offset or ``page_size`` is not an integer, the offsets
            not a sequence, or the block name not a str.
    """
    counts = {
        name: _checked_uint(name, getattr(header, name), _U32_MAX)
        for name in ("flags", "pages_alloc", "normal_pages", "next_packet_size", "zero_pages")
    }
    counts.update(
        (name, _checked_uint(name, getattr(header, name), _U64_MAX))
        for name in ("packet_num", "header_checksum", "payload_checksum")
    )
    used = counts["normal_pages"] + counts["zero_pages"]
    if used > counts["pages_alloc"]:
        raise ValueError(
            f"normal_pages + zero_pages = {used} exceeds pages_alloc {counts['pages_alloc']}"
        )
    try:
        given = len(header.offsets)
    except TypeError:
        raise TypeError(
            f"offsets must be a sequence of integers, got {type(header.offsets).__name__}"
        ) from None
    if given != used:
        raise ValueError(f"{given} offsets given for {used} pages")
    offsets = [_checked_uint("an offset", offset, _U64_MAX) for offset in header.offsets]
    if page_size is not None:
        page_size = as_integer("page_size", page_size)
        page_count_for(page_size)
        misaligned = next((offset for offset in offsets if offset % page_size), None)
        if misaligned is not None:
            raise ValueError(f"offset {misaligned} is not a multiple of page_size {page_size}")
    if not isinstance(header.block_name, str):
        raise TypeError(f"block_name must be a str, got {type(header.block_name).__name__}")
    raw_name = header.block_name.encode()
    if len(raw_name) >= BLOCK_NAME_SIZE or b"\0" in raw_name:
        raise ValueError(f"block name must be at most 255 bytes without NUL: {raw_name!r}")
    return pack_packet_header(raw_name=raw_name, offsets=offsets, **counts)


@functools.cache
def _header_struct(used: int, pages_alloc: int) -> struct.Struct:
    # The whole header in one pack: fixed part, used offset slots, zeroed free slots.
    return struct.Struct(f"{_HEADER.format}{used}Q{8 * (pages_alloc - used)}x")


def pack_packet_header(
    *,
    flags: int,
    pages_alloc: int,
    normal_pages: int,
    next_packet_size: int,
    packet_num: int,
    zero_pages: int,
    raw_name: bytes,
    offsets: Sequence[int],
    header_checksum: int = 0,
    payload_checksum: int = 0,
) -> bytes:
    """Return a packet header's wire bytes from values the caller has checked.

    The sender's hot path: :func:`encode_packet_header` checks a :class:`PacketHeader`
    and calls this; the sender builds its values itself and skips the object.

    Raises:
        struct.error: A value does not fit its field.
    """
    return _header_struct(len(offsets), pages_alloc).pack(
        MAGIC,
        VERSION,
        flags,
        pages_alloc,
        normal_pages,
        next_packet_size,
        packet_num,
        zero_pages,
        0,
        header_checksum,
        payload_checksum,
        0,
        raw_name,
        *offsets,
    )


_MAGIC_BYTES = MAGIC.to_bytes(4, "big")


def check_header_start(start: bytes | bytearray | memoryview) -> None:
    """Check the first bytes of a packet header that is still arriving: raise at once
    when they cannot start one, rather than wait for the rest.

    A stream out of step (bytes inserted or lost between the ends) otherwise holds a
    receiver inside a garbage "header" until the sender writes enough to fill it, which
    a sender that waits between rounds may not do for a long time.

    Raises:
        MagicError: ``start`` (up to its first four bytes) is not the magic's beginning.
    """
    size = min(len(start), len(_MAGIC_BYTES))
    if start[:size] == _MAGIC_BYTES[:size]:
        return
    got = bytes(start[:size])
    raise MagicError(
        f"packet header starts with 0x{got.hex()}, not the magic {MAGIC:#010x}: the"
        " stream is out of step (bytes inserted or lost between the ends?), seen in the"
        " header's first bytes, before the rest arrived",
        field="magic",
        value=int.from_bytes(got, "big"),
        limit=MAGIC,
    )


def decode_packet_header(
    data: bytes | bytearray | memoryview, *, page_count: int, channel: int | None = None
) -> PacketHeader:
    """Decode and check a packet header.

    Checks everything that does not need the receiver's blocks or method: magic,
    version, flags (no unknown bits, no device state), ``pages_alloc <= page_count``,
    ``normal_pages <= pages_alloc``, ``zero_pages <= pages_alloc - normal_pages`` and a
    NUL-terminated UTF-8 block name. Allocates nothing in proportion to a claimed size.

    Args:
        data: At least ``header_size(page_count)`` bytes (the connection's header length).
        page_count: The receiver's offset slots per packet (see :func:`page_count_for`).
        channel: Named in any exception raised.

    Raises:
        MagicError: The magic is wrong.
        VersionError: The version is not 1.
        FlagsError: Unknown bits or ``DEVICE_STATE`` in the flags.
        PageCountError: A page count is out of range.
        BlockNameError: The block name is not NUL-terminated UTF-8.
        ValueError: ``data`` is shorter than the header.
    """
    if len(data) < header_size(page_count):
        raise ValueError(f"a header is {header_size(page_count)} bytes, got {len(data)}")
    (
        magic,
        version,
        flags,
        pages_alloc,
        normal_pages,
        next_packet_size,
        packet_num,
        zero_pages,
        _,
        header_checksum,
        payload_checksum,
        _,
        raw_name,
    ) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MagicError(
            f"packet magic is {magic:#010x}, expected {MAGIC:#010x}",
            field="magic",
            value=magic,
            limit=MAGIC,
            channel=channel,
        )
    if version != VERSION:
        raise VersionError(
            f"packet version is {version}, expected {VERSION}",
            field="version",
            value=version,
            limit=VERSION,
            channel=channel,
            packet_num=packet_num,
        )
    if flags & _DEVICE_STATE:
        raise FlagsError(
            f"flags {flags:#x} carry DEVICE_STATE (0x40): device-state packets are not supported",
            field="flags",
            value=flags,
            limit=_KNOWN_FLAGS,
            channel=channel,
            packet_num=packet_num,
        )
    if flags & ~_KNOWN_FLAGS:
        raise FlagsError(
            f"flags {flags:#x} carry unknown bits {flags & ~_KNOWN_FLAGS:#x}",
            field="flags",
            value=flags,
            limit=_KNOWN_FLAGS,
            channel=channel,
            packet_num=packet_num,
        )
    if pages_alloc > page_count:
        raise PageCountError(
            f"pages_alloc is {pages_alloc}, more than the {page_count} slots per packet",
            field="pages_alloc",
            value=pages_alloc,
            limit=page_count,
            channel=channel,
            packet_num=packet_num,
        )
    if normal_pages > pages_alloc:
        raise PageCountError(
            f"normal_pages is {normal_pages}, more than pages_alloc {pages_alloc}",
            field="normal_pages",
            value=normal_pages,
            limit=pages_alloc,
            channel=channel,
            packet_num=packet_num,
        )
    if zero_pages > pages_alloc - normal_pages:
        raise PageCountError(
            f"zero_pages is {zero_pages}, more than pages_alloc - normal_pages"
            f" = {pages_alloc - normal_pages}",
            field="zero_pages",
            value=zero_pages,
            limit=pages_alloc - normal_pages,
            channel=channel,
            packet_num=packet_num,
        )
    end = raw_name.find(b"\0")
    if end < 0:
        raise BlockNameError(
            "ramblock is not NUL-terminated within 256 bytes",
            field="ramblock",
            value=raw_name[:32],
            limit=BLOCK_NAME_SIZE - 1,
            channel=channel,
            packet_num=packet_num,
        )
    try:
        block_name = raw_name[:end].decode()
    except UnicodeDecodeError:
        raise BlockNameError(
            f"ramblock {raw_name[:end]!r} is not valid UTF-8",
            field="ramblock",
            value=raw_name[:end],
            channel=channel,
            packet_num=packet_num,
        ) from None
    used = normal_pages + zero_pages
    offsets = _offsets_struct(used).unpack_from(data, HEADER_FIXED_SIZE) if used else ()
    return PacketHeader(
        flags=flags,
        pages_alloc=pages_alloc,
        normal_pages=normal_pages,
        next_packet_size=next_packet_size,
        packet_num=packet_num,
        zero_pages=zero_pages,
        block_name=block_name,
        offsets=offsets,
        header_checksum=header_checksum,
        payload_checksum=payload_checksum,
    )


def chain_start(handshake: bytes | bytearray | memoryview) -> int:
    """Return the seed of a channel's first header checksum: the xxh3-64 of its 64-byte
    handshake (so the chain is bound to the transfer's uuid and the channel's id).

    Args:
        handshake: The channel's encoded handshake, as sent.

    Returns:
        The seed, an unsigned 64-bit integer.
    """
    return xxhash.xxh3_64_intdigest(handshake)


def header_checksum(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """Return the xxh3-64 of a packet header as trio_multifd's integrity mode defines it:
    the whole header with its own checksum field (offset 40, 8 bytes) read as zero,
    seeded with the channel's previous header checksum (:func:`chain_start` for the
    first packet), so that a packet lost, repeated or moved breaks the chain.

    Args:
        data: The encoded header (its checksum field may hold anything).
        seed: The channel's previous header checksum, or its :func:`chain_start`.

    Returns:
        The checksum, an unsigned 64-bit integer.
    """
    digest = xxhash.xxh3_64(data[:_CHECKSUM_AT], seed=seed)
    digest.update(_ZERO_CHECKSUM)
    digest.update(data[_CHECKSUM_AT + 8 :])
    return digest.intdigest()


def payload_checksum(parts: Iterable[bytes | bytearray | memoryview]) -> int:
    """Return the xxh3-64 of a payload given as consecutive parts.

    Args:
        parts: The payload's bytes in order, in any number of pieces.

    Returns:
        The checksum, an unsigned 64-bit integer: the header's ``payload_checksum``.
    """
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(part)
    return digest.intdigest()


def stored_header_checksum(data: bytes | bytearray | memoryview) -> int:
    """Return the header checksum a header carries (offset 40)."""
    return int.from_bytes(data[_CHECKSUM_AT : _CHECKSUM_AT + 8], "big")


def seal_header(data: bytes, seed: int = 0) -> bytes:
    """Return an encoded header with its header checksum written at offset 40.

    Args:
        data: The encoded header.
        seed: As for :func:`header_checksum`.

    Returns:
        A copy of ``data`` with the checksum in place.
    """
    checksum = header_checksum(data, seed)
    return data[:_CHECKSUM_AT] + checksum.to_bytes(8, "big") + data[_CHECKSUM_AT + 8 :]
