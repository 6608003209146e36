"""The receiver's SYNC barrier as plain state, QEMU's ``sem_sync`` without the semaphores.

A round is complete once every channel has reached its SYNC packet: then every page
queued before the sender's ``sync()`` is in place. What this module decides, from each
channel's SYNC packets, pages and end of stream: which round a SYNC closes, whether that
completes it, whether it was marked final on every channel, and when a channel's end
(or a SYNC after another channel's end) means a round can never complete. No Trio, no
threads: the receiver calls it and does the waking.
"""

from __future__ import annotations

from typing import final

import attrs

from ._errors import TransferIncompleteError

__all__ = ["RoundBarrier"]


@final
@attrs.define(eq=False)
class RoundBarrier:
    """Which SYNC rounds are complete on a transfer's ``channels`` channels."""

    channels: int
    completed: int = 0
    """The highest round complete on every channel."""
    final_rounds: set[int] = attrs.Factory(set)
    """Every complete round that every channel's SYNC marked final: several migrations
    may share the channels, and a lagging follower must still find its own."""
    completed_pages: int = 0
    """The pages of round :attr:`completed`: every channel's pages before its SYNC of it."""
    _synced: list[int] = attrs.field(init=False)
    # Pages each channel has received since its last SYNC.
    _open_pages: list[int] = attrs.field(init=False)
    # Ended channels and the last round each reached.
    _ended: dict[int, int] = attrs.Factory(dict)
    # How many channels marked each incomplete round final.
    _final_marks: dict[int, int] = attrs.Factory(dict)
    # The pages each incomplete round has from the channels that reached its SYNC.
    _round_pages: dict[int, int] = attrs.Factory(dict)

    def __attrs_post_init__(self) -> None:
        self._synced = [0] * self.channels
        self._open_pages = [0] * self.channels

    @property
    def all_ended(self) -> bool:
        """Whether every channel's stream has ended."""
        return len(self._ended) == self.channels

    def count_pages(self, channel: int, pages: int) -> None:
        """Record ``pages`` received on ``channel`` since its last SYNC."""
        self._open_pages[channel] += pages

    def arrive(self, channel: int, *, final_round: bool) -> tuple[int, bool]:
        """Record ``channel``'s next SYNC; return its round's number and whether this
        SYNC completed it.

        Raises:
            TransferIncompleteError: Another channel ended before this round.
        """
        number = self._synced[channel] + 1
        self._synced[channel] = number
        self._round_pages[number] = self._round_pages.get(number, 0) + self._open_pages[channel]
        self._open_pages[channel] = 0
        for other, last in self._ended.items():
            if last < number:
                raise TransferIncompleteError(
                    f"reached SYNC {number}, but channel {other} ended after round {last}"
                )
        if final_round:
            self._final_marks[number] = self._final_marks.get(number, 0) + 1
        if sum(1 for synced in self._synced if synced >= number) < self.channels:
            return number, False
        if self._final_marks.pop(number, 0) == self.channels:
            self.final_rounds.add(number)
        self.completed = number
        self.completed_pages = self._round_pages.pop(number)
        return number, True

    def end(self, channel: int) -> int:
        """Record the end of ``channel``'s stream; return the last round it reached.

        Raises:
            TransferIncompleteError: Pages came after its last SYNC, or another channel
                waits at a later SYNC: a round that can never complete.
        """
        last = self._synced[channel]
        if self._open_pages[channel]:
            raise TransferIncompleteError(
                f"stream ended with {self._open_pages[channel]} pages after its last SYNC"
                f" (round {last + 1} never completed)"
            )
        waiting = [c for c, synced in enumerate(self._synced) if synced > last]
        if waiting:
            raise TransferIncompleteError(
                f"stream ended after round {last} while channel {waiting[0]} waits at SYNC"
                f" {self._synced[waiting[0]]}"
            )
        self._ended[channel] = last
        return last
