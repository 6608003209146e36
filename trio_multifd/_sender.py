"""The sending end: :func:`open_sender`, :class:`Sender` and its channel tasks.

QEMU's sender hands full page batches to idle channel threads through semaphores
(``channels_ready``, ``sem``, ``pending_job``) and waits on ``sem_sync`` for SYNC. Here:

- each channel task hands its packet loop to a worker thread of its own (sendmsg,
  zlib and zstd release the GIL, so channels move and compress on several cores); jobs
  reach the threads through one thread-safe queue, which every channel thread reads: a
  full batch goes to whichever channel is idle first (the ``channels_ready`` scan);
- ``channels + 1`` batches travelling main -> job queue -> channel thread -> pool and
  back empty: QEMU's batch swap, no allocation per packet, and queueing waits for an
  empty batch while every channel is busy (backpressure, bounded memory); the Trio side
  waits on a ``trio.Event`` that a channel thread sets through the Trio token only when
  someone waits;
- a SYNC round is ``channels`` tokens in the same job queue; a channel that took one
  writes its SYNC packet and waits for the round before taking another job, so every
  channel takes exactly one;
- a :class:`~trio_multifd._supervisor.Supervisor` for teardown.
"""

from __future__ import annotations

import collections
import functools
import itertools
import operator
import queue
import threading
import uuid as uuid_mod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import final

import attrs
import trio

from ._block import RAMBlock
from ._errors import MultiFDError, TransportError
from ._methods import Encoder, Method, get_method
from ._pages import PageBatch, page_runs, split_zero_pages
from ._stats import TransferStats
from ._supervisor import Supervisor, logger
from ._transport import CANCEL_CHECK, Transport, open_transport
from ._wire import (
    Feature,
    Flag,
    Handshake,
    PacketHeader,
    encode_handshake,
    encode_packet_header,
    page_count_for,
    payload_checksum,
    seal_header,
)

Buffer = bytes | bytearray | memoryview

__all__ = ["Connector", "Sender", "open_sender"]

Connector = Callable[[int], Awaitable[trio.abc.Stream]]
"""The type of ``connect``: an async function that takes a channel id and returns an
open ``trio.abc.Stream`` for that channel (e.g. ``trio.open_tcp_stream`` to an address
chosen by the id, or a ``trio.SSLStream`` around one)."""

_ZERO_PAGE_MODES = ("multifd", "none")


@attrs.define(eq=False)
class _SyncRound:
    number: int
    final: bool
    remaining: int
    final_round: bool
    # Set by the channel thread that writes the round's last SYNC packet: the threading
    # event releases the other channel threads, the Trio event the application.
    written: trio.Event = attrs.Factory(trio.Event)
    all_written: threading.Event = attrs.Factory(threading.Event)
    lock: threading.Lock = attrs.Factory(threading.Lock)


@final
class _BatchPool:
    """The empty batches: given back by channel threads, taken by the Trio side.

    Its fixed size bounds memory, and taking waits while every batch is queued or in
    flight (every channel busy). A batch given back wakes the Trio side only when it
    waits, so the common case costs no trip through Trio's scheduler.
    """

    def __init__(self, count: int, token: trio.lowlevel.TrioToken) -> None:
        self._free = collections.deque(PageBatch() for _ in range(count))
        self._lock = threading.Lock()
        self._waiter: trio.Event | None = None
        self._token = token

    def put(self, batch: PageBatch) -> None:
        """Give back an emptied batch (any thread)."""
        with self._lock:
            self._free.append(batch)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._token.run_sync_soon(waiter.set)

    async def take(self) -> PageBatch:
        """Take an empty batch, waiting for one (the Trio side)."""
        while True:
            with self._lock:
                if self._free:
                    return self._free.popleft()
                self._waiter = waiter = trio.Event()
            await waiter.wait()


@final
class Sender:
    """The sending end of a transfer; made by :func:`open_sender`.

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
    ) -> None:
        if not isinstance(channels, int) or not 1 <= channels <= 255:
            raise ValueError(f"channels must be 1..255, got {channels!r}")
        if uuid is not None and not isinstance(uuid, uuid_mod.UUID):
            raise TypeError(f"uuid must be a uuid.UUID or None, got {type(uuid).__name__}")
        if zero_page_detection not in _ZERO_PAGE_MODES:
            raise ValueError(
                f"zero_page_detection must be one of {_ZERO_PAGE_MODES}, got"
                f" {zero_page_detection!r}"
            )
        if send_timeout is not None and not send_timeout > 0:
            raise ValueError(f"send_timeout must be positive or None, got {send_timeout!r}")
        self._method: Method = get_method(compression)
        self._level = self._method.check_level(compression_level)
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
        self._supervisor = Supervisor("sender")
        # Jobs go to the channel threads through a thread-safe queue (no Trio round trip
        # per packet); empty batches come back through the pool, whose fixed size bounds
        # memory and makes queueing wait while every channel is busy.
        self._jobs: queue.SimpleQueue[PageBatch | _SyncRound] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._pool = _BatchPool(2 * channels + 1, self._token)
        self._batch = PageBatch()
        self._packet_num = itertools.count()
        self._rounds = 0
        self._connected = 0
        self._all_connected = trio.Event()
        self._closing = False
        # One worker thread per channel moves (and compresses) its packets: sendmsg,
        # zlib and zstd release the GIL, so N channels use up to N cores.
        self._threads = trio.CapacityLimiter(channels)

    # -- the application's side -------------------------------------------------------------

    def _check(self, block: RAMBlock) -> None:
        if not isinstance(block, RAMBlock):
            raise TypeError(f"block must be a RAMBlock, got {type(block).__name__}")
        if block.page_size != self.page_size:
            raise ValueError(
                f"block {block.name!r} has page_size {block.page_size}, the sender uses"
                f" {self.page_size}"
            )
        if self._closing:
            raise RuntimeError("the sender is closing: no page can be queued")

    async def queue_page(self, block: RAMBlock, offset: int) -> None:
        """Queue the page at byte ``offset`` of ``block``.

        The page is not copied: it is read when its packet is sent, at the latest before
        the next :meth:`sync` returns. Waits while every channel is busy.

        Raises:
            ValueError: ``offset`` is not a page-aligned offset in the block, or the
                block's page size differs from the sender's.
            TypeError: ``block`` is not a :class:`RAMBlock`.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check(block)
        block.check_offset(offset)
        await self._add(block, (offset,))

    async def queue_pages(self, block: RAMBlock, offsets: Iterable[int]) -> None:
        """Queue many pages of ``block`` at once (a ``range`` or any iterable of offsets).

        Costs no Python-level await per page: pages are appended a packet at a time.
        Offsets are checked a packet at a time, so on a bad offset the packets before
        it are already queued.

        Raises:
            ValueError: An offset is not a page-aligned offset in the block.
            TypeError: ``block`` is not a :class:`RAMBlock`.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check(block)
        if isinstance(offsets, range):
            await self._queue_range(block, offsets)
            return
        iterator = iter(offsets)
        while True:
            room = self._page_count - len(self._batch.offsets)
            if self._batch.block is not block:
                room = self._page_count
            chunk = list(itertools.islice(iterator, room))
            if not chunk:
                return
            self._check_offsets(block, chunk)
            await self._add(block, chunk)

    async def _queue_range(self, block: RAMBlock, offsets: range) -> None:
        # A range is checked once, by its ends and step, and cut into packets by
        # slicing: the sequential scan of a whole block costs O(packets), not O(pages).
        if not offsets:
            return
        if offsets.step % self.page_size:
            raise ValueError(
                f"block {block.name!r}: a range step of {offsets.step} is not a multiple of"
                f" the page size {self.page_size}"
            )
        block.check_offset(offsets[0])
        block.check_offset(offsets[-1])
        position = 0
        while position < len(offsets):
            room = self._page_count - len(self._batch.offsets)
            if self._batch.block is not block:
                room = self._page_count
            await self._add(block, offsets[position : position + room])
            position += room

    def _check_offsets(self, block: RAMBlock, chunk: list[int]) -> None:
        low, high = min(chunk), max(chunk)
        aligned = not functools.reduce(operator.or_, chunk) % self.page_size
        if low < 0 or high > block.size - self.page_size or not aligned:
            bad = next(
                o for o in chunk if o < 0 or o > block.size - self.page_size or o % self.page_size
            )
            block.check_offset(bad)

    async def _add(self, block: RAMBlock, offsets: Iterable[int]) -> None:
        batch = self._batch
        if batch.block is not block:
            if batch.offsets:
                await self._flush()
                batch = self._batch
            batch.block = block
        batch.offsets.extend(offsets)
        if len(batch.offsets) >= self._page_count:
            await self._flush()

    async def _flush(self) -> None:
        batch = self._batch
        if not batch.offsets:
            return
        self._jobs.put(batch)
        self._batch = await self._pool.take()

    async def sync(self, *, final_round: bool = False) -> int:
        """Flush the queued pages and send a SYNC packet on every channel.

        Returns when every channel has written its SYNC packet into its stream (for
        sockets: into the kernel). The receiver's round with the same number completes
        once it has every page queued before this call.

        Args:
            final_round: Mark this round as the last of a pre-copy migration (flag
                ``FINAL_ROUND`` on its SYNC packets, which QEMU ignores); the receiver
                records it in :attr:`Receiver.final_round`.

        Returns:
            The round number: 1 for the first call, then 2, ...
        """
        return await self._sync(final=False, final_round=final_round)

    async def _sync(self, *, final: bool, final_round: bool = False) -> int:
        await self._flush()
        self._rounds += 1
        sync_round = _SyncRound(self._rounds, final, self.channels, final_round)
        for _ in range(self.channels):
            self._jobs.put(sync_round)
        await sync_round.written.wait()
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
        # tasks then wait for the receiver to confirm and end.
        await self._sync(final=True)
        self._closing = True

    # -- channel tasks ------------------------------------------------------------------------

    async def _run_channel(self, channel: int) -> None:
        transport: Transport | None = None
        encoder: Encoder | None = None
        try:
            try:
                stream = await self._connect(channel)
            except (OSError, trio.BrokenResourceError) as exc:
                raise TransportError(f"could not connect: {exc!r}", channel=channel) from exc
            transport = open_transport(stream, channel=channel, send_timeout=self._send_timeout)
            features = Feature.CHECKSUMS if self._integrity else 0
            handshake = Handshake(uuid=self.uuid, channel_id=channel, features=features)
            await transport.send_parts([encode_handshake(handshake)])
            self.stats.channels[channel].bytes += 64
            if self._method.compresses:
                encoder = self._method.new_encoder(self._level)
            logger.info("sender: channel %d connected", channel)
            self._connected += 1
            if self._connected == self.channels:
                self._all_connected.set()
            await trio.to_thread.run_sync(
                self._channel_thread, channel, transport, encoder, limiter=self._threads
            )
            await transport.finish(self._send_timeout)
            await transport.aclose()
            logger.info("sender: channel %d done, receiver confirmed", channel)
        except MultiFDError as exc:
            await self._supervisor.channel_failed(exc, channel)
            raise
        finally:
            if encoder is not None:
                encoder.close()
            if transport is not None:
                await transport.reset()

    def _header(
        self,
        flags: int,
        block_name: str,
        normal: list[int],
        zero: list[int],
        payload_size: int,
        checksum: int,
    ) -> bytes:
        if self._integrity:
            flags |= Flag.CHECKSUMS
        data = encode_packet_header(
            PacketHeader(
                flags=flags,
                pages_alloc=self._page_count,
                normal_pages=len(normal),
                next_packet_size=payload_size,
                packet_num=next(self._packet_num) % 2**64,
                zero_pages=len(zero),
                block_name=block_name,
                offsets=(*normal, *zero),
                payload_checksum=checksum,
            )
        )
        return seal_header(data) if self._integrity else data

    def _prepare(
        self, block: RAMBlock, offsets: list[int], encoder: Encoder | None
    ) -> tuple[list[int], list[int], list[Buffer], int]:
        """Split off zero pages, build the payload and its checksum (in the channel's
        worker thread)."""
        view, size = block.view, self.page_size
        if self._detect_zero:
            normal, zero = split_zero_pages(view, offsets, size)
        else:
            normal, zero = offsets, []
        runs = [view[start : start + n] for start, n in page_runs(normal, size)]
        payload: list[Buffer]
        if not normal:
            payload = []
        elif encoder is not None:
            payload = [encoder.encode(runs)]
        elif self._integrity:
            # The checksum must cover exactly the bytes sent, but the application may
            # change a page while it is in flight: checksum and send one copy.
            payload = [b"".join(runs)]
        else:
            payload = [*runs]
        checksum = payload_checksum(payload) if self._integrity else 0
        return normal, zero, payload, checksum

    def _channel_thread(self, channel: int, transport: Transport, encoder: Encoder | None) -> None:
        """A channel's packet loop, in its worker thread, until the final SYNC."""
        while True:
            job = self._next_job(transport)
            if isinstance(job, PageBatch):
                self._send_batch(channel, transport, encoder, job)
                job.clear()
                self._pool.put(job)
                continue
            self._send_sync(channel, transport, job)
            with job.lock:
                job.remaining -= 1
                last = not job.remaining
            if last:
                job.all_written.set()
                self._token.run_sync_soon(job.written.set)
            # Wait for the round before taking another job, so every channel takes
            # exactly one of the round's SYNC tokens.
            while not job.all_written.wait(CANCEL_CHECK):
                trio.from_thread.check_cancelled()
            if job.final:
                return

    def _next_job(self, transport: Transport) -> PageBatch | _SyncRound:
        while True:
            trio.from_thread.check_cancelled()
            try:
                return self._jobs.get(timeout=CANCEL_CHECK)
            except queue.Empty:
                # An idle channel still notices a receiver that failed, so the
                # application learns of it without sending anything.
                transport.check_peer_sync()

    def _send_batch(
        self, channel: int, transport: Transport, encoder: Encoder | None, batch: PageBatch
    ) -> None:
        block = batch.block
        assert block is not None
        normal, zero, payload, checksum = self._prepare(block, batch.offsets, encoder)
        size = sum(len(p) for p in payload)
        header = self._header(self._method.flag, block.name, normal, zero, size, checksum)
        transport.send_parts_sync([header, *payload])
        stats = self.stats.channels[channel]
        stats.packets += 1
        stats.normal_pages += len(normal)
        stats.zero_pages += len(zero)
        stats.page_bytes += (len(normal) + len(zero)) * self.page_size
        stats.bytes += len(header) + size

    def _send_sync(self, channel: int, transport: Transport, job: _SyncRound) -> None:
        flags = Flag.SYNC
        if job.final_round:
            flags |= Flag.FINAL_ROUND
        if job.final and not transport.can_half_close:
            # No half-close (TLS): the receiver learns the stream's end in band.
            flags |= Flag.END_OF_STREAM
        header = self._header(int(flags), "", [], [], 0, self._empty_checksum)
        transport.send_parts_sync([header])
        stats = self.stats.channels[channel]
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
) -> AsyncIterator[Sender]:
    """Open the sending end of a transfer over ``channels`` parallel streams.

    Calls ``connect(channel_id)`` once per channel (concurrently), sends each channel's
    handshake, and yields once every channel is up. On a normal exit the queued pages are
    flushed, a final SYNC round is sent, every channel is half-closed and the receiver's
    clean close awaited (the delivery confirmation): nothing queued is lost, and success
    means the receiver completed every round.

    Args:
        connect: ``async connect(channel_id) -> trio.abc.Stream``; any stream works (TCP,
            Unix sockets, TLS, memory streams). Socket streams take a zero-copy path.
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
            (other streams: seconds one packet may take), and how long the exit waits for
            the receiver's confirmation; ``None`` waits forever.
        integrity: End-to-end xxh3-64 checksums of every header and payload (a
            trio_multifd extension, announced in the handshake; the receiver must be
            opened with the same setting). Pages are copied once per packet so the
            checksum covers exactly what is sent. With ``False`` the stream is
            byte-identical to QEMU's.

    Raises:
        ValueError: A bad argument (channel count, method, level, page size).
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
    )
    async with sender._supervisor.run(sender._start, sender._finish):
        yield sender
