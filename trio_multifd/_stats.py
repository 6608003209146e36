"""Transfer counters, per channel and in total."""

from __future__ import annotations

from typing import final

import attrs

__all__ = ["ChannelStats", "TransferStats"]


@final
@attrs.define
class ChannelStats:
    """Counters of one channel.

    Attributes:
        packets: Packets sent or received, SYNC packets included.
        normal_pages: Pages whose data crossed the wire.
        zero_pages: Pages sent as zero pages (offset only).
        page_bytes: Bytes of page data moved, zero pages included.
        bytes: Bytes on the wire: handshake, headers and payloads.
        syncs: SYNC packets.
    """

    packets: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    page_bytes: int = 0
    bytes: int = 0
    syncs: int = 0

    @property
    def pages(self) -> int:
        """Pages moved, normal and zero."""
        return self.normal_pages + self.zero_pages


@final
@attrs.define
class TransferStats:
    """Counters of a transfer: one :class:`ChannelStats` per channel, and their sums.

    Attributes:
        channels: The per-channel counters, indexed by channel id.
        rounds: SYNC rounds completed.
    """

    channels: list[ChannelStats]
    rounds: int = 0

    @classmethod
    def for_channels(cls, count: int) -> TransferStats:
        """Return zeroed counters for ``count`` channels."""
        return cls([ChannelStats() for _ in range(count)])

    @property
    def packets(self) -> int:
        """Packets over all channels."""
        return sum(c.packets for c in self.channels)

    @property
    def normal_pages(self) -> int:
        """Normal pages over all channels."""
        return sum(c.normal_pages for c in self.channels)

    @property
    def zero_pages(self) -> int:
        """Zero pages over all channels."""
        return sum(c.zero_pages for c in self.channels)

    @property
    def pages(self) -> int:
        """Pages over all channels, normal and zero."""
        return sum(c.pages for c in self.channels)

    @property
    def page_bytes(self) -> int:
        """Bytes of page data over all channels."""
        return sum(c.page_bytes for c in self.channels)

    @property
    def bytes(self) -> int:
        """Wire bytes over all channels."""
        return sum(c.bytes for c in self.channels)
