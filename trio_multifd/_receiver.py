"""The receiving end: :func:`open_receiver`, :class:`Receiver` and its channel tasks.

QEMU's receive threads post ``sem_sync`` at each SYNC packet and wait on their own
semaphore until the main thread has seen every channel arrive. Here worker threads read
the packets, each for a crew of channels that join it as they connect (see
``_threads``); a channel that reaches its SYNC is parked, not read, until every channel
has reached it, so no page of round n+1 is written before every channel has finished
round n. Every state change (a round completed, a channel ended) wakes the waiters of
one parking lot (tasks) and one condition (threads), which re-check their own condition.
"""

from __future__ import annotations

import functools
import heapq
import mmap
import re
import threading
import time
import uuid as uuid_mod
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import final

import attrs
import trio

from ._block import BlockTable, RAMBlock, make_present, raise_mapping_fault
from ._errors import (
    CompressionMismatchError,
    DuplicateChannelError,
    FeatureError,
    FlagsError,
    HandshakeTimeoutError,
    IntegrityError,
    MappingError,
    MultiFDError,
    PayloadSizeError,
    ProtocolError,
    TooManyChannelsError,
    TransferIncompleteError,
    TransportError,
    TruncatedError,
)
from ._methods import Decoder, Method, get_method, method_for_flag
from ._pages import ZEROS
from ._rounds import RoundBarrier
from ._stats import ChannelStats, TransferStats
from ._supervisor import Supervisor, interrupt_in, logger, refuse_unless_cancelled
from ._threads import WorkerRun, io_thread_count, shared_slot, thread_slot
from ._transport import (
    ACCEPT_LIMIT,
    CANCEL_CHECK,
    FAILURE_SIGNAL,
    NOT_TLS,
    ReadySet,
    Transport,
    accept_into,
    clock_note,
    deadline_scope,
    lenient_tls,
    open_transport,
    peer_name,
    root_cause,
)
from ._wire import (
    HANDSHAKE_SIZE,
    Feature,
    Flag,
    PacketHeader,
    chain_start,
    check_header_start,
    check_transfer_args,
    checked_seconds,
    decode_handshake,
    decode_packet_header,
    header_checksum,
    header_size,
    page_count_for,
    payload_checksum,
    stored_header_checksum,
)

__all__ = ["Receiver", "open_receiver"]

_LENIENT_TLS = (
    "a trio.SSLStream or SSLListener made with https_compatible=True sends no"
    " close_notify when it closes: the sender could not tell the receiver's confirmation"
    " from a crash; use the default, https_compatible=False"
)

# Zero pages are written from a view: slicing the bytes would copy them each time.
_ZERO_VIEW = memoryview(ZEROS)
# The known-zero bitmap: one byte per page, 1 once the page was written.
_WRITTEN_PAGE = b"\x01"
_WRITTEN_PAGES = re.compile(b"\x01+")
# The figures of this many complete rounds are kept for round_figures() at most.
_KEPT_ROUND_FIGURES = 4096

# Plain ints for the per-packet checks: operators on enum members cost a microsecond each.
_FINAL_ROUND = int(Flag.FINAL_ROUND)
_END_OF_STREAM = int(Flag.END_OF_STREAM)
_CHECKSUMS = int(Flag.CHECKSUMS)


@attrs.define(eq=False)
class _Link:
    """A channel past its handshake, as its worker thread uses it."""

    channel: int
    transport: Transport
    decoder: Decoder | None
    stats: ChannelStats
    header: memoryview
    # The bounded buffer that compressed or checksummed payloads are read into.
    payload: memoryview | None
    # With integrity: the last header checksum, the seed of the next.
    chain: int = 0
    # The round this channel waits for at its SYNC (0: it reads packets).
    parked: int = 0
    ended: bool = False


@attrs.define(eq=False)
class _Crew:
    """The channels one worker thread serves, in and to come. The first channel to join
    runs the thread, until every channel of the crew has ended."""

    # Channels that have not ended yet, joined or to come.
    expected: set[int]
    # Joined, not yet taken in by the thread.
    joining: list[_Link] = attrs.Factory(list)
    running: bool = False
    worker: WorkerRun = attrs.Factory(WorkerRun)


@final
class Receiver:
    """The receiving end of a transfer; made by :func:`open_receiver` (one made directly
    has no channels: its methods raise :class:`RuntimeError` rather than wait for ever).

    Attributes:
        channels: The number of channels expected.
        uuid: The transfer's uuid: as given, or adopted from the first channel.
        page_size: Bytes per page (the blocks').
        stats: Counters per channel and in total (:class:`TransferStats`).
    """

    def __init__(
        self,
        blocks: Iterable[RAMBlock],
        *,
        channels: int,
        uuid: uuid_mod.UUID | None,
        compression: str,
        handshake_timeout: float | None,
        receive_timeout: float | None,
        integrity: bool,
        io_threads: int | None,
    ) -> None:
        blocks = list(blocks)
        check_transfer_args(channels, uuid)
        for name, value in (
            ("handshake_timeout", handshake_timeout),
            ("receive_timeout", receive_timeout),
        ):
            if value is not None:
                checked_seconds(name, value)
        self._method: Method = get_method(compression)
        page_size = blocks[0].page_size if blocks and isinstance(blocks[0], RAMBlock) else 4096
        self._table = BlockTable(blocks, page_size=page_size)
        self.page_size = page_size
        self._page_count = page_count_for(page_size)
        # The size of each channel's payload buffer, checked here: a method's bad bound
        # is the application's error at open, not a failure of the first channel.
        self._payload_bound = self._method.payload_bound(self._page_count * page_size)
        if type(self._payload_bound) is not int or self._payload_bound < 1:
            raise ValueError(
                f"compression method {self._method.name!r}: payload_bound"
                f"({self._page_count * page_size}) returned {self._payload_bound!r},"
                " not a positive int"
            )
        self.channels = channels
        self.uuid = uuid
        self.stats = TransferStats.for_channels(channels)
        self._handshake_timeout = handshake_timeout
        self._receive_timeout = receive_timeout
        self._integrity = bool(integrity)
        self._supervisor = Supervisor("receiver")
        self._changed = trio.lowlevel.ParkingLot()
        self._connected: set[int] = set()
        # Each channel's first header checksum seed (integrity), from its handshake.
        self._chains: dict[int, int] = {}
        # Channels whose sender announced Feature.IN_BAND_END: a bare end is its failure.
        self._in_band_end: set[int] = set()
        # Set once the receiver's async with block is over.
        self._closed = False
        self._cut_short = False
        # Every stream handed to add_channel, to refuse one handed over twice.
        self._streams: list[trio.abc.Stream] = []
        self._barrier = RoundBarrier(channels)
        self._sync_calls = 0
        # Round numbers of sync() calls that were cancelled, for the next calls to take.
        self._given_back: list[int] = []
        # (number, pages, seconds) of the complete rounds that sync() may still return,
        # in order: taken at completion, for round_figures() to answer however late it
        # is asked. Kept from the first channel's handshake, when round 1 starts. At
        # most _KEPT_ROUND_FIGURES: an application that never calls sync() must not
        # keep a tuple per round of a peer that rounds for ever.
        self._completions: deque[tuple[int, int, float]] = deque(maxlen=_KEPT_ROUND_FIGURES)
        self._last_completion: float | None = None
        # A known-zero block gets a zero page written only over a page written before.
        # A byte per page, in anonymous memory that the kernel backs only where pages
        # were written: a sparse 1 TiB file would otherwise cost 256 MiB up front.
        # Private: reading untouched shared memory would allocate it.
        self._received = {b.name: _written_bitmap(b) for b in blocks if b.zeroed}
        # Worker threads read the packets, each for a crew of channels; they wait on
        # this condition for a round to complete or a channel to join.
        self._io_threads = io_thread_count(
            io_threads, channels, compressing=self._method.compresses
        )
        self._crews = {
            slot: _Crew({c for c in range(channels) if shared_slot(c, self._io_threads) == slot})
            for slot in range(self._io_threads)
        }
        self._progress = threading.Condition()
        self._threads = trio.CapacityLimiter(channels)

    @property
    def blocks(self) -> tuple[RAMBlock, ...]:
        """The target blocks."""
        return self._table.blocks

    @property
    def rounds_completed(self) -> int:
        """How many SYNC rounds are complete on every channel."""
        return self._barrier.completed

    @property
    def final_round(self) -> int | None:
        """The number of the latest round whose SYNC packets carried ``FINAL_ROUND`` (the
        sender called ``sync(final_round=True)``), once that round is complete; else
        ``None``.

        Known as soon as the channel tasks complete the round, even when the application
        is still waiting for earlier rounds in :meth:`sync`.
        """
        return max(self._barrier.final_rounds, default=None)

    def is_final_round(self, number: int) -> bool:
        """Whether round ``number`` is complete and every channel's SYNC packet of it
        carried ``FINAL_ROUND`` (the sender called ``sync(final_round=True)``).

        Unlike :attr:`final_round`, which names only the latest such round, this answers
        for any round: several migrations may share the channels, and one that follows
        the rounds behind the others must still recognise its own final round (as
        :func:`~trio_multifd.receive_precopy` does).
        """
        return number in self._barrier.final_rounds

    def round_figures(self, number: int) -> tuple[int, float] | None:
        """The figures of round ``number``, recorded by the channel tasks when it
        completed: how many pages it brought (every channel's pages before its SYNC of
        it, zero pages included, none of a later round) and the seconds from the
        previous round's completion (for round 1, from the first channel's handshake).

        Known from the round's completion until :meth:`sync` has returned a later round
        (so a call right after ``sync()`` returned ``number`` always answers, unless the
        application lags more than 4096 rounds behind: the oldest figures go first);
        ``None`` before and after.
        """
        completions = self._completions
        if not completions or not 0 <= number - completions[0][0] < len(completions):
            return None
        _, pages, seconds = completions[number - completions[0][0]]
        return pages, seconds

    # -- waiting ------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.unpark_all()

    async def _wait_until(self, condition: Callable[[], bool]) -> None:
        self._supervisor.check_opened()
        while not condition():
            await self._changed.park()

    async def _wake_waiters_when_cut_short(self) -> None:
        # Ends only when the transfer's nursery is cancelled (a failure, an outside
        # cancel, the block's exit). Waiting tasks are woken then, not at the block's
        # exit, which waits for the block's own tasks (a shielded sync() in the
        # application's cleanup would wait for ever), also before any channel joined.
        try:
            await trio.sleep_forever()
        finally:
            self._cut_short = True
            self._notify()

    def _all_ended(self) -> bool:
        return self._barrier.all_ended

    def _stopped(self) -> bool:
        # No page arrives any more, short of a clean end: the block is over, the transfer
        # failed, or its tasks were cancelled (from outside).
        return self._closed or self._cut_short or self._supervisor.failed

    def _over(self, waiting_for: str) -> RuntimeError:
        if self._supervisor.failed:
            what = "the transfer failed"
        elif self._closed:
            what = "the receiver's block is over"
        else:
            what = "the transfer was cancelled"
        return self._supervisor.refusal(f"{what}: {waiting_for}")

    async def sync(self) -> int:
        """Wait for the next SYNC round: the lowest round that no other call has returned
        or waits for, once it is complete on every channel (at once if it already is).
        Without cancellations, the n-th call returns n.

        A call that is cancelled gives its round back: the next call waits for it.

        Returns:
            The round number.

        Raises:
            TransferIncompleteError: Every channel has ended and the round never completed.
            RuntimeError: The round did not complete and will not: the transfer failed
                or was cancelled, or the receiver's ``async with`` block is over (also
                when that happens while the call waits, shielded or not), with the
                transfer's error, when it failed, as the ``__cause__``.
        """
        if self._given_back:
            number = heapq.heappop(self._given_back)
        else:
            self._sync_calls += 1
            number = self._sync_calls
        try:
            await trio.lowlevel.checkpoint()

            def ready() -> bool:
                return self.rounds_completed >= number or self._all_ended() or self._stopped()

            await self._wait_until(ready)
        except BaseException:
            heapq.heappush(self._given_back, number)
            raise
        if self.rounds_completed >= number:
            # Rounds below every round a call may still return are asked for no more.
            keep = min(number, self._given_back[0]) if self._given_back else number
            while self._completions and self._completions[0][0] < keep:
                self._completions.popleft()
            return number
        if self._all_ended():
            raise TransferIncompleteError(
                f"round {number} cannot complete: every channel has ended after round"
                f" {self.rounds_completed}"
            )
        try:
            await refuse_unless_cancelled(self._over(f"round {number} did not complete"))
        except trio.Cancelled:
            heapq.heappush(self._given_back, number)
            raise

    async def wait_closed(self) -> None:
        """Wait until the sender has finished: every channel at a clean end of stream
        after its last SYNC, every round complete.

        Over TCP without ``integrity=True``, a sender that died right after a SYNC ends
        its channels just as cleanly, and this returns as well (see
        :func:`open_receiver`: QEMU's format has no end marker).

        Raises:
            RuntimeError: The sender did not finish and will not: the transfer failed or
                was cancelled, or the receiver's ``async with`` block is over (also when
                that happens while the call waits, shielded or not), with the transfer's
                error, when it failed, as the ``__cause__``.
        """
        await trio.lowlevel.checkpoint()
        await self._wait_until(lambda: self._all_ended() or self._stopped())
        if not self._all_ended():
            await refuse_unless_cancelled(self._over("the sender did not finish"))

    # -- channels -----------------------------------------------------------------------------

    async def add_channel(self, stream: trio.abc.Stream) -> int:
        """Read and check a channel's handshake, then start its receive task.

        From the call on, the receiver owns ``stream`` and closes it on any error or
        cancellation, handshake included. A bad handshake fails the whole transfer (as in
        QEMU) and is also raised here.

        Returns:
            The channel id.

        Raises:
            ProtocolError: A subclass naming what was wrong with the handshake.
            HandshakeTimeoutError: No complete handshake within ``handshake_timeout``.
            RuntimeError: The receiver's ``async with`` block is over, or the transfer is
                complete (every channel has ended): ``stream`` is closed, as a failure,
                without being read, and the transfer is not failed; or the handshake ended
                after the block.
            ValueError: ``stream`` was added before (it is left to its first channel),
                or is a TLS stream made with ``https_compatible=True`` (it is closed): its
                close sends no ``close_notify``, so it could not confirm delivery.
        """
        try:
            self._supervisor.check_opened()
        except RuntimeError:
            await trio.aclose_forcefully(stream)
            raise
        if any(stream is added for added in self._streams):
            raise ValueError("this stream was added before: each channel needs its own")
        if lenient_tls(stream):
            await trio.aclose_forcefully(stream)
            raise ValueError(_LENIENT_TLS)
        if self._closed:
            await open_transport(stream, channel=None).reset()
            raise self._over("no channel can be added")
        if self._all_ended():
            # Whatever it is, it is not part of a transfer that completed and confirmed
            # delivery: refused here, it must not fail that transfer after the fact.
            await open_transport(stream, channel=None).reset()
            raise RuntimeError("the transfer is complete: no channel can be added")
        self._streams.append(stream)
        try:
            transport, channel = await self._handshake(stream)
        except MultiFDError as exc:
            self._supervisor.fail(exc)
            self._notify()
            raise
        await self._start_channel(transport, channel)
        return channel

    async def _handshake(self, stream: trio.abc.Stream) -> tuple[Transport, int]:
        # handshake_timeout alone bounds the handshake; receive_timeout applies from then on.
        transport = open_transport(stream, channel=None)
        try:
            buffer = bytearray(HANDSHAKE_SIZE)
            timeout = self._handshake_timeout
            since = time.monotonic()
            with deadline_scope(timeout) as scope:
                await _complete_tls_handshake(stream)
                await transport.receive_into([memoryview(buffer)], "the handshake")
            if scope.cancelled_caught:
                raise HandshakeTimeoutError(
                    f"no complete handshake within handshake_timeout={timeout}s"
                    + clock_note(since, timeout)
                )
            handshake = decode_handshake(buffer, channels=self.channels, uuid=self.uuid)
            channel = handshake.channel_id
            if len(self._connected) >= self.channels:
                raise TooManyChannelsError(
                    f"a channel connected after all {self.channels} channels were set up",
                    field="id",
                    value=channel,
                    limit=self.channels,
                    channel=channel,
                )
            if channel in self._connected:
                raise DuplicateChannelError(
                    f"a second handshake for channel id {channel}",
                    field="id",
                    value=channel,
                    channel=channel,
                )
            wanted = Feature.CHECKSUMS if self._integrity else 0
            # IN_BAND_END says what kind of stream the sender has, not a setting to agree on.
            features = handshake.features & ~int(Feature.IN_BAND_END)
            if features != wanted:
                unknown = features & ~int(Feature.CHECKSUMS)
                if unknown:
                    why = f"bits {unknown:#x} are unknown to this receiver"
                else:
                    # The one setting to agree on, said in the words of both ends' options.
                    theirs = "sends checksums" if features else "sends no checksums"
                    why = (
                        f"the sender {theirs}, this receiver was opened with"
                        f" integrity={self._integrity}: open both ends with the same setting"
                    )
                raise FeatureError(
                    f"the sender announces features {handshake.features:#x}: {why}",
                    field="features",
                    value=handshake.features,
                    limit=int(wanted),
                    channel=channel,
                )
        except BaseException:
            await transport.reset()
            raise
        if self.uuid is None:
            self.uuid = handshake.uuid
        if self._last_completion is None:
            self._last_completion = time.perf_counter()
        self._connected.add(channel)
        self._chains[channel] = chain_start(buffer)
        self._notify()
        if handshake.features & Feature.IN_BAND_END:
            self._in_band_end.add(channel)
        transport.channel = channel
        transport.receive_timeout = self._receive_timeout
        self.stats.channels[channel].bytes += HANDSHAKE_SIZE
        logger.info("receiver: channel %d connected (uuid %s)", channel, handshake.uuid)
        return transport, channel

    async def _start_channel(self, transport: Transport, channel: int) -> None:
        try:
            self._supervisor.nursery.start_soon(
                self._run_channel, transport, channel, name=f"multifd receive {channel}"
            )
        except RuntimeError:
            # The handshake ended after the receiver's block: its nursery takes no task.
            await transport.reset()
            raise self._over(f"channel {channel} connected too late") from self._supervisor.error

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept channels from ``listeners`` until ``channels`` handshakes are done (at
        once if they are) or the receiver's block is over.

        A connection whose handshake fails or times out is logged and closed, and
        accepting goes on (a listening port meets scanners): only good channels count.
        At most 64 handshakes are read at once (the rest wait in the listen queue; with
        ``handshake_timeout=None`` a silent connection holds its place for ever), and a
        process out of descriptors pauses accepting for 0.1 s rather than fail.
        Once every channel is set up or the block is over, handshakes still under way
        (they could only be refused) are dropped, logged, and their connections reset,
        so a silent connection never holds ``serve`` up. Use with ``nursery.start`` to
        know when it accepts.

        Args:
            listeners: Where channels connect (e.g. from ``trio.open_tcp_listeners``, or
                a ``trio.SSLListener`` for TLS). They stay open: closing them is the
                caller's business.
            task_status: For ``nursery.start``; started once accepting has begun.

        Raises:
            ValueError: A listener is a ``trio.SSLListener`` made with
                ``https_compatible=True`` (see :meth:`add_channel`).
            Exception: What a listener's ``accept`` raised (other than running out of
                descriptors), as it was raised: ``trio.ClosedResourceError`` for one
                closed while ``serve`` accepts. Accepting stops on every listener and
                the handshakes under way are reset; channels already set up go on.
            KeyboardInterrupt: Or another exception that is not an ``Exception`` (Trio's
                SIGINT handler raises it wherever the main thread runs, a handshake
                included), raised bare, not in a group: accepting stops and the
                handshakes under way are reset, as for an accept's failure.
        """
        self._supervisor.check_opened()
        if any(lenient_tls(listener) for listener in listeners):
            raise ValueError(_LENIENT_TLS)

        def done() -> bool:
            return len(self._connected) == self.channels or self._closed

        # The first listener's failure, raised as is rather than in our nurseries' groups.
        failed: list[Exception] = []

        async def accept(listener: trio.abc.Listener[trio.abc.Stream]) -> None:
            try:
                await accept_into(listener, handshakes, self._try, slots)
            except Exception as exc:
                failed.append(exc)
                handshakes.cancel_scope.cancel()

        slots = trio.Semaphore(ACCEPT_LIMIT)
        interrupt: BaseException | None = None
        try:
            async with trio.open_nursery() as handshakes, trio.open_nursery() as accepting:
                if not done():
                    for listener in listeners:
                        accepting.start_soon(accept, listener)
                    accepting.start_soon(self._stop_serving, done, handshakes)
                task_status.started()
        except BaseExceptionGroup as group:
            # A KeyboardInterrupt that Trio's SIGINT handler raised in a handshake or an
            # accept leaves bare, as it does from add_channel() and from a channel task.
            interrupt = interrupt_in(group)
            if interrupt is None:
                raise
        if interrupt is not None:
            try:
                raise interrupt
            finally:
                # This frame is in its traceback: holding it would make a reference cycle.
                del interrupt
        if failed:
            # Taken out of the list: this frame, in the traceback, holds the list.
            raise failed.pop(0)

    async def _stop_serving(self, done: Callable[[], bool], handshakes: trio.Nursery) -> None:
        await self._wait_until(done)
        # A handshake still under way can only be refused now (every id is taken, or the
        # block is over): waiting for it would hold serve() up to handshake_timeout, for
        # ever without one.
        if handshakes.child_tasks:
            logger.warning(
                "receiver: dropped %d connection(s) still in their handshake: %s",
                len(handshakes.child_tasks),
                "the receiver's block is over"
                if self._closed
                else f"all {self.channels} channels are set up",
            )
        handshakes.cancel_scope.cancel()

    async def _try(self, stream: trio.abc.Stream) -> None:
        """Start a channel on an accepted connection, or log why not and close it."""
        # Asked first: a peer that resets mid-handshake has no name after.
        peer = peer_name(stream)
        try:
            transport, channel = await self._handshake(stream)
        except MultiFDError as exc:
            logger.warning(
                "receiver: refused a connection%s: %s",
                f" from {peer}" if peer else "",
                str(exc),  # see Supervisor.fail
            )
            return
        try:
            await self._start_channel(transport, channel)
        except RuntimeError as exc:
            logger.warning("receiver: %s", str(exc))

    # -- the channel task ---------------------------------------------------------------------

    async def _run_channel(self, transport: Transport, channel: int) -> None:
        decoder: Decoder | None = None
        crew: _Crew | None = None
        try:
            if self._method.compresses or self._integrity:
                # The payload is read into a buffer first (to decode it, or to check its
                # checksum before a byte of it is written), then decoded from there.
                decoder = self._method.new_decoder()
            crew, first = self._join(self._new_link(transport, channel, decoder))
            if first:
                # The packet loop runs in a worker thread: socket I/O and decompression
                # release the GIL. It comes back to Trio only at SYNC packets and at
                # the end of a stream, and ends once every channel of its crew has.
                await crew.worker.run(functools.partial(self._worker, crew), self._threads)
            else:
                # The crew's first channel runs the thread; its failure cancels this task.
                await crew.worker.done.wait()
            # The stream ended cleanly after its last SYNC; once every channel has, the
            # transfer is complete and the clean close tells the sender so.
            await self._wait_until(self._all_ended)
            logger.info("receiver: channel %d done", channel)
        except MultiFDError as exc:
            await self._supervisor.channel_failed(exc, channel)
            raise
        except Exception as exc:
            # A bug (a third-party decoder's, say), recorded before the cleanup's awaits,
            # where the teardown's Cancelled would replace it.
            self._supervisor.fail(exc, channel=channel)
            raise
        except BaseException as exc:
            self._supervisor.interrupted(exc)
            raise
        finally:
            if crew is not None:
                await crew.worker.released()
            if decoder is not None:
                decoder.close()
            if self._all_ended():
                # The transfer completed: the sender gets its clean close, also when the
                # application left first (say, on sync()'s TransferIncompleteError).
                await transport.aclose()
            # A no-op once the stream was closed cleanly.
            await transport.reset()

    def _new_link(self, transport: Transport, channel: int, decoder: Decoder | None) -> _Link:
        payload: memoryview | None = None
        if decoder is not None:
            # One bounded buffer per channel: payloads are checked (checksum) or
            # decoded from here, never larger than a full packet's bound.
            payload = memoryview(bytearray(self._payload_bound))
        return _Link(
            channel,
            transport,
            decoder,
            self.stats.channels[channel],
            memoryview(bytearray(header_size(self._page_count))),
            payload,
            chain=self._chains[channel],
        )

    def _join(self, link: _Link) -> tuple[_Crew, bool]:
        """Add ``link`` to the crew of its worker thread; ``True`` when the calling task
        must run that thread."""
        channel = link.channel
        slot = thread_slot(channel, link.transport, self._io_threads)
        with self._progress:
            if slot is None:
                crew = _Crew({channel})
                self._crews[shared_slot(channel, self._io_threads)].expected.discard(channel)
            else:
                crew = self._crews[slot]
            crew.joining.append(link)
            first, crew.running = not crew.running, True
            self._progress.notify_all()
        return crew, first

    def _worker(self, crew: _Crew) -> None:
        """A worker thread's packet loop: the packets of its crew's channels, as they
        arrive, until every channel of the crew has ended."""
        links: list[_Link] = []
        reading: ReadySet[_Link] = ReadySet()
        progress = self._progress
        while True:
            if crew.joining or len(links) > len(reading) or not reading:
                with progress:
                    for link in crew.joining:
                        links.append(link)
                        reading.add(link.transport, link)
                    crew.joining.clear()
                    for link in links:
                        if link.parked and self.rounds_completed >= link.parked:
                            link.parked = 0
                            reading.unpark(link.transport, link)
                    if not crew.expected:
                        crew.running = False
                        return
                    if not reading:
                        # Every channel waits at SYNC for the others, or has not joined.
                        progress.wait(CANCEL_CHECK)
                if not reading:
                    trio.from_thread.check_cancelled()
                    for link in reading.wait(block=False):
                        self._parked_hung_up(link, reading)
                    continue
            ready = reading.wait()
            # Per batch of packets, not only when idle: a busy thread must notice too.
            trio.from_thread.check_cancelled()
            for link in ready:
                if link.parked:
                    self._parked_hung_up(link, reading)
                    continue
                self._read_packet(link, reading)
                if link.ended:
                    links.remove(link)
                    with progress:
                        crew.expected.discard(link.channel)

    def _read_packet(self, link: _Link, reading: ReadySet[_Link]) -> None:
        """Receive one packet of ``link`` and stop reading it if it ended or parked."""
        try:
            self._receive_packet(link)
        except MultiFDError as exc:
            if exc.channel is None:
                exc.channel = link.channel
            raise
        reading.spinner.moved = True
        if link.ended:
            reading.remove(link.transport, link)
        elif link.parked:
            reading.park(link.transport, link)

    def _parked_hung_up(self, link: _Link, reading: ReadySet[_Link]) -> None:
        # A parked channel is polled for a reset or hang-up only, so the transfer fails
        # at once rather than when its round completes (which it may never do). But a
        # sender without an in-band end (QEMU) closes each channel once it has written
        # everything, and on a Unix socket a close shows as a hang-up: that is no
        # failure. Such a channel is polled no more; what it holds after its SYNC (more
        # packets, its end) is read once the round completes, as over TCP.
        link.transport.check_hang_up_sync(
            f"waiting at SYNC {link.parked}",
            plain_close_is_end=link.channel not in self._in_band_end,
        )
        reading.mute(link.transport)

    def _receive_packet(self, link: _Link) -> None:
        """Read and apply one packet of ``link``'s channel (its first byte is there or
        the stream ended); at a SYNC, park the channel until the round completes."""
        channel, transport, buffer = link.channel, link.transport, link.header
        try:
            more = transport.receive_or_eof_sync(buffer, "a packet header", _check_header_start)
        except (TruncatedError, TransportError) as exc:
            # A failure byte comes alone before the sender's close: a plain end after it,
            # or over TLS an end without close_notify, which fails the read (no count).
            # A stale one cannot be here: every header accepted starts with the magic.
            alone = not isinstance(exc, TruncatedError) or exc.value == len(FAILURE_SIGNAL)
            if alone and buffer[:1] == FAILURE_SIGNAL:
                raise TransportError(
                    "the sender failed or was cancelled: it wrote its failure signal and"
                    " closed the channel",
                    channel=channel,
                ) from exc
            raise
        if not more:
            if channel in self._in_band_end:
                raise TransportError(
                    "the stream ended before the sender's final SYNC (its handshake"
                    " announced an in-band end): the sender failed or was cancelled",
                    channel=channel,
                )
            trio.from_thread.run_sync(self._end_channel, channel)
            link.ended = True
            return
        stats = link.stats
        if self._integrity:
            link.chain = _check_header_checksum(buffer, link.chain, stats)
        header = decode_packet_header(buffer, page_count=self._page_count, channel=channel)
        stats.packets += 1
        stats.bytes += len(buffer)
        try:
            self._check_checksum_flag(header)
            if header.flags & _END_OF_STREAM and channel not in self._in_band_end:
                # Past it the channel is not read: honoured only where it was announced.
                raise FlagsError(
                    "packet flags the end of the stream (0x20000000) on a channel whose"
                    " handshake did not announce it (features bit 1)",
                    field="flags",
                    value=header.flags,
                )
            if header.flags & _END_OF_STREAM and not header.is_sync:
                raise FlagsError(
                    "packet flags the end of the stream (0x20000000) without SYNC: only the"
                    " final SYNC ends a stream",
                    field="flags",
                    value=header.flags,
                )
            if header.carries_pages:
                self._receive_pages(link, header)
        except (ProtocolError, MappingError) as exc:
            exc.channel = channel
            if exc.packet_num is None:
                exc.packet_num = header.packet_num
            raise
        if header.is_sync:
            stats.syncs += 1
            final_round = bool(header.flags & _FINAL_ROUND)
            number = trio.from_thread.run_sync(self._arrive, channel, final_round)
            if self.rounds_completed < number:
                # Not read again before the round completes: no page of the next round
                # is written before every channel has finished this one.
                link.parked = number
            if header.flags & _END_OF_STREAM:
                trio.from_thread.run_sync(self._end_channel, channel)
                link.ended = True

    def _check_checksum_flag(self, header: PacketHeader) -> None:
        flagged = bool(header.flags & _CHECKSUMS)
        if flagged == self._integrity:
            return
        if flagged:
            raise FlagsError(
                "packet carries checksums (flag 0x80000000) on a channel that did not"
                " agree to them",
                field="flags",
                value=header.flags,
            )
        raise IntegrityError(
            "packet without checksums on a channel that agreed to them",
            field="flags",
            value=header.flags,
        )

    def _check_method(self, header: PacketHeader) -> None:
        if header.compression == self._method.flag:
            return
        # Raises UnsupportedCompressionError for a method not available here.
        theirs = method_for_flag(header.compression)
        raise CompressionMismatchError(
            f"packet is compressed with {theirs.name!r}, the receiver expects"
            f" {self._method.name!r}",
            field="flags",
            value=header.flags,
            limit=self._method.flag,
        )

    def _receive_pages(self, link: _Link, header: PacketHeader) -> None:
        self._check_method(header)
        channel, transport, decoder, stats = link.channel, link.transport, link.decoder, link.stats
        payload_buffer = link.payload
        block, normal_runs, zero_runs = self._table.resolve(header, channel=channel)
        page_size = self.page_size
        view = block.view
        received = self._received.get(block.name)
        if normal_runs:
            expected = header.normal_pages * page_size
            payload = header.next_packet_size
            # Uncompressed, the payload is the pages: read straight into them, it must be
            # their size exactly (and no method call on the fastest path).
            if self._method.compresses:
                # Never past the buffer, whatever the method's bound for fewer pages.
                bound = min(self._method.payload_bound(expected), self._payload_bound)
                fits = 1 <= payload <= bound
            else:
                bound = expected
                fits = payload == expected
            if not fits:
                raise PayloadSizeError(
                    f"next_packet_size is {payload}, outside 1..{bound} for"
                    f" {header.normal_pages} pages of method {self._method.name!r}",
                    field="next_packet_size",
                    value=payload,
                    limit=bound,
                )
            runs = [view[start : start + length] for start, length in normal_runs]
            if decoder is None:
                make_present(block, normal_runs, write=True)
                try:
                    transport.receive_into_sync(runs, "a payload")
                except TransportError as exc:
                    raise_mapping_fault(block, normal_runs, write=True, exc=exc)
            else:
                assert payload_buffer is not None, "a decoder's link has a payload buffer"
                data = payload_buffer[:payload]
                transport.receive_into_sync([data], "a payload")
                if self._integrity:
                    actual = payload_checksum([data])
                    if actual != header.payload_checksum:
                        raise IntegrityError(
                            f"payload checksum is {actual:#018x}, the header says"
                            f" {header.payload_checksum:#018x}: nothing of it was written",
                            field="payload_checksum",
                            value=actual,
                            limit=header.payload_checksum,
                        )
                # Faulted in once the payload is here: the pages are written right after.
                make_present(block, normal_runs, write=True)
                decoder.decode_into(data, runs)
            stats.bytes += payload
            self._barrier.count_pages(channel, header.normal_pages)
            if received is not None:
                for start, length in normal_runs:
                    received[start // page_size : (start + length) // page_size] = (
                        _WRITTEN_PAGE * (length // page_size)
                    )
        if zero_runs:
            if received is not None:
                # Known-zero target: only the stretches of pages written before get zeros;
                # pages never written stay untouched.
                zero_runs = [
                    (found.start() * page_size, (found.end() - found.start()) * page_size)
                    for start, length in zero_runs
                    for found in _WRITTEN_PAGES.finditer(
                        received, start // page_size, (start + length) // page_size
                    )
                ]
            make_present(block, zero_runs, write=True)
            for start, length in zero_runs:
                view[start : start + length] = _ZERO_VIEW[:length]
            self._barrier.count_pages(channel, header.zero_pages)
        stats.normal_pages += header.normal_pages
        stats.zero_pages += header.zero_pages
        stats.page_bytes += (header.normal_pages + header.zero_pages) * page_size

    def _arrive(self, channel: int, final_round: bool) -> int:
        """Record ``channel``'s SYNC and return its round's number; the round is complete
        once :attr:`rounds_completed` reaches it."""
        # Under the condition the worker threads wait on for a round to complete.
        with self._progress:
            number, complete = self._barrier.arrive(channel, final_round=final_round)
            if complete:
                self._progress.notify_all()
        if complete:
            now = time.perf_counter()
            assert self._last_completion is not None, "a SYNC came after a handshake"
            self._completions.append(
                (number, self._barrier.completed_pages, now - self._last_completion)
            )
            self._last_completion = now
            self.stats.rounds = number
            logger.debug("receiver: round %d complete", number)
            self._notify()
        return number

    def _end_channel(self, channel: int) -> None:
        last = self._barrier.end(channel)
        logger.info("receiver: channel %d reached its end after round %d", channel, last)
        self._notify()


def _written_bitmap(block: RAMBlock) -> mmap.mmap:
    """A known-zero block's bitmap of the pages written: a byte per page."""
    try:
        return mmap.mmap(-1, max(block.page_count, 1), flags=mmap.MAP_PRIVATE)
    except OSError as exc:
        # The kernel refuses to commit it (no overcommit, an address-space limit): as
        # for any other allocation, not an error of the transfer.
        raise MemoryError(
            f"block {block.name!r}: no memory for its known-zero bitmap of"
            f" {block.page_count} bytes (a byte per page): {exc.strerror}"
        ) from exc


def _check_header_start(start: memoryview) -> None:
    # A failure byte comes alone, its sender's close right behind it: that end says
    # what it is (see _receive_packet).
    if start[:1] != FAILURE_SIGNAL:
        check_header_start(start)


def _check_header_checksum(buffer: memoryview, seed: int, stats: ChannelStats) -> int:
    """Check a header's checksum, chained to the channel's previous one; return it."""
    # Before any other check or write: a header with a flipped bit must not be trusted
    # for anything, not even to name its own fields (its packet_num). The error names
    # the packet by its place in the channel's stream instead, which the receiver counted.
    stored = stored_header_checksum(buffer)
    actual = header_checksum(buffer, seed)
    if actual != stored:
        raise IntegrityError(
            f"header checksum of the channel's packet {stats.packets + 1} (at byte"
            f" {stats.bytes} of its stream) is {actual:#018x}, the header says"
            f" {stored:#018x}: the header was changed, or a packet of this channel was"
            " lost, repeated or moved",
            field="header_checksum",
            value=actual,
            limit=stored,
        )
    return actual


async def _complete_tls_handshake(stream: trio.abc.Stream) -> None:
    # A TLS handshake counts against handshake_timeout too, and its failure is a
    # transport error of this connection. SSLStream passes its transport stream's own
    # exceptions through unchanged: an application's stream may raise OSError.
    if isinstance(stream, trio.SSLStream):
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            cause = root_cause(exc)
            plain = getattr(cause, "reason", None) in NOT_TLS
            hint = " (the peer does not speak TLS: does the sender use it?)" if plain else ""
            raise TransportError(f"TLS handshake failed: {cause!r}{hint}") from exc


@asynccontextmanager
async def open_receiver(
    blocks: Iterable[RAMBlock],
    *,
    channels: int = 2,
    uuid: uuid_mod.UUID | None = None,
    compression: str = "none",
    handshake_timeout: float | None = 10.0,
    receive_timeout: float | None = None,
    integrity: bool = False,
    io_threads: int | None = None,
) -> AsyncIterator[Receiver]:
    """Open the receiving end of a transfer into ``blocks``.

    Channels join with :meth:`Receiver.add_channel` (a stream you accepted) or
    :meth:`Receiver.serve` (listeners). Leaving the block never waits for the peer: it
    closes every channel (with a reset, unless the transfer completed).

    What a clean end proves: over TCP with ``integrity=False`` (QEMU's format, which has
    no end marker), a sender that died or closed its channels right after a SYNC,
    before it sent all it meant to, ends every channel as cleanly as one that finished:
    a killed process's kernel closes its sockets with a plain FIN. Then
    :meth:`Receiver.wait_closed` returns and the block exits without an error, holding
    the rounds that completed. Where that matters, open both ends with
    ``integrity=True`` (the sender then flags its last SYNC, and an end before it is a
    :class:`TransportError`), or check the end in the application (a page count or
    checksum it sends on its own connection, as ``trio-multifd recv`` does). Over other
    streams (Unix sockets, TLS, memory streams) the end is always in band.

    Args:
        blocks: The target blocks, writable, all with the same page size; packets name
            them by :attr:`RAMBlock.name`.
        channels: How many channels the sender opens.
        uuid: The transfer's uuid; ``None`` adopts the first channel's and then rejects
            channels of any other transfer. Not authentication: use TLS for that.
        compression: The method the sender uses (``"none"``, ``"zlib"``, ``"zstd"``...).
        handshake_timeout: Seconds from :meth:`Receiver.add_channel` (or the accept in
            :meth:`Receiver.serve`) to a complete handshake, TLS included; ``None`` waits
            forever.
        receive_timeout: Seconds a channel may sit inside a packet with no byte arriving;
            ``None`` (the default) waits forever.
        integrity: Expect end-to-end checksums on every packet (the sender's setting
            must match, else :class:`FeatureError` at the handshake). Headers are checked
            before anything else and payloads before any byte of them is written; a
            mismatch is an :class:`IntegrityError` and its round never completes (but
            the first bytes of a header that arrive before the rest are checked against
            the magic at once, as without checksums: when they cannot start it, the
            stream is out of step, a :class:`MagicError`).
            The checksums find damage, not a forger: they are not keyed (use TLS for that).
            The sender's end then comes in band over TCP too: a sender killed right
            after a SYNC is a :class:`TransportError`, not a clean end.
        io_threads: How many worker threads read the packets of the channels over
            sockets (channel ``c`` goes to thread ``c % io_threads``; other streams get a
            thread each); ``None`` for one per core with compression, else half the
            cores (at least one).

    Raises:
        ValueError: A bad argument (no blocks, read-only or mixed page sizes, two blocks
            with one name, channel count, method, timeouts).
        TypeError: An argument of the wrong type (a block that is not a
            :class:`RAMBlock`, a ``uuid`` that is not a :class:`uuid.UUID`, a channel
            count or ``io_threads`` that is not an int, a method name not a str, a
            timeout that is neither a real number nor ``None``).
        MemoryError: The bitmap of a known-zero block (a byte per page, reserved up
            front, backed only where pages are written) cannot be allocated.
        MultiFDError: The transfer failed; the subclass and its ``channel`` say where.
    """
    receiver = Receiver(
        blocks,
        channels=channels,
        uuid=uuid,
        compression=compression,
        handshake_timeout=handshake_timeout,
        receive_timeout=receive_timeout,
        integrity=integrity,
        io_threads=io_threads,
    )

    async def start(nursery: trio.Nursery) -> None:
        nursery.start_soon(receiver._wake_waiters_when_cut_short)

    async def finish() -> None:
        # Leaving never waits for peers: cancelling the channel tasks closes them all.
        receiver._supervisor.nursery.cancel_scope.cancel()

    try:
        async with receiver._supervisor.run(start, finish):
            try:
                yield receiver
            finally:
                # Over from here on, before its exit cancels the channel tasks: a waiting
                # task is told so, not that the transfer was cancelled.
                receiver._closed = True
    finally:
        # Tasks outside the block may wait in sync(), wait_closed() or serve().
        receiver._notify()
