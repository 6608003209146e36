"""Live pre-copy: move buffers that keep changing, in rounds, until the rest is small.

QEMU migrates a running guest with iterative rounds: round 1 sends all of RAM, each later
round resends the pages dirtied during the one before, and once the dirty set would take
less than ``downtime-limit`` to send, the guest is paused and a last stop-and-copy round
sends the remainder. Here the same loop drives a :class:`~trio_multifd.Sender`:

- a :class:`DirtyTracker` knows which pages changed: from the application's marks (a
  byte per page behind a lock, swapped out atomically at each collection) and, opt-in,
  from a comparison of per-page hashes with the previous scan;
- :func:`precopy` runs the rounds, a SYNC after each, and decides when to stop;
- :func:`receive_precopy` follows the rounds on the receiving side and learns which one is
  final from the ``FINAL_ROUND`` flag on its SYNC packets (``Receiver.final_round``), which
  the channel tasks record even while the application lags behind.

Dirty sets travel as bitmaps (one byte per page): marks set bytes, a union is one big-int
OR, and the page offsets are produced with :func:`itertools.compress` at C speed, a slice
at a time so the Trio thread is never held for long.
"""

from __future__ import annotations

import inspect
import itertools
import math
import threading
import time
import weakref
from array import array
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import SupportsIndex, final

import attrs
import trio
import xxhash

from ._block import RAMBlock, index_of, make_present
from ._errors import PrecopyAbortedError, TransferIncompleteError
from ._receiver import Receiver
from ._sender import Sender
from ._supervisor import interrupt_in
from ._wire import checked_count, checked_seconds

__all__ = ["DirtyTracker", "PrecopyReport", "PrecopyRound", "precopy", "receive_precopy"]

_DETECT_MODES = ("marks", "hash")

# xxhash releases the GIL only for inputs above ~100 KiB (measured: a 64 KiB input keeps
# a concurrent thread at half speed on 2 cores, 128 KiB does not). A scan therefore hashes
# groups of pages of at least this size first, GIL released, and hashes the single pages
# of a group (GIL held, ~0.6 us each) only when the group's hash changed.
_GROUP_BYTES = 256 * 1024

# Longest stretch of one scan chunk in its worker thread. While the chunk holds the GIL
# (per-page hashing of changed groups) the Trio thread waits for it, so this bounds the
# Trio thread's stall; a chunk returns to Trio after it even when more is left.
_CHUNK_SECONDS = 0.001

# Pages turned from a bitmap into offsets per step on the Trio thread (~0.5 ms).
_OFFSETS_STEP = 1 << 15

RoundCallback = Callable[["PrecopyRound"], Awaitable[None] | None]
"""``on_round(round)``: a plain function or a coroutine function."""


@final
@attrs.frozen
class PrecopyRound:
    """The figures of one pre-copy round.

    Attributes:
        number: The SYNC round's number (what ``Sender.sync()`` / ``Receiver.sync()``
            returned for it).
        pages: Pages sent (received) in the round, zero pages included.
        bytes: Page bytes of the round: ``pages x page_size`` (zero pages count in full,
            as in QEMU's accounting; the wire bytes are in the transfer's stats).
        seconds: Sender: from queueing the round's first page to its ``sync()``
            returning. Receiver: from the previous round's completion to this one's (for
            round 1, from the first channel's handshake), as the channel tasks saw them,
            however late :func:`receive_precopy` asks.
        dirty_after: Sender: pages found dirty when the round ended (``0`` for the final
            round, whose writers are stopped). ``None`` on the receiver.
        expected_downtime: Sender: the seconds a stop-and-copy right after this round
            would take, ``dirty_after x page_size / (bytes / seconds)``; ``0.0`` for the
            final round. ``None`` on the receiver.
        final: Whether this is the final (stop-and-copy) round.
    """

    number: int
    pages: int
    bytes: int
    seconds: float
    dirty_after: int | None
    expected_downtime: float | None
    final: bool


@final
@attrs.frozen
class PrecopyReport:
    """What :func:`precopy` did.

    Attributes:
        converged: A round's ``expected_downtime`` came within ``downtime_limit``.
        completed: The final round was sent: the receiver holds every page as it was when
            ``on_stop`` returned. ``False`` only when ``force_stop=False`` gave up.
        rounds: Every round, the final one last (when ``completed``).
        downtime: Seconds from ``on_stop()`` returning to the final ``sync()`` returning
            (the last collection included); ``None`` when not completed.
        stop_seconds: Seconds ``on_stop()`` took; ``None`` when it was not called.
        total_bytes: Page bytes over all rounds.
        seconds: Seconds :func:`precopy` took, from its call to its return.
    """

    converged: bool
    completed: bool
    rounds: tuple[PrecopyRound, ...]
    downtime: float | None
    stop_seconds: float | None
    total_bytes: int
    seconds: float


@final
class _HashState:
    """The hashes of one block at its previous scan: per group of pages and per page."""

    __slots__ = ("group_pages", "groups", "pages")

    def __init__(self, block: RAMBlock) -> None:
        self.group_pages = max(1, _GROUP_BYTES // block.page_size)
        group_count = -(-block.page_count // self.group_pages)
        self.groups = array("Q", bytes(8 * group_count))
        self.pages = array("Q", bytes(8 * block.page_count))


@final
class DirtyTracker:
    """Which pages of a set of blocks changed since the last collection.

    The application calls :meth:`mark` after each write (from any thread); with
    ``detect="hash"`` pages are also compared with their content at the previous scan,
    so writes nobody marks are found too. :meth:`collect` hands over the dirty pages and
    starts a new period.

    Only marks are exact. Hash detection misses a page that was written and then written
    back to the content it had at the previous scan (an "ABA" write, e.g. a page zeroed,
    used and zeroed again), and the rare 64-bit hash collision.

    Args:
        blocks: The blocks to track, all with the same page size and distinct names.
        detect: ``"marks"`` (only :meth:`mark` makes a page dirty) or ``"hash"`` (marks,
            plus an xxh3-64 hash per page compared at each :meth:`collect`; costs a scan
            of every block per collection, in worker threads).

    Raises:
        TypeError: A block is not a :class:`~trio_multifd.RAMBlock`, or ``detect`` is
            not a string.
        ValueError: No blocks, two blocks with one name, mixed page sizes, or an unknown
            ``detect``.

    Attributes:
        detect: ``"marks"`` or ``"hash"``, as given.
        page_size: The blocks' page size.
    """

    def __init__(self, blocks: Iterable[RAMBlock], *, detect: str = "marks") -> None:
        blocks = tuple(blocks)
        for block in blocks:
            if not isinstance(block, RAMBlock):
                raise TypeError(f"blocks must be RAMBlock, got {type(block).__name__}")
        if not blocks:
            raise ValueError("a DirtyTracker needs at least one block")
        if len({b.name for b in blocks}) != len(blocks):
            raise ValueError("two tracked blocks share a name")
        if len({b.page_size for b in blocks}) != 1:
            raise ValueError("tracked blocks must all have the same page size")
        if not isinstance(detect, str):
            raise TypeError(f"detect must be a str, got {type(detect).__name__}")
        if detect not in _DETECT_MODES:
            raise ValueError(f"detect must be one of {_DETECT_MODES}, got {detect!r}")
        self._blocks = blocks
        self._index = {block: i for i, block in enumerate(blocks)}
        self.detect = detect
        self.page_size = blocks[0].page_size
        # The lock makes "look up the bitmap, set its bytes" one step against the swap
        # in collect(): a mark lands wholly in the period before or after a collection.
        self._lock = threading.Lock()
        self._maps = [bytearray(b.page_count) for b in blocks]
        self._hashes = [_HashState(b) for b in blocks] if detect == "hash" else None
        self._scanned = False
        self._collecting = False
        self._limiter = trio.CapacityLimiter(1)

    @property
    def blocks(self) -> tuple[RAMBlock, ...]:
        """The tracked blocks, in the order given."""
        return self._blocks

    def mark(
        self, block: RAMBlock, offset: SupportsIndex, length: SupportsIndex | None = None
    ) -> None:
        """Mark the pages of ``block`` that overlap ``[offset, offset + length)`` dirty.

        Call it after the write, never before: a mark made before its write may be
        collected, and the page sent, before the write happens. Thread-safe and cheap
        (a byte per page behind a lock), so writers in other threads may call it. A mark
        made while a round is in flight belongs to the next collection.

        Args:
            block: One of the tracked blocks.
            offset: The first byte written.
            length: How many bytes were written; ``None`` (the default) for one page
                of :attr:`page_size` bytes.

        Raises:
            TypeError: ``block`` is not a :class:`~trio_multifd.RAMBlock`, or
                ``offset``/``length`` is not an integer (anything with ``__index__``,
                such as numpy's integers, is one; a ``bool`` is not).
            ValueError: ``block`` is not tracked, or the range is empty or not inside it.
        """
        if not isinstance(block, RAMBlock):
            raise TypeError(f"block must be a RAMBlock, got {type(block).__name__}")
        index = self._index.get(block)
        if index is None:
            raise ValueError(f"block {block.name!r} is not tracked by this DirtyTracker")
        # Not a fixed 4096: with smaller pages that marked the neighbours too, and was
        # refused for the last 4 KiB of a block.
        if length is None:
            length = self.page_size
        # As Sender.queue_page: numpy's integers are integers, a bool is not (True
        # would silently mark from byte 1).
        try:
            offset, length = index_of(offset), index_of(length)
        except TypeError:
            raise TypeError(
                f"offset and length must be integers (not bool), got"
                f" {type(offset).__name__} and {type(length).__name__}"
            ) from None
        if offset < 0 or length < 1 or offset + length > block.size:
            raise ValueError(
                f"block {block.name!r}: range [{offset}, {offset + length}) is empty or not"
                f" inside [0, {block.size})"
            )
        first = offset // self.page_size
        last = (offset + length - 1) // self.page_size
        with self._lock:
            bitmap = self._maps[index]
            if first == last:
                bitmap[first] = 1
            else:
                bitmap[first : last + 1] = b"\x01" * (last + 1 - first)

    async def collect(self) -> dict[RAMBlock, list[int]]:
        """Hand over the pages dirtied since the previous collection, and start anew.

        The mark bitmaps are swapped for empty ones atomically, before the first
        checkpoint: a mark made later, even during this call, belongs to the next
        collection. With ``detect="hash"``, every block is then scanned (in worker
        threads, a chunk of at most ~1 ms at a time) and pages whose hash differs from
        the previous scan's are added; the first scan reports every page.

        Returns:
            Every tracked block, in order, with the byte offsets of its dirty pages in
            ascending order (empty when none).

        A collection that is cancelled hands nothing over: its pages stay dirty for the
        next one.

        Raises:
            RuntimeError: Another :meth:`collect` of this tracker is running.
        """
        if self._collecting:
            raise RuntimeError("another collect() of this DirtyTracker is running")
        # Held until the offsets are listed too, not only while the bitmaps are taken:
        # that listing has checkpoints of its own, where a second collect() used to get in.
        self._collecting = True
        try:
            maps = await self._collect_maps()
            try:
                result: dict[RAMBlock, list[int]] = {}
                for block, bitmap in zip(self._blocks, maps, strict=True):
                    result[block] = await _offsets(bitmap, block.page_size)
                return result
            except BaseException:
                self._give_back(maps)
                raise
        finally:
            self._collecting = False

    async def _collect_maps(self) -> list[bytearray]:
        with self._lock:
            maps = self._maps
            self._maps = [bytearray(b.page_count) for b in self._blocks]
        try:
            if self._hashes is not None:
                first = not self._scanned
                for block, state, bitmap in zip(self._blocks, self._hashes, maps, strict=True):
                    await self._scan(block, state, bitmap, first=first)
                self._scanned = True
            await trio.lowlevel.checkpoint()
        except BaseException:
            self._give_back(maps)
            raise
        return maps

    def _give_back(self, maps: list[bytearray]) -> None:
        """Return the pages of a collection that was cancelled (or failed) to the next
        one: nobody received them, and a page collected is a page the caller must send.
        A cancelled hash scan has already stored the new hashes of the pages it found
        changed, so those pages are only known from ``maps`` now."""
        with self._lock:
            self._maps = [_union(taken, now) for taken, now in zip(maps, self._maps, strict=True)]

    async def _scan(
        self, block: RAMBlock, state: _HashState, bitmap: bytearray, *, first: bool
    ) -> None:
        group = 0
        while group < len(state.groups):
            group = await trio.to_thread.run_sync(
                _scan_chunk, block, state, bitmap, group, first, limiter=self._limiter
            )


def _scan_chunk(
    block: RAMBlock, state: _HashState, bitmap: bytearray, group: int, first: bool
) -> int:
    """Scan groups from ``group`` on for about ``_CHUNK_SECONDS``; return where to resume.

    A group is compared as a whole first (one hash, GIL released); only a changed group's
    pages are hashed one by one. The group's hash is taken before its pages' hashes, so a
    write racing with the scan leaves the stored group hash stale and the next scan looks
    at the pages again, rather than the other way round.
    """
    view = block.view
    size = block.page_size
    page_count = block.page_count
    groups, pages, per_group = state.groups, state.pages, state.group_pages
    digest = xxhash.xxh3_64_intdigest
    deadline = time.perf_counter() + _CHUNK_SECONDS
    clock = time.perf_counter
    while group < len(groups):
        start = group * per_group
        stop = min(start + per_group, page_count)
        # A block over a file that was cut short: an error, not a SIGBUS.
        make_present(block, [(start * size, (stop - start) * size)], write=False)
        value = digest(view[start * size : stop * size])
        if first or value != groups[group]:
            groups[group] = value
            for page in range(start, stop):
                value = digest(view[page * size : (page + 1) * size])
                if first or value != pages[page]:
                    pages[page] = value
                    bitmap[page] = 1
        group += 1
        if clock() >= deadline:
            break
    return group


async def _offsets(bitmap: bytearray, page_size: int) -> list[int]:
    """The byte offsets of the set bytes of ``bitmap``, a slice at a time."""
    result: list[int] = []
    for start in range(0, len(bitmap), _OFFSETS_STEP):
        part = bitmap[start : start + _OFFSETS_STEP]
        if part.count(0) != len(part):
            offsets = range(start * page_size, (start + len(part)) * page_size, page_size)
            result.extend(itertools.compress(offsets, part))
        await trio.lowlevel.checkpoint()
    return result


def _union(a: bytearray, b: bytearray) -> bytearray:
    # One big-int OR: C speed over the whole bitmap (bytes are 0 or 1, so OR is union).
    if not a.count(1):
        return b
    value = int.from_bytes(a, "little") | int.from_bytes(b, "little")
    return bytearray(value.to_bytes(len(a), "little"))


async def _call(callback: Callable[..., Awaitable[None] | None] | None, *args: object) -> None:
    """Call a plain function or a coroutine function alike."""
    if callback is None:
        return
    result = callback(*args)
    if inspect.isawaitable(result):
        await result


async def precopy(
    sender: Sender,
    tracker: DirtyTracker,
    *,
    on_stop: Callable[[], Awaitable[None] | None],
    downtime_limit: float = 0.3,
    max_rounds: int = 30,
    force_stop: bool = True,
    on_round: RoundCallback | None = None,
) -> PrecopyReport:
    """Migrate ``tracker.blocks`` while the application keeps writing to them.

    Round 1 sends every page (all-zero pages as zero pages); each later round sends the
    pages dirtied since the round before; a SYNC follows every round. Pages left queued
    with no SYNC after them (by an earlier call that was cancelled, or by the
    application) get a SYNC round of their own first, which is not in the report but
    which :func:`receive_precopy` reports as an ordinary round. After each round
    the expected downtime is ``dirty pages x page_size / rate``, the rate being the
    round's page bytes over its seconds (its ``sync()`` included). Once it is within
    ``downtime_limit`` (converged), ``await on_stop()``, collect once more, send the union
    of every page still dirty, and end with a SYNC marked ``FINAL_ROUND``. The writers
    are never resumed: that is the application's business.

    If ``max_rounds`` is reached without converging: with ``force_stop`` the application
    is stopped anyway and the final round sent (``converged=False``, ``completed=True``);
    without it ``on_stop`` is not called, no final round is sent, and the report says
    ``completed=False``. Leaving the sender's ``async with`` then tells the receiver, whose
    :func:`receive_precopy` raises :class:`~trio_multifd.PrecopyAbortedError`.

    Args:
        sender: An open sender; its page size must be the tracker's.
        tracker: What changes, and how to find out.
        on_stop: ``on_stop()``: stop the writers; a coroutine function or a plain
            function. When it returns, no further write may happen and every write so far
            must be marked (``detect="marks"``).
        downtime_limit: Seconds of stop-and-copy the application accepts.
        max_rounds: Most rounds, the final one included; ``1`` is plain stop-and-copy.
        force_stop: Stop the application at ``max_rounds`` even without convergence.
        on_round: Called with each round's :class:`PrecopyRound` once its figures are
            known (before the next round starts, so it may throttle writers); a plain
            function or a coroutine function.

    Returns:
        The report.

    Raises:
        TypeError: ``sender``, ``tracker``, ``on_stop`` or ``on_round`` is of the wrong
            type, ``max_rounds`` is not an int, or ``downtime_limit`` not a real
            number.
        ValueError: A negative ``downtime_limit``, a bad ``max_rounds``
            (``max_rounds=1`` with ``force_stop=False`` too: it would give up before
            sending anything), or the tracker's page size differs from the sender's.
        MultiFDError: The transfer failed (raised by the sender).
    """
    if not isinstance(sender, Sender):
        raise TypeError(f"sender must be a Sender, got {type(sender).__name__}")
    if not isinstance(tracker, DirtyTracker):
        raise TypeError(f"tracker must be a DirtyTracker, got {type(tracker).__name__}")
    if not callable(on_stop):
        raise TypeError("on_stop must be a function")
    _check_on_round(on_round)
    checked_count("max_rounds", max_rounds, 1)
    if max_rounds == 1 and not force_stop:
        # No round before the final one, so nothing could converge: it would give up
        # before sending a page, and the receiver would see an abandoned migration.
        raise ValueError(
            "max_rounds=1 is plain stop-and-copy, which needs force_stop=True: without it"
            " the migration would give up before sending anything"
        )
    checked_seconds("downtime_limit", downtime_limit, zero=True)
    if tracker.page_size != sender.page_size:
        raise ValueError(
            f"the tracker's page size {tracker.page_size} differs from the sender's"
            f" {sender.page_size}"
        )
    started = time.perf_counter()
    if sender.unsynced_pages:
        # Pages queued with no SYNC after them (by an earlier call that was cancelled, or
        # by the application) would share round 1, whose packets on other channels land
        # in any order: such a page's older copy could land last, and no later round
        # would send it again. Their own round first.
        await sender.sync()
    # Marks made before round 1 are covered by it; with hashes, this is the baseline.
    await tracker._collect_maps()
    pending: list[bytearray] | None = None  # None: every page (round 1)
    rounds: list[PrecopyRound] = []
    converged = False
    while len(rounds) < max_rounds - 1:
        number, pages, seconds = await _send_round(sender, tracker, pending, final=False)
        pending = await tracker._collect_maps()
        dirty = sum(bitmap.count(1) for bitmap in pending)
        page_bytes = pages * tracker.page_size
        info = PrecopyRound(
            number=number,
            pages=pages,
            bytes=page_bytes,
            seconds=seconds,
            dirty_after=dirty,
            expected_downtime=_expected(dirty * tracker.page_size, page_bytes, seconds),
            final=False,
        )
        rounds.append(info)
        await _call(on_round, info)
        if info.expected_downtime is not None and info.expected_downtime <= downtime_limit:
            converged = True
            break
    if not converged and not force_stop:
        return PrecopyReport(
            converged=False,
            completed=False,
            rounds=tuple(rounds),
            downtime=None,
            stop_seconds=None,
            total_bytes=sum(r.bytes for r in rounds),
            seconds=time.perf_counter() - started,
        )
    stopping = time.perf_counter()
    await _call(on_stop)
    stopped = time.perf_counter()
    # Marks (and writes, for hashes) made up to on_stop's return are in this collection.
    last = await tracker._collect_maps()
    if pending is not None:
        pending = [_union(a, b) for a, b in zip(pending, last, strict=True)]
    number, pages, seconds = await _send_round(sender, tracker, pending, final=True)
    finished = time.perf_counter()
    info = PrecopyRound(
        number=number,
        pages=pages,
        bytes=pages * tracker.page_size,
        seconds=seconds,
        dirty_after=0,
        expected_downtime=0.0,
        final=True,
    )
    rounds.append(info)
    await _call(on_round, info)
    return PrecopyReport(
        converged=converged,
        completed=True,
        rounds=tuple(rounds),
        downtime=finished - stopped,
        stop_seconds=stopped - stopping,
        total_bytes=sum(r.bytes for r in rounds),
        seconds=time.perf_counter() - started,
    )


def _check_on_round(on_round: object) -> None:
    # Up front: called only once a round is on the wire, a bad one would fail the
    # migration half-way.
    if on_round is not None and not callable(on_round):
        raise TypeError(f"on_round must be a function or None, got {type(on_round).__name__}")


def _expected(dirty_bytes: int, page_bytes: int, seconds: float) -> float:
    if not dirty_bytes:
        return 0.0
    if not page_bytes or seconds <= 0:
        return math.inf  # no rate measured: cannot promise anything
    return dirty_bytes / (page_bytes / seconds)


async def _send_round(
    sender: Sender, tracker: DirtyTracker, dirty: list[bytearray] | None, *, final: bool
) -> tuple[int, int, float]:
    """Queue a round's pages and sync; return (round number, pages, seconds)."""
    started = time.perf_counter()
    pages = 0
    size = tracker.page_size
    for index, block in enumerate(tracker.blocks):
        if dirty is None:
            offsets: Iterable[int] = range(0, block.size, size)
            count = block.page_count
        else:
            offsets = await _offsets(dirty[index], size)
            count = len(offsets)
        if count:
            await sender.queue_pages(block, offsets)
            pages += count
    number = await sender.sync(final_round=final)
    return number, pages, time.perf_counter() - started


async def receive_precopy(
    receiver: Receiver, *, on_round: RoundCallback | None = None
) -> PrecopyRound:
    """Follow a pre-copy migration's rounds until the final one is complete.

    Calls ``receiver.sync()`` itself from a helper task, which records each round's
    figures as soon as the round completes, so a slow ``on_round`` delays only the
    callbacks. The final round is known from its SYNC packets' ``FINAL_ROUND`` flag,
    which the channel tasks record even while this side lags behind. Do not call
    ``receiver.sync()`` concurrently; a second call of this function for the same
    receiver while one runs raises ``RuntimeError``. A call that is cancelled, or whose
    ``on_round`` raises, loses no round: the next call delivers first what it did not
    (the round whose callback raised, again). After it returns, the target holds every
    page as it was when the sender's ``on_stop`` returned; ``await
    receiver.wait_closed()`` before leaving the receiver, so the sender's exit gets its
    delivery confirmation.

    The receiver's figures are those the channel tasks recorded when each round
    completed (:meth:`Receiver.round_figures`): a round's pages are exactly those its
    packets brought, also when this side lags rounds behind (up to 4096 rounds; the
    figures of older rounds are no longer kept and read 0 pages in 0 s).

    Args:
        receiver: An open receiver whose sender runs :func:`precopy`.
        on_round: Called with each round's :class:`PrecopyRound` (``dirty_after`` and
            ``expected_downtime`` are ``None`` here), the final one included; a plain
            function or a coroutine function. If the sender gives up, its closing round
            is reported as an ordinary round before the error.

    Returns:
        The final round's figures.

    Raises:
        TypeError: ``receiver`` is not a :class:`~trio_multifd.Receiver`, or
            ``on_round`` is neither a function nor ``None``.
        PrecopyAbortedError: Every channel ended without a final round: the sender gave
            up (``force_stop=False``) or closed without running :func:`precopy` to its end.
            Known only once the channels end, when the sender leaves its block, not
            when :func:`precopy` gives up (bound the wait with ``trio.move_on_after``
            and call again; see :doc:`precopy`).
        RuntimeError: The receiver's ``async with`` block is over (see
            :meth:`~trio_multifd.Receiver.sync`), or another call for this receiver is
            running.
    """
    if not isinstance(receiver, Receiver):
        raise TypeError(f"receiver must be a Receiver, got {type(receiver).__name__}")
    _check_on_round(on_round)
    follower = _FOLLOWERS.get(receiver)
    if follower is None:
        follower = _FOLLOWERS[receiver] = _Follower()
    return await follower.follow(receiver, on_round)


@attrs.define(eq=False)
class _Follower:
    """What :func:`receive_precopy` knows of a receiver's rounds between its calls: the
    rounds recorded and not yet delivered (their ``on_round`` has not returned). A call
    that is cancelled or whose callback raises leaves them here for the next call, which
    delivers them before it waits for more."""

    # Not the receiver itself: a value that refers to its weak key keeps it alive.
    backlog: deque[PrecopyRound] = attrs.Factory(deque)
    following: bool = False

    async def follow(self, receiver: Receiver, on_round: RoundCallback | None) -> PrecopyRound:
        if self.following:
            # Two would share the receiver's sync() calls: each would see only some of
            # the rounds, and either could take the final one from the other.
            raise RuntimeError("another receive_precopy() of this receiver is running")
        self.following = True
        try:
            return await self._follow(receiver, on_round)
        finally:
            self.following = False

    async def _follow(self, receiver: Receiver, on_round: RoundCallback | None) -> PrecopyRound:
        backlog = self.backlog
        changed = trio.lowlevel.ParkingLot()
        ended: list[Exception] = []

        async def record() -> None:
            # Rounds are recorded as soon as they complete, so a slow on_round delays only
            # the callbacks; no sync() beyond the final round, so the receiver's round
            # counter is not consumed beyond it.
            while not (backlog and backlog[-1].final):
                try:
                    number = await receiver.sync()
                except Exception as exc:  # TransferIncompleteError, or the block is over
                    ended.append(exc)
                    changed.unpark_all()
                    return
                # Taken by the channel tasks at the round's completion, however late
                # this side asks; known right after sync() returned the round.
                # None only for a follower more than 4096 rounds behind, whose oldest
                # rounds' figures the receiver no longer keeps.
                pages, seconds = receiver.round_figures(number) or (0, 0.0)
                backlog.append(
                    PrecopyRound(
                        number=number,
                        pages=pages,
                        bytes=pages * receiver.page_size,
                        seconds=seconds,
                        dirty_after=None,
                        expected_downtime=None,
                        final=receiver.is_final_round(number),
                    )
                )
                changed.unpark_all()

        outcome: PrecopyRound | None = None
        error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(record)
                try:
                    while outcome is None:
                        while not backlog and not ended:
                            await changed.park()
                        if not backlog:
                            break
                        await _call(on_round, backlog[0])
                        item = backlog.popleft()
                        if item.final:
                            outcome = item
                except trio.Cancelled:
                    raise
                except BaseException as exc:
                    # The callback's own exception (KeyboardInterrupt included), raised as
                    # it is, not inside a group.
                    error = exc
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # A KeyboardInterrupt that Trio's SIGINT handler raised in record() leaves
            # bare too, as one from the callback does.
            error = interrupt_in(group)
            if error is None:
                raise
        if error is not None:
            try:
                raise error
            finally:
                # This frame is in its traceback: holding it would make a reference cycle.
                del error
        if outcome is not None:
            return outcome
        if not isinstance(ended[0], TransferIncompleteError):
            # Taken out of the list: this frame, in the traceback, holds the list.
            raise ended.pop()
        # The receiver cannot tell a sender that gave up from one that left its block
        # early or died after a SYNC: each ends every channel cleanly after a round.
        raise PrecopyAbortedError(
            f"every channel ended after round {receiver.rounds_completed} without a final"
            " pre-copy round: the sender gave up (force_stop=False), or left or died"
            " before precopy() finished"
        ) from ended.pop()


_FOLLOWERS: weakref.WeakKeyDictionary[Receiver, _Follower] = weakref.WeakKeyDictionary()
