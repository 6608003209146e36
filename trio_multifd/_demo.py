"""The demo: decode a recorded QEMU multifd channel with the codec."""

from __future__ import annotations

from ._errors import ProtocolError
from ._wire import HANDSHAKE_SIZE, decode_handshake, decode_packet_header, header_size


def decode_capture(path: str, *, page_count: int = 128) -> int:
    """Print the handshake and every packet header of a channel capture; return 0."""
    with open(path, "rb") as f:
        data = f.read()
    handshake = decode_handshake(data[:HANDSHAKE_SIZE], channels=256)
    print(f"handshake: uuid {handshake.uuid}, channel {handshake.channel_id}")
    size = header_size(page_count)
    pos, pages = HANDSHAKE_SIZE, 0
    while pos + size <= len(data):
        try:
            header = decode_packet_header(data[pos : pos + size], page_count=page_count)
        except ProtocolError as exc:
            print(f"at byte {pos}: {exc}")
            return 1
        payload = header.next_packet_size if header.normal_pages else 0
        if pos + size + payload > len(data):
            break
        pages += header.normal_pages
        print(
            f"packet {header.packet_num}: flags {header.flags:#x}, {header.normal_pages} pages"
            f" of {header.block_name!r}, {payload} payload bytes"
        )
        pos += size + payload
    print(f"{pages} pages in whole packets; {len(data) - pos} bytes of a truncated packet")
    return 0
