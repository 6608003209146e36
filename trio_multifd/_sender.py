"""The sending end: :func:`open_sender`, :class:`Sender` and its channel tasks.

QEMU's sender hands full page batches to idle channel threads through semaphores
(``channels_ready``, ``sem``, ``pending_job``) and waits on ``sem_sync`` for SYNC. Here:

- worker threads move the packets (sendmsg, zlib and zstd release the GIL, so channels
  move and compress on several cores), each for a crew of channels (see ``_threads``),
  giving packets to its channels in turn;
- queued pages reach the threads as batches of offsets (a ``range`` stays a ``range``)
  in one thread-safe job queue; whichever thread is idle first carves the next packet
  off the batch at its head (the ``channels_ready`` scan), so queueing a whole block
  costs the Trio side one call and no trip through Trio per packet; which pages form
  each packet is plain state in ``_batching`` (no Trio, no threads), this module holds
  its locks and does the waiting and the waking;
- queueing waits while more than a few packets' worth of pages wait for a channel
  (backpressure); the Trio side waits on a ``trio.Event`` that a worker thread sets
  through the Trio token only when someone waits;
- a SYNC round is one job of ``channels`` tokens in the same job queue; a thread takes
  one per channel of its crew, writes a SYNC packet on each and waits for the round
  before taking another job, so every channel takes exactly one;
- a :class:`~trio_multifd._supervisor.Supervisor` for teardown.
"""

from __future__ import annotations

import functools
import itertools
import threading
import uuid as uuid_mod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import SupportsIndex, final

import attrs
import trio

from ._batching import JobLine, PacketGatherer, SyncTokens, checked_offsets
from ._block import RAMBlock, index_of, make_present, raise_mapping_fault
from ._errors import MappingError, MultiFDError, TransportError
from ._methods import Encoder, Method, get_method
from ._pages import PageBatch, Run, page_runs, run_offsets, split_zero_runs
from ._stats import TransferStats
from ._supervisor import Supervisor, logger, refuse_unless_cancelled
from ._threads import WorkerRun, io_thread_count, thread_slot
from ._transport import (
    CANCEL_CHECK,
    Buffer,
    SocketTransport,
    Transport,
    Turns,
    lenient_tls,
    open_transport,
)
from ._wire import (
    HANDSHAKE_SIZE,
    Feature,
    Flag,
    Handshake,
    as_integer,
    chain_start,
    check_transfer_args,
    checked_seconds,
    encode_handshake,
    pack_packet_header,
    page_count_for,
    payload_checksum,
    seal_header,
    stored_header_checksum,
)

__all__ = ["Connector", "Sender", "open_sender"]

Connector = Callable[[int], Awaitable[trio.abc.Stream]]
"""The type of ``connect``: an async function that takes a channel id and returns an
open ``trio.abc.Stream`` for that channel (e.g. ``trio.open_tcp_stream`` to an address
chosen by the id, or a ``trio.SSLStream`` around one)."""

_ZERO_PAGE_MODES = ("multifd", "none")


@attrs.define(eq=False, kw_only=True)
class _SyncRound(SyncTokens):
    """A SYNC round as the worker threads see it: every channel writes one SYNC packet."""

    number: int
    # The sender's own last round, written by its exit: each channel's stream ends after it.
    closing: bool
    # The application's sync(final_round=True): flag FINAL_ROUND on the packets.
    final_round: bool
    # Set by the worker thread that writes the round's last SYNC packet: the threading
    # event releases the other worker threads, the Trio event the application.
    written: trio.Event = attrs.Factory(trio.Event)
    all_written: threading.Event = attrs.Factory(threading.Event)
    lock: threading.Lock = attrs.Factory(threading.Lock)


@attrs.define(eq=False)
class _Link:
    """A connected channel, as its worker thread uses it."""

    channel: int
    transport: Transport
    encoder: Encoder | None
    # With integrity: the last header checksum, the seed of the next.
    chain: int = 0


@attrs.define(eq=False)
class _Crew:
    """The channels one worker thread serves; the first one's task runs the thread."""

    links: list[_Link] = attrs.Factory(list)
    worker: WorkerRun = attrs.Factory(WorkerRun)

    def watch(self) -> None:
        """Make each channel's waits notice the failure of the others."""
        sockets = [
            link.transport for link in self.links if isinstance(link.transport, SocketTransport)
        ]
        for transport in sockets:
            transport.watch_peers(sockets)


@final
class _JobQueue:
    """A :class:`~trio_multifd._batching.JobLine` shared by the Trio side and the worker
    threads: its lock, a condition for idle threads, and the Trio side's wait for room.

    The Trio side waits while the line has no room; a worker thread wakes it through the
    Trio token only when it waits.
    """

    def __init__(
        self,
        page_count: int,
        limit: int,
        token: trio.lowlevel.TrioToken,
        supervisor: Supervisor,
    ) -> None:
        self._line: JobLine[_SyncRound] = JobLine(page_count, limit)
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        # Threads waiting on _not_empty: with none, notify() (two Python calls per packet
        # of a batch) is skipped.
        self._idle = 0
        self._waiter: trio.Event | None = None
        self._token = token
        self._supervisor = supervisor
        self._closed = False

    def put(self, jobs: Iterable[PageBatch | _SyncRound]) -> None:
        """Append jobs (the Trio side)."""
        with self._lock:
            for job in jobs:
                self._line.put(job)
            if self._idle:
                self._not_empty.notify()

    async def wait_for_room(self) -> None:
        """Wait until at most ``limit`` queued pages are not yet taken (the Trio side).

        Raises:
            RuntimeError: The queue was closed: no worker thread will take them.
        """
        while True:
            with self._lock:
                closed = self._closed
                if not closed and self._line.has_room:
                    return
                # One event for every waiting task (two tasks may queue at once).
                if not closed and self._waiter is None:
                    self._waiter = trio.Event()
                waiter = self._waiter
            if closed:
                await refuse_unless_cancelled(
                    self._supervisor.refusal("the sender closed before these pages were sent")
                )
            assert waiter is not None
            await waiter.wait()

    def close(self) -> None:
        """No job will be taken any more: wake every task waiting for room (the Trio
        side, when the transfer is over)."""
        with self._lock:
            self._closed = True
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.set()

    def take(self, timeout: float, channels: int) -> PageBatch | _SyncRound | None:
        """Take the next packet's pages or, for a thread that serves ``channels``
        channels, that many of a SYNC round's tokens, waiting up to ``timeout`` seconds
        for a job (a worker thread)."""
        waiter = None
        line = self._line
        with self._lock:
            job = line.take(channels)
            if job is None:
                self._idle += 1
                self._not_empty.wait(timeout)
                self._idle -= 1
                job = line.take(channels)
                if job is None:
                    return None
            if self._waiter is not None and line.has_room:
                waiter, self._waiter = self._waiter, None
            if self._idle and line.has_jobs:
                # A batch of many packets: the next idle thread takes the next one.
                self._not_empty.notify()
        if waiter is not None:
            self._token.run_sync_soon(waiter.set)
        return job


@final
class Sender:
    """The sending end of a transfer; made by :func:`open_sender` (one made directly has
    no channels: its methods raise :class:`RuntimeError` rather than wait for ever).

    Its attributes stay readable after its ``async with`` block, its methods do not: from
    the moment the block starts to exit (or the transfer failed), :meth:`queue_page`,
    :meth:`queue_pages` and :meth:`sync` raise :class:`RuntimeError`, so that no page is
    accepted that would never be sent.

    Attributes:
        uuid: The transfer's uuid, sent in every channel's handshake.
        channels: The number of channels.
        page_size: Bytes per page; every queued block must use it.
        stats: Counters per channel and in total (:class:`TransferStats`).
    """

    def __init__(
        self,
        connect: Connector,
        *,
        channels: int,
        uuid: uuid_mod.UUID | None,
        compression: str,
        compression_level: int | None,
        page_size: int,
        zero_page_detection: str,
        send_timeout: float | None,
        integrity: bool,
        io_threads: int | None,
    ) -> None:
        check_transfer_args(channels, uuid)
        if zero_page_detection not in _ZERO_PAGE_MODES:
            raise ValueError(
                f"zero_page_detection must be one of {_ZERO_PAGE_MODES}, got"
                f" {zero_page_detection!r}"
            )
        if send_timeout is not None:
            checked_seconds("send_timeout", send_timeout)
        self._method: Method = get_method(compression)
        self._level = self._method.check_level(compression_level)
        page_size = as_integer("page_size", page_size)
        self._page_count = page_count_for(page_size)
        self._connect = connect
        self.uuid = uuid if uuid is not None else uuid_mod.uuid4()
        self.channels = channels
        self.page_size = page_size
        self.stats = TransferStats.for_channels(channels)
        self._detect_zero = zero_page_detection == "multifd"
        self._send_timeout = send_timeout
        self._integrity = bool(integrity)
        self._empty_checksum = payload_checksum([]) if integrity else 0
        self._checksum_flag = int(Flag.CHECKSUMS) if integrity else 0
        self._supervisor = Supervisor("sender")
        # Jobs go to the worker threads through a thread-safe queue (no Trio round trip
        # per packet); queueing waits while two packets per channel wait for a channel.
        self._token = trio.lowlevel.current_trio_token()
        self._jobs = _JobQueue(
            self._page_count, 2 * channels * self._page_count, self._token, self._supervisor
        )
        # Pages queued one by one gather here until they fill a packet.
        self._gatherer = PacketGatherer(self._page_count)
        self._packet_num = itertools.count()
        self._rounds = 0
        # Every stream connect returned, to refuse one returned twice.
        self._streams: list[trio.abc.Stream] = []
        self._connected = 0
        self._all_connected = trio.Event()
        self._closing = False
        # SYNC rounds queued and not yet written, whose callers wait.
        self._unwritten: list[_SyncRound] = []
        # Worker threads move (and compress) the packets, each for a crew of channels.
        self._io_threads = io_thread_count(
            io_threads, channels, compressing=self._method.compresses
        )
        self._crews: dict[int, _Crew] = {}
        self._threads = trio.CapacityLimiter(channels)

    # -- the application's side -------------------------------------------------------------

    @property
    def unsynced_pages(self) -> int:
        """How many pages were queued since the last SYNC round was started (a page
        queued twice counts twice): no round covers them yet, the next :meth:`sync` (or
        the exit's last round) will.

        A page whose older copy is still in flight on another channel may land after its
        newer copy; only a SYNC round between them orders the two (see
        :func:`~trio_multifd.precopy`, which starts with a round of its own when this is
        not 0).
        """
        return self._gatherer.unsynced

    def _check(self, block: RAMBlock) -> None:
        if not isinstance(block, RAMBlock):
            raise TypeError(f"block must be a RAMBlock, got {type(block).__name__}")
        if block.page_size != self.page_size:
            raise ValueError(
                f"block {block.name!r} has page_size {block.page_size}, the sender uses"
                f" {self.page_size}"
            )
        self._check_open("no page can be queued")

    def _check_open(self, refused: str) -> None:
        self._supervisor.check_opened()
        if self._closing:
            raise self._supervisor.refusal(f"the sender is closing or closed: {refused}")

    async def queue_page(self, block: RAMBlock, offset: SupportsIndex) -> None:
        """Queue the page at byte ``offset`` of ``block``.

        The page is not copied: it is read when its packet is sent, at the latest before
        the next :meth:`sync` returns. Waits while every channel is busy; a call cancelled
        while it waits has queued the page all the same (it is sent, and counted in
        :attr:`unsynced_pages`), one cancelled before it started has not.

        Raises:
            ValueError: ``offset`` is not a page-aligned offset in the block, or the
                block's page size differs from the sender's.
            TypeError: ``block`` is not a :class:`RAMBlock`, or ``offset`` not an
                integer (a ``bool`` is not one here).
            RuntimeError: The sender's ``async with`` block has exited or is exiting, so
                the page would never be sent; or the transfer ended while this call
                waited for room in the queue.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check(block)
        page = index_of(offset)
        block.check_offset(page)
        await self._add(block, (page,))

    async def queue_pages(self, block: RAMBlock, offsets: Iterable[SupportsIndex]) -> None:
        """Queue many pages of ``block`` at once (a ``range`` or any iterable of offsets).

        Costs no Python-level work per page on the Trio side: a ``range`` is checked by
        its ends and queued as it is, other offsets are checked and copied in one go, and
        the worker threads cut them into packets. Every offset is checked before any
        page is queued. Like :meth:`queue_page`, it waits while every channel is busy,
        and a call cancelled while it waits has queued every page all the same.

        Raises:
            ValueError: An offset is not a page-aligned offset in the block, or the
                block's page size differs from the sender's.
            TypeError: ``block`` is not a :class:`RAMBlock`, or an offset not an integer
                (a ``bool`` is not one here).
            RuntimeError: The sender's ``async with`` block has exited or is exiting, so
                the pages would never be sent; or the transfer ended while this call
                waited for room in the queue.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check(block)
        await self._add(block, checked_offsets(block, offsets))

    async def _add(self, block: RAMBlock, offsets: Sequence[int]) -> None:
        batches = self._gatherer.add(block, offsets)
        if batches is None:
            # The pages joined a packet that an earlier call already waited for.
            return
        self._jobs.put(batches)
        await self._jobs.wait_for_room()

    async def sync(self, *, final_round: bool = False) -> int:
        """Flush the queued pages and send a SYNC packet on every channel.

        Returns when every channel has written its SYNC packet into its stream (for
        sockets: into the kernel). The receiver's round with the same number completes
        once it has every page queued before this call.

        A call cancelled while it waits has started its round all the same: the round is
        written, the receiver completes it, and the next call returns the number after
        it. Its pages may still be read until a later call returns, so change them only
        then. A call cancelled before it started (already when called) starts no round.

        Args:
            final_round: Mark this round as the last of a pre-copy migration (flag
                ``FINAL_ROUND`` on its SYNC packets, which QEMU ignores); the receiver
                records it in :attr:`Receiver.final_round`.

        Returns:
            The round number: 1 for the first round, then 2, ...

        Raises:
            RuntimeError: The sender's ``async with`` block has exited or is exiting (its
                exit sends the last round itself); or the transfer ended before this
                round was written on every channel, with the transfer's error, when it
                failed, as the ``__cause__``.
        """
        return await self._sync(final=False, final_round=final_round)

    async def _sync(self, *, final: bool, final_round: bool = False) -> int:
        if not final:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_open("no SYNC round can be started")
        self._rounds += 1
        sync_round = _SyncRound(
            number=self._rounds,
            closing=final,
            final_round=final_round,
            remaining=self.channels,
            untaken=self.channels,
        )
        # The pages gathered so far go before the round's tokens: the round covers them.
        self._jobs.put((*self._gatherer.end_round(), sync_round))
        self._unwritten.append(sync_round)
        try:
            await sync_round.written.wait()
        finally:
            self._unwritten.remove(sync_round)
        if not sync_round.all_written.is_set():
            await refuse_unless_cancelled(
                self._supervisor.refusal(
                    f"the sender closed before round {sync_round.number} was written"
                )
            )
        self.stats.rounds = sync_round.number
        logger.debug("sender: round %d written on every channel", sync_round.number)
        return sync_round.number

    # -- lifecycle ----------------------------------------------------------------------------

    async def _start(self, nursery: trio.Nursery) -> None:
        for channel in range(self.channels):
            nursery.start_soon(self._run_channel, channel, name=f"multifd send {channel}")
        await self._all_connected.wait()

    async def _finish(self) -> None:
        # Normal exit: everything queued goes out, then a last SYNC round; the channel
        # tasks then wait for the receiver to confirm and end. Pages queued after it
        # would never be sent: from here on queueing is an error.
        self._closing = True
        await self._sync(final=True)

    def _close(self) -> None:
        """The transfer writes nothing more, however it ended: wake every task still
        waiting to queue or for a round (outside the transfer's block, or shielded
        inside it), to raise."""
        self._closing = True
        self._jobs.close()
        for sync_round in self._unwritten:
            sync_round.written.set()

    # -- channel tasks ------------------------------------------------------------------------

    async def _run_channel(self, channel: int) -> None:
        transport: Transport | None = None
        encoder: Encoder | None = None
        crew: _Crew | None = None
        try:
            try:
                stream = await self._connect(channel)
            except Exception as exc:
                # Whatever connect raises (OSError, a TLS failure, its own timeout): the
                # channel could not be opened, said as one error of the transfer's.
                raise TransportError(f"could not connect: {exc!r}", channel=channel) from exc
            if not isinstance(stream, trio.abc.Stream):
                raise TransportError(
                    f"connect returned {type(stream).__name__}, not a trio.abc.Stream",
                    channel=channel,
                )
            if any(stream is other for other in self._streams):
                # Two channels' packets interleaved on one stream: garbage to any receiver.
                raise TransportError(
                    "connect returned a stream it returned for another channel: each"
                    " channel needs its own",
                    channel=channel,
                )
            self._streams.append(stream)
            if lenient_tls(stream):
                await trio.aclose_forcefully(stream)
                raise TransportError(
                    "connect returned a trio.SSLStream made with https_compatible=True: it"
                    " reads a bare TCP close (a receiver that was killed) as a clean end"
                    " of stream, which would pass for the receiver's confirmation; use"
                    " the default, https_compatible=False",
                    channel=channel,
                )
            transport = open_transport(stream, channel=channel, send_timeout=self._send_timeout)
            if self._integrity:
                # Checksums promise that a cut stream is found, TCP's too: a relay (socat,
                # ssh -L, a TCP proxy) may pass a crashed sender's reset on as a plain
                # end, which right after a SYNC would pass for the end of the transfer.
                transport.ends_in_band = True
            features = Feature.CHECKSUMS if self._integrity else 0
            if transport.ends_in_band:
                features |= Feature.IN_BAND_END
            handshake = encode_handshake(
                Handshake(uuid=self.uuid, channel_id=channel, features=features)
            )
            # A TLS stream's own handshake runs inside this first send: a receiver that
            # accepted but never answers it stalls here, before any packet.
            tls = isinstance(stream, trio.SSLStream)
            await transport.send_parts(
                [handshake], "the TLS and multifd handshakes" if tls else "the handshake"
            )
            self.stats.channels[channel].bytes += HANDSHAKE_SIZE
            if self._method.compresses:
                encoder = self._method.new_encoder(self._level)
                if isinstance(transport, SocketTransport):
                    transport.lift_send_cap()
            logger.info("sender: channel %d connected", channel)
            crew = self._join(_Link(channel, transport, encoder, chain_start(handshake)))
            await self._all_connected.wait()
            if crew.links[0].channel == channel:
                crew.watch()
                await crew.worker.run(functools.partial(self._worker, crew.links), self._threads)
            else:
                # The crew's first channel runs the thread; its failure cancels this task.
                await crew.worker.done.wait()
            await transport.finish(self._send_timeout)
            await transport.aclose()
            logger.info("sender: channel %d done, receiver confirmed", channel)
        except MultiFDError as exc:
            # The receiver learns of the failure on the channel that failed before the
            # teardown closes the others (a stream ended between packets, a symptom):
            # its error then names the same channel.
            failed = transport
            if crew is not None:
                await crew.worker.released()
                failed = next(
                    (k.transport for k in crew.links if k.channel == exc.channel), failed
                )
            if failed is not None:
                await failed.reset()
            await self._supervisor.channel_failed(exc, channel)
            raise
        except Exception as exc:
            # A bug (a third-party encoder's, say), recorded before the cleanup's awaits:
            # there the teardown's Cancelled would replace it, and the application would
            # see only that its last round was never written.
            self._supervisor.fail(exc, channel=channel)
            raise
        except BaseException as exc:
            self._supervisor.interrupted(exc)
            raise
        finally:
            if crew is not None:
                await crew.worker.released()
            # A channel ends normally only after the final round: however it ended, the
            # transfer writes nothing more. Tasks waiting to queue or for a round are
            # woken now, not at the block's exit, which waits for the block's own tasks
            # (a shielded sync() in the application's cleanup would wait for ever).
            self._close()
            if encoder is not None:
                encoder.close()
            if transport is not None:
                await transport.reset()

    def _join(self, link: _Link) -> _Crew:
        slot = thread_slot(link.channel, link.transport, self._io_threads)
        crew = _Crew() if slot is None else self._crews.setdefault(slot, _Crew())
        crew.links.append(link)
        self._connected += 1
        if self._connected == self.channels:
            for shared in self._crews.values():
                shared.links.sort(key=lambda link: link.channel)
            self._all_connected.set()
        return crew

    def _header(
        self,
        link: _Link,
        flags: int,
        raw_name: bytes,
        normal: Sequence[int],
        zero: Sequence[int],
        payload_size: int,
        checksum: int,
    ) -> bytes:
        data = pack_packet_header(
            flags=flags | self._checksum_flag,
            pages_alloc=self._page_count,
            normal_pages=len(normal),
            next_packet_size=payload_size,
            packet_num=next(self._packet_num) % 2**64,
            zero_pages=len(zero),
            raw_name=raw_name,
            offsets=[*normal, *zero] if normal and zero else normal or zero,
            payload_checksum=checksum,
        )
        if not self._integrity:
            return data
        sealed = seal_header(data, link.chain)
        link.chain = stored_header_checksum(sealed)
        return sealed

    def _prepare(
        self, link: _Link, block: RAMBlock, offsets: Sequence[int]
    ) -> tuple[list[Run], list[Run], list[Buffer], int]:
        """Split off zero pages, build the payload and its checksum (in a worker
        thread)."""
        view, size, encoder = block.view, self.page_size, link.encoder
        runs = page_runs(offsets, size)
        try:
            make_present(block, runs, write=False)
        except MappingError as exc:
            exc.channel = link.channel
            raise
        normal, zero = split_zero_runs(view, runs, size) if self._detect_zero else (runs, [])
        pages = [view[start : start + n] for start, n in normal]
        payload: list[Buffer]
        if not normal:
            payload = []
        elif encoder is not None:
            payload = [self._encode(encoder, pages)]
        elif self._integrity:
            # The checksum must cover exactly the bytes sent, but the application may
            # change a page while it is in flight: checksum and send one copy.
            payload = [b"".join(pages)]
        else:
            payload = [*pages]
        checksum = payload_checksum(payload) if self._integrity else 0
        return normal, zero, payload, checksum

    def _encode(self, encoder: Encoder, pages: list[memoryview]) -> Buffer:
        """The encoder's payload, checked as the receiver will check it: a method's bug
        is raised here, not taken by the receiver for a fault of this sender's."""
        payload = encoder.encode(pages)
        method = self._method
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"compression method {method.name!r}: encode returned"
                f" {type(payload).__name__}, not bytes, bytearray or memoryview"
            )
        page_bytes = sum(len(page) for page in pages)
        bound = method.payload_bound(page_bytes)
        size = len(payload)
        if not 1 <= size <= bound:
            raise ValueError(
                f"compression method {method.name!r}: encode returned {size} bytes for"
                f" {page_bytes} bytes of pages, outside 1..{bound} (its payload_bound)"
            )
        return payload

    def _worker(self, links: list[_Link]) -> None:
        """The packet loop of a worker thread and its channels, until the final SYNC."""
        # Packets go to the thread's channels in turn (passing over a full one); a SYNC
        # round to all of them.
        turns = Turns([(link.transport, link) for link in links])
        while True:
            job = self._next_job(links)
            if isinstance(job, PageBatch):
                self._send_batch(turns.next(), job)
                continue
            for link in links:
                self._send_sync(link, job)
            with job.lock:
                last = job.write(len(links))
            if last:
                job.all_written.set()
                self._token.run_sync_soon(job.written.set)
            # Wait for the round before taking another job, so every channel takes
            # exactly one of the round's SYNC tokens.
            while not job.all_written.wait(CANCEL_CHECK):
                trio.from_thread.check_cancelled()
            if job.closing:
                return

    def _next_job(self, links: list[_Link]) -> PageBatch | _SyncRound:
        while True:
            trio.from_thread.check_cancelled()
            job = self._jobs.take(CANCEL_CHECK, len(links))
            if job is not None:
                return job
            # An idle channel still notices a receiver that failed, so the application
            # learns of it without sending anything.
            for link in links:
                link.transport.check_peer_sync()

    def _send_batch(self, link: _Link, batch: PageBatch) -> None:
        block = batch.block
        page_size = self.page_size
        normal, zero, payload, checksum = self._prepare(link, block, batch.offsets)
        normal_offsets = run_offsets(normal, page_size)
        zero_offsets = run_offsets(zero, page_size)
        size = sum(len(p) for p in payload)
        header = self._header(
            link,
            self._method.flag,
            block.name.encode(),
            normal_offsets,
            zero_offsets,
            size,
            checksum,
        )
        try:
            link.transport.send_parts_sync([header, *payload])
        except TransportError as exc:
            raise_mapping_fault(block, normal, write=False, exc=exc)
        stats = self.stats.channels[link.channel]
        stats.packets += 1
        stats.normal_pages += len(normal_offsets)
        stats.zero_pages += len(zero_offsets)
        stats.page_bytes += len(batch.offsets) * page_size
        stats.bytes += len(header) + size

    def _send_sync(self, link: _Link, job: _SyncRound) -> None:
        flags = Flag.SYNC
        if job.final_round:
            flags |= Flag.FINAL_ROUND
        if job.closing:
            # The receiver's close after this SYNC confirms delivery; one already here
            # (say, a crashed receiver with nothing unread: a FIN, not a reset) would pass
            # for it. Only sockets can tell without reading.
            link.transport.check_peer_sync("the sender was about to write its final SYNC")
            if link.transport.ends_in_band:
                flags |= Flag.END_OF_STREAM
        header = self._header(link, int(flags), b"", [], [], 0, self._empty_checksum)
        link.transport.send_parts_sync([header])
        stats = self.stats.channels[link.channel]
        stats.packets += 1
        stats.syncs += 1
        stats.bytes += len(header)


@asynccontextmanager
async def open_sender(
    connect: Connector,
    *,
    channels: int = 2,
    uuid: uuid_mod.UUID | None = None,
    compression: str = "none",
    compression_level: int | None = None,
    page_size: int = 4096,
    zero_page_detection: str = "multifd",
    send_timeout: float | None = 60.0,
    integrity: bool = False,
    io_threads: int | None = None,
) -> AsyncIterator[Sender]:
    """Open the sending end of a transfer over ``channels`` parallel streams.

    Calls ``connect(channel_id)`` once per channel (concurrently), sends each channel's
    handshake, and yields once every channel is up. On a normal exit the queued pages are
    flushed, a final SYNC round is sent, every channel is half-closed and the receiver's
    clean close awaited (the delivery confirmation): nothing queued is lost, and success
    means the receiver completed every round.

    Args:
        connect: ``async connect(channel_id) -> trio.abc.Stream``; any stream works (TCP,
            Unix sockets, TLS, memory streams). A :class:`trio.SocketStream` takes a
            zero-copy path.
        channels: How many parallel channels (1..255).
        uuid: The transfer's id, sent in every handshake; ``None`` for a fresh
            :func:`uuid.uuid4`.
        compression: ``"none"``, ``"zlib"``, ``"zstd"`` or a registered method's name.
        compression_level: The method's level (zlib 0-9, zstd 0-20; default 1); ``None``
            for the default. A level for ``"none"`` is an error.
        page_size: Bytes per page (a power of two, 512 bytes to 512 KiB).
        zero_page_detection: ``"multifd"`` sends all-zero pages as offsets only (QEMU
            9.0's ``zero-page-detection=multifd``); ``"none"`` sends them as data. Use
            ``"none"`` when the receiver is a QEMU older than 9.0, which ignores the
            ``zero_pages`` field and would keep stale data in those pages.
        send_timeout: Seconds a socket channel may go without the peer accepting a byte
            (other streams: seconds one packet may take, the first one a TLS stream's
            handshake included), and how long the exit waits for
            the receiver's confirmation; ``None`` waits forever.
        integrity: End-to-end xxh3-64 checksums of every header and payload (a
            trio_multifd extension, announced in the handshake; the receiver must be
            opened with the same setting). Pages are copied once per packet so the
            checksum covers exactly what is sent. Every channel's end then comes in
            band, TCP's too (its final SYNC flags it): a clean close before it is a
            failure at the receiver (this process killed, its kernel's plain FIN, or
            what a relay made of a reset), which without checksums passes there for
            the end of the transfer. The checksums find damage, not a forger: they are
            not keyed (use TLS for that). With ``False`` the stream is byte-identical
            to QEMU's.
        io_threads: How many worker threads move the packets of the channels over
            sockets (channel ``c`` goes to thread ``c % io_threads``; other streams get a
            thread each); ``None`` for one per core with compression, else half the
            cores (at least one).

    Raises:
        ValueError: A bad argument (channel count, method, level, page size, a
            ``send_timeout`` that is not positive).
        TypeError: An argument of the wrong type (a ``uuid`` that is not a
            :class:`uuid.UUID`, a channel count, ``io_threads``, level or page size that
            is not an int, a method name not a str, a ``send_timeout`` that is neither
            a real number nor ``None``).
        MultiFDError: The transfer failed; the subclass and its ``channel`` say where.
    """
    sender = Sender(
        connect,
        channels=channels,
        uuid=uuid,
        compression=compression,
        compression_level=compression_level,
        page_size=page_size,
        zero_page_detection=zero_page_detection,
        send_timeout=send_timeout,
        integrity=integrity,
        io_threads=io_threads,
    )
    async with sender._supervisor.run(sender._start, sender._finish):
        yield sender
