"""The sans-I/O codec: handshake and packet header, against the spec and real QEMU bytes."""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import trio_multifd as m
from trio_multifd import _wire

from . import captures

PAGE_COUNT = 128
HEADER = m.header_size(PAGE_COUNT)
UUID = uuid.UUID("12345678-1234-5678-1234-567812345678")


def handshake_bytes(**fields: int | bytes) -> bytearray:
    values = {"magic": m.MAGIC, "version": m.VERSION, "uuid": UUID.bytes, "id": 0}
    values.update(fields)
    return bytearray(
        struct.pack(">II16sB", values["magic"], values["version"], values["uuid"], values["id"])
        + bytes(39)
    )


def header_bytes(**fields: int | bytes) -> bytearray:
    header = m.PacketHeader(
        flags=0,
        pages_alloc=PAGE_COUNT,
        normal_pages=2,
        next_packet_size=8192,
        packet_num=7,
        block_name="pc.ram",
        offsets=(0, 4096),
    )
    data = bytearray(m.encode_packet_header(header))
    layout = {
        "magic": (">I", 0),
        "version": (">I", 4),
        "flags": (">I", 8),
        "pages_alloc": (">I", 12),
        "normal_pages": (">I", 16),
        "next_packet_size": (">I", 20),
        "packet_num": (">Q", 24),
        "zero_pages": (">I", 32),
    }
    for name, value in fields.items():
        if name == "ramblock":
            assert isinstance(value, bytes)
            data[64:320] = value.ljust(256, b"\0")[:256]
        else:
            fmt, at = layout[name]
            struct.pack_into(fmt, data, at, value)
    return data


def decode(data: bytes | bytearray) -> m.PacketHeader:
    return m.decode_packet_header(data, page_count=PAGE_COUNT, channel=3)


# -- sizes and layout -------------------------------------------------------------------


def test_sizes_match_qemu_structures() -> None:
    assert m.HANDSHAKE_SIZE == 64
    assert m.header_size(128) == 1344
    assert m.page_count_for(4096) == 128
    assert m.page_count_for(65536) == 8


@pytest.mark.parametrize("page_size", [0, 256, 3000, 4097, 1024 * 1024])
def test_page_count_rejects_bad_page_sizes(page_size: int) -> None:
    with pytest.raises(ValueError, match="page_size"):
        m.page_count_for(page_size)


@pytest.mark.parametrize("page_size", [4096.0, "4096", True])
def test_page_count_names_a_page_size_of_the_wrong_type_with_a_type_error(
    page_size: object,
) -> None:
    with pytest.raises(TypeError, match="page_size must be an integer"):
        m.page_count_for(page_size)  # type: ignore[arg-type]


def test_handshake_layout_is_big_endian_with_id_at_24() -> None:
    data = m.encode_handshake(m.Handshake(uuid=UUID, channel_id=5, features=1))
    assert data[:8] == bytes.fromhex("1122334400000001")
    assert data[8:24] == UUID.bytes
    assert data[24] == 5
    assert data[25:32] == bytes(7)
    assert data[32:40] == (1).to_bytes(8, "big")
    assert data[40:] == bytes(24)


def test_header_layout_puts_zero_pages_at_32_and_offsets_at_320() -> None:
    header = m.PacketHeader(
        flags=m.Flag.SYNC | m.Flag.ZSTD,
        pages_alloc=4,
        normal_pages=1,
        next_packet_size=77,
        packet_num=2**40,
        zero_pages=2,
        block_name="mem",
        offsets=(8192, 0, 4096),
    )
    data = m.encode_packet_header(header)
    assert len(data) == m.header_size(4)
    assert struct.unpack_from(">IIIIIIQI", data) == (
        m.MAGIC,
        1,
        0x5,
        4,
        1,
        77,
        2**40,
        2,
    )
    assert data[64:68] == b"mem\0"
    assert struct.unpack_from(">4Q", data, 320) == (8192, 0, 4096, 0)


# -- round trips -------------------------------------------------------------------------

names = st.text(min_size=0, max_size=80).filter(lambda s: "\0" not in s and len(s.encode()) < 256)


@given(
    raw_uuid=st.binary(min_size=16, max_size=16),
    channel_id=st.integers(0, 255),
    features=st.integers(0, 2**64 - 1),
)
def test_handshake_round_trips(raw_uuid: bytes, channel_id: int, features: int) -> None:
    handshake = m.Handshake(
        uuid=uuid.UUID(bytes=raw_uuid), channel_id=channel_id, features=features
    )
    data = m.encode_handshake(handshake)
    assert len(data) == 64
    assert m.decode_handshake(data, channels=256) == handshake


@st.composite
def headers(draw: st.DrawFn) -> m.PacketHeader:
    pages_alloc = draw(st.integers(0, PAGE_COUNT))
    normal = draw(st.integers(0, pages_alloc))
    zero = draw(st.integers(0, pages_alloc - normal))
    compression = draw(st.sampled_from(list(m.Compression)))
    extra = draw(st.sampled_from([0, m.Flag.SYNC, m.Flag.CHECKSUMS, m.Flag.FINAL_ROUND]))
    return m.PacketHeader(
        flags=int(compression) | int(extra),
        pages_alloc=pages_alloc,
        normal_pages=normal,
        next_packet_size=draw(st.integers(0, 2**32 - 1)),
        packet_num=draw(st.integers(0, 2**64 - 1)),
        zero_pages=zero,
        block_name=draw(names),
        offsets=tuple(
            draw(
                st.lists(st.integers(0, 2**64 - 1), min_size=normal + zero, max_size=normal + zero)
            )
        ),
        header_checksum=draw(st.integers(0, 2**64 - 1)),
        payload_checksum=draw(st.integers(0, 2**64 - 1)),
    )


@given(header=headers())
def test_packet_header_round_trips(header: m.PacketHeader) -> None:
    data = m.encode_packet_header(header)
    assert len(data) == m.header_size(header.pages_alloc)
    padded = data + bytes(m.header_size(PAGE_COUNT) - len(data))
    assert m.decode_packet_header(padded, page_count=PAGE_COUNT) == header


# -- handshake validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "error", "field"),
    [
        ({"magic": 0x11223345}, m.MagicError, "magic"),
        ({"version": 2}, m.VersionError, "version"),
        ({"uuid": bytes(16)}, m.UUIDMismatchError, "uuid"),
        ({"id": 4}, m.ChannelIdError, "id"),
        ({"id": 200}, m.ChannelIdError, "id"),
    ],
)
def test_bad_handshake_field_raises_its_own_error(
    fields: dict[str, int | bytes], error: type[m.ProtocolError], field: str
) -> None:
    with pytest.raises(error) as info:
        m.decode_handshake(handshake_bytes(**fields), channels=4, uuid=UUID)
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, m.ProtocolError)


def test_a_handshake_error_names_the_id_byte_as_its_channel_unless_the_magic_is_wrong() -> None:
    with pytest.raises(m.VersionError) as bad_version:
        m.decode_handshake(handshake_bytes(version=2, id=3), channels=4, uuid=UUID)
    assert bad_version.value.channel == 3
    assert str(bad_version.value).startswith("channel 3: ")
    # Not a multifd peer at all: its 25th byte is no channel id.
    with pytest.raises(m.MagicError) as bad_magic:
        m.decode_handshake(handshake_bytes(magic=0x47455420, id=3), channels=4, uuid=UUID)
    assert bad_magic.value.channel is None
    assert str(bad_magic.value) == "handshake magic is 0x47455420, expected 0x11223344"


def test_channel_id_equal_to_channel_count_is_rejected() -> None:
    # QEMU checks `id > channels`; id == channels is out of range too.
    with pytest.raises(m.ChannelIdError, match="below the channel count 4"):
        m.decode_handshake(handshake_bytes(id=4), channels=4)


def test_handshake_without_expected_uuid_accepts_any() -> None:
    handshake = m.decode_handshake(handshake_bytes(id=3), channels=4)
    assert handshake.uuid == UUID
    assert handshake.channel_id == 3


def test_short_handshake_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        m.decode_handshake(bytes(63), channels=1)


def test_short_packet_header_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="a header is 1344 bytes, got 1343"):
        m.decode_packet_header(bytes(1343), page_count=128)


# -- packet header validation --------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "error", "field"),
    [
        ({"magic": 0}, m.MagicError, "magic"),
        ({"version": 0}, m.VersionError, "version"),
        ({"pages_alloc": 129}, m.PageCountError, "pages_alloc"),
        ({"pages_alloc": 2**32 - 1}, m.PageCountError, "pages_alloc"),
        ({"normal_pages": 129}, m.PageCountError, "normal_pages"),
        ({"zero_pages": 127}, m.PageCountError, "zero_pages"),
        ({"flags": 0x40}, m.FlagsError, "flags"),
        ({"flags": 0x100}, m.FlagsError, "flags"),
        ({"ramblock": b"x" * 256}, m.BlockNameError, "ramblock"),
        ({"ramblock": b"\xff\xfe"}, m.BlockNameError, "ramblock"),
    ],
)
def test_bad_header_field_raises_its_own_error(
    fields: dict[str, int | bytes], error: type[m.ProtocolError], field: str
) -> None:
    with pytest.raises(error) as info:
        decode(header_bytes(**fields))
    assert info.value.field == field
    assert info.value.channel == 3
    assert str(info.value).startswith("channel 3")


@pytest.mark.parametrize("size", [1, 2, 3, 4, 100])
def test_the_start_of_a_header_still_arriving_is_checked_against_the_magic(size: int) -> None:
    start = bytearray(struct.pack(">I", m.MAGIC) + bytes(96))[:size]
    _wire.check_header_start(start)  # a real header's start passes, however short
    start[min(size, 4) - 1] ^= 0x80
    with pytest.raises(m.MagicError) as info:
        _wire.check_header_start(start)
    assert info.value.field == "magic"
    assert f"starts with 0x{bytes(start[:4]).hex()}, not the magic" in str(info.value)
    assert "out of step" in str(info.value)


def test_normal_pages_beyond_smaller_pages_alloc_is_rejected() -> None:
    with pytest.raises(m.PageCountError, match="normal_pages is 3, more than pages_alloc 2"):
        decode(header_bytes(pages_alloc=2, normal_pages=3))


def test_device_state_flag_is_named_in_the_error() -> None:
    with pytest.raises(m.FlagsError, match="DEVICE_STATE"):
        decode(header_bytes(flags=0x41))


def test_error_names_value_and_limit() -> None:
    with pytest.raises(m.PageCountError) as info:
        decode(header_bytes(pages_alloc=1000))
    assert (info.value.value, info.value.limit) == (1000, 128)
    assert "1000" in str(info.value) and "128" in str(info.value)


def test_huge_claimed_counts_allocate_nothing() -> None:
    # A header claiming 4 billion offsets is rejected on the counts alone.
    with pytest.raises(m.PageCountError):
        decode(header_bytes(pages_alloc=2**32 - 1, normal_pages=2**32 - 1))


def test_unused_offset_slots_are_not_decoded() -> None:
    data = header_bytes(normal_pages=1)
    struct.pack_into(">Q", data, 328, 0xDEAD000)  # a stale second slot
    assert decode(data).offsets == (0,)


# -- encoder misuse ------------------------------------------------------------------------


def _header_fields(changes: dict[str, object]) -> dict[str, object]:
    # A valid header's fields (two pages at 0 and 4096), with ``changes`` applied.
    fields: dict[str, object] = {
        "flags": 0,
        "pages_alloc": 4,
        "normal_pages": 2,
        "next_packet_size": 0,
        "packet_num": 0,
        "block_name": "b",
        "offsets": (0, 4096),
    }
    fields.update(changes)
    return fields


@pytest.mark.parametrize(
    "changes",
    [
        {"block_name": "x" * 256},
        {"block_name": "a\0b"},
        {"normal_pages": 3},
        {"offsets": (0,)},
        {"pages_alloc": 1},
        {"packet_num": -1},
        {"flags": 2**32},
        {"offsets": (0, 2**64)},
    ],
)
def test_encoder_rejects_bad_inputs(changes: dict[str, object]) -> None:
    fields = _header_fields(changes)
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        m.encode_packet_header(m.PacketHeader(**fields))  # type: ignore[arg-type]


def test_header_encoder_given_the_page_size_rejects_an_offset_not_a_multiple_of_it() -> None:
    header = m.PacketHeader(**_header_fields({"offsets": (0, 6144)}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="offset 6144 is not a multiple of page_size 4096"):
        m.encode_packet_header(header, page_size=4096)
    # The same offsets are whole pages of 2 KiB.
    assert m.encode_packet_header(header, page_size=2048) == m.encode_packet_header(header)


def test_header_encoder_rejects_an_invalid_page_size() -> None:
    header = m.PacketHeader(**_header_fields({}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="page_size"):
        m.encode_packet_header(header, page_size=3000)


def test_encoder_rejects_channel_id_beyond_a_byte() -> None:
    with pytest.raises(ValueError, match="channel_id"):
        m.encode_handshake(m.Handshake(uuid=UUID, channel_id=256))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"flags": 1.0}, "flags"),
        ({"packet_num": "1"}, "packet_num"),
        ({"offsets": (0, 4096.0)}, "offset"),
        ({"block_name": b"b"}, "block_name"),
        ({"offsets": 4096}, "offsets"),
        # A bool has __index__, but True is no page count and False no offset.
        ({"normal_pages": True}, "normal_pages must be an integer, got bool"),
        ({"offsets": (False, 4096)}, "an offset must be an integer, got bool"),
    ],
)
def test_header_encoder_names_a_field_of_the_wrong_type_with_a_type_error(
    changes: dict[str, object], field: str
) -> None:
    fields = _header_fields(changes)
    with pytest.raises(TypeError, match=field):
        m.encode_packet_header(m.PacketHeader(**fields))  # type: ignore[arg-type]


@pytest.mark.parametrize("page_size", [4096.0, "4096"])
def test_header_encoder_names_a_page_size_of_the_wrong_type_with_a_type_error(
    page_size: object,
) -> None:
    header = m.PacketHeader(**_header_fields({}))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="page_size must be an integer"):
        m.encode_packet_header(header, page_size=page_size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"uuid": str(UUID), "channel_id": 0}, "uuid"),
        ({"uuid": UUID, "channel_id": 1.0}, "channel_id"),
        ({"uuid": UUID, "channel_id": 0, "features": "1"}, "features"),
    ],
)
def test_handshake_encoder_names_a_field_of_the_wrong_type_with_a_type_error(
    fields: dict[str, object], field: str
) -> None:
    with pytest.raises(TypeError, match=field):
        m.encode_handshake(m.Handshake(**fields))  # type: ignore[arg-type]


# -- fuzzing -------------------------------------------------------------------------------

_VALID = bytes(header_bytes())


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(min_size=HEADER, max_size=HEADER),
        st.lists(
            st.tuples(st.integers(0, HEADER - 1), st.integers(0, 255)), min_size=1, max_size=8
        ).map(lambda edits: _mutate(_VALID, edits)),
    )
)
def test_decoder_raises_only_protocol_errors_on_garbage(data: bytes) -> None:
    try:
        header = decode(data)
    except m.ProtocolError:
        return
    assert header.normal_pages + header.zero_pages <= header.pages_alloc <= PAGE_COUNT
    assert len(header.offsets) == header.normal_pages + header.zero_pages


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for at, value in edits:
        out[at] = value
    return bytes(out)


@settings(max_examples=2000, deadline=None)
@given(data=st.binary(min_size=64, max_size=64))
def test_handshake_decoder_raises_only_protocol_errors_on_garbage(data: bytes) -> None:
    try:
        handshake = m.decode_handshake(data, channels=8, uuid=UUID)
    except m.ProtocolError:
        return
    assert handshake.uuid == UUID and handshake.channel_id < 8


# -- real QEMU 7.2 bytes -------------------------------------------------------------------


def _walk(data: bytes) -> tuple[list[tuple[m.PacketHeader, int]], int]:
    """Split a capture into (header, payload position) pairs and the truncated tail's size."""
    packets = []
    pos = m.HANDSHAKE_SIZE
    while pos + HEADER <= len(data):
        header = m.decode_packet_header(data[pos : pos + HEADER], page_count=PAGE_COUNT)
        payload = header.next_packet_size if header.normal_pages else 0
        if pos + HEADER + payload > len(data):
            break
        packets.append((header, pos + HEADER))
        pos += HEADER + payload
    return packets, len(data) - pos


def test_qemu_nocomp_capture_decodes_and_every_page_matches() -> None:
    data = captures.load("nocomp")
    ram = captures.nocomp_guest_ram()
    handshake = m.decode_handshake(data[:64], channels=2, uuid=uuid.UUID(int=0))
    assert handshake.channel_id == 0
    packets, tail = _walk(data)
    assert len(packets) == 8
    first, _ = packets[0]
    assert first.is_sync and not first.carries_pages and first.block_name == ""
    pages = 0
    for header, at in packets[1:]:
        assert header.compression == m.Compression.NONE and header.block_name == "mem"
        assert header.next_packet_size == header.normal_pages * 4096
        for i, offset in enumerate(header.offsets):
            page = data[at + i * 4096 : at + (i + 1) * 4096]
            assert page == ram[offset : offset + 4096]
            pages += 1
    assert pages == 896
    assert tail == 513472


def test_qemu_zstd_capture_headers_decode() -> None:
    data = captures.load("zstd")
    packets, tail = _walk(data)
    assert len(packets) == 32
    assert sum(h.normal_pages for h, _ in packets) == 3968
    assert all(h.compression == m.Compression.ZSTD for h, _ in packets[1:])
    assert 0 < tail < HEADER + 128 * 4096


@pytest.mark.parametrize("kind", ["nocomp", "zstd"])
def test_reencoding_qemu_headers_gives_the_same_bytes(kind: str) -> None:
    data = captures.load(kind)
    assert m.encode_handshake(m.decode_handshake(data[:64], channels=2)) == data[:64]
    packets, _ = _walk(data)
    for header, at in packets:
        assert m.encode_packet_header(header) == data[at - HEADER : at]
