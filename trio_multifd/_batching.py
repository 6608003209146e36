"""The sender's packet batching as plain state: which pages form each packet.

What this module decides, from the application's queue calls and the worker threads'
takes: which offsets are valid pages of a block, how pages queued a few at a time gather
into whole packets, which offsets form the next packet carved off the queued batches, how
many queued pages no channel has taken yet (the backpressure limit), and when every
channel has taken, and written, its SYNC packet of a round. No Trio, no threads: the
sender holds the locks, does the waiting and the waking.
"""

from __future__ import annotations

import collections
import functools
import operator
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Generic, SupportsIndex, TypeVar

import attrs

from ._block import index_of
from ._pages import PageBatch

if TYPE_CHECKING:
    from ._block import RAMBlock

__all__ = ["JobLine", "PacketGatherer", "SyncTokens", "checked_offsets"]


def checked_offsets(block: RAMBlock, offsets: Iterable[SupportsIndex]) -> Sequence[int]:
    """Return ``offsets`` as a sequence of page offsets of ``block``, each checked.

    A ``range`` is checked by its ends and step and returned as it is (O(1) however many
    pages it covers); other offsets are copied into a list of plain ints (numpy's
    integers become ints) and checked in one go, so the caller may reuse its own list.

    Raises:
        ValueError: An offset is not a page-aligned offset in the block, or a range's
            step is not a multiple of the page size.
        TypeError: An offset is not an integer.
    """
    page_size = block.page_size
    if isinstance(offsets, range):
        if offsets:
            if offsets.step % page_size:
                raise ValueError(
                    f"block {block.name!r}: a range step of {offsets.step} is not a"
                    f" multiple of the page size {page_size}"
                )
            block.check_offset(offsets[0])
            block.check_offset(offsets[-1])
        return offsets
    chunk = list(map(index_of, offsets))
    if chunk:
        # min, max and one OR of them all run at C speed; only a bad chunk is searched
        # for the offset to name.
        last = block.size - page_size
        aligned = not functools.reduce(operator.or_, chunk) % page_size
        if min(chunk) < 0 or max(chunk) > last or not aligned:
            block.check_offset(next(o for o in chunk if o < 0 or o > last or o % page_size))
    return chunk


@attrs.define(eq=False)
class PacketGatherer:
    """Pages queued a few at a time, gathered into whole packets of ``page_count`` pages.

    A packet holds the pages of one block: pages of another block send those gathered
    so far as a packet of their own, and so does the end of a round.
    """

    page_count: int
    unsynced: int = attrs.field(default=0, init=False)
    """Pages added since the last :meth:`end_round`: no SYNC round covers them yet."""
    _block: RAMBlock | None = attrs.field(default=None, init=False)
    _pending: list[int] = attrs.field(factory=list, init=False)

    def add(self, block: RAMBlock, offsets: Sequence[int]) -> tuple[PageBatch, ...] | None:
        """Add pages of ``block``; return the batches now ready to queue, in order.

        ``None`` when the pages only joined a packet begun by an earlier call and did not
        fill it; an empty tuple when nothing is ready otherwise (the pages begin a
        packet, or there were none).
        """
        self.unsynced += len(offsets)
        flushed = self._flush() if self._block is not block else None
        self._block = block
        count = self.page_count
        pending = self._pending
        if pending:
            # Top up the pages gathered before to a full packet first.
            room = count - len(pending)
            pending.extend(offsets[:room])
            if len(pending) < count:
                return None
            offsets = offsets[room:]
            flushed = self._flush()
        whole = len(offsets) - len(offsets) % count
        self._pending.extend(offsets[whole:])
        if whole:
            # A list slice is a copy: the caller may reuse its list.
            batch = PageBatch(block, offsets[:whole])
            return (flushed, batch) if flushed is not None else (batch,)
        return () if flushed is None else (flushed,)

    def end_round(self) -> tuple[PageBatch, ...]:
        """The pages gathered so far, as a batch to queue before a SYNC round (none if
        there are none); every page added before is covered by that round."""
        self.unsynced = 0
        flushed = self._flush()
        return () if flushed is None else (flushed,)

    def _flush(self) -> PageBatch | None:
        if not self._pending:
            return None
        assert self._block is not None
        batch = PageBatch(self._block, self._pending)
        self._pending = []
        return batch


@attrs.define(eq=False, kw_only=True)
class SyncTokens:
    """A SYNC round's place in a :class:`JobLine`: every channel takes one token and
    writes one SYNC packet."""

    untaken: int
    """Channels that have not yet taken the round (each takes it exactly once)."""
    remaining: int
    """Channels whose SYNC packet is not written yet."""

    def write(self, channels: int) -> bool:
        """Record the SYNC packets of ``channels`` channels as written; return whether
        they were the round's last."""
        self.remaining -= channels
        return not self.remaining


Round = TypeVar("Round", bound=SyncTokens)


@attrs.define(eq=False)
class JobLine(Generic[Round]):
    """The worker threads' work in queueing order: page batches and SYNC rounds.

    A taker carves a packet of at most ``page_count`` pages off the batch at the head,
    which leaves the line with its last page, or takes a SYNC round's tokens, one per
    channel it serves, and the round leaves once every channel has taken its token. The
    queue has room while at most ``limit`` queued pages are not yet taken.
    """

    page_count: int
    limit: int
    queued: int = attrs.field(default=0, init=False)
    """Pages queued and not yet carved off."""
    _jobs: collections.deque[PageBatch | Round] = attrs.field(
        factory=collections.deque, init=False
    )
    # Pages of the head batch already carved off.
    _taken: int = attrs.field(default=0, init=False)

    @property
    def has_jobs(self) -> bool:
        """Whether anything is left to take."""
        return bool(self._jobs)

    @property
    def has_room(self) -> bool:
        """Whether at most ``limit`` queued pages are not yet taken."""
        return self.queued <= self.limit

    def put(self, job: PageBatch | Round) -> None:
        """Append a batch or a round."""
        self._jobs.append(job)
        if isinstance(job, PageBatch):
            self.queued += len(job.offsets)

    def take(self, channels: int) -> PageBatch | Round | None:
        """Carve the next packet's pages or, for a taker that serves ``channels``
        channels, take that many of a SYNC round's tokens; ``None`` if the line is
        empty."""
        # Per packet of a worker thread: C-level operations only, besides PageBatch.
        jobs = self._jobs
        if not jobs:
            return None
        head = jobs[0]
        if isinstance(head, PageBatch):
            start = self._taken
            self._taken += self.page_count
            job = PageBatch(head.block, head.offsets[start : self._taken])
            if self._taken >= len(head.offsets):
                jobs.popleft()
                self._taken = 0
            self.queued -= len(job.offsets)
            return job
        head.untaken -= channels
        assert head.untaken >= 0, "a taker took a SYNC round's tokens twice"
        if not head.untaken:
            jobs.popleft()
        return head
