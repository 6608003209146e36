"""What sits between a sender and a receiver in the fault tests: links that keep every
stream they make (so a test can check the library closed it), a stream that rewrites
bytes in flight, a TCP proxy that cuts one channel at an exact byte, and a harness that
runs a transfer expected to fail and reports what each end raised."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, Self

import attrs
import trio
import trio.testing

import trio_multifd as m

from .helpers import PAGE, TrackedStream, close_all

HEADER = m.header_size(128)
"""A packet header's length with 4 KiB pages (128 offset slots)."""
FILL = 0xA5
"""The byte :func:`pattern` fills targets with."""


def damaged_pages(source: memoryview, target: memoryview) -> list[int]:
    """Pages of ``target`` that are neither untouched (the fill) nor the source's page."""
    fill = bytes([FILL]) * PAGE
    damaged = []
    for page in range(len(target) // PAGE):
        got = target[page * PAGE : (page + 1) * PAGE]
        if got != fill and got != source[page * PAGE : (page + 1) * PAGE]:
            damaged.append(page)
    return damaged


class TamperStream(TrackedStream):
    """Forwards a sender's channel and rewrites its handshake or one packet header in
    flight, framing the stream as a receiver would (so the fault lands exactly there).

    ``handshake(raw)`` may patch the 64 handshake bytes in place. ``header(raw, parsed)``
    sees each packet header (``parsed`` is what the sender meant) and patches ``raw`` in
    place, returning ``True`` once it did: later headers pass unchanged.
    """

    def __init__(
        self,
        inner: trio.abc.Stream,
        *,
        handshake: Callable[[bytearray], None] | None = None,
        header: Callable[[bytearray, m.PacketHeader], bool] | None = None,
    ) -> None:
        super().__init__(inner)
        self._handshake = handshake
        self._header = header
        self._pending = bytearray()
        self._state = "handshake"
        self._payload_left = 0
        self.tampered = False

    def _frame(self) -> bytearray:
        out = bytearray()
        pending = self._pending
        while True:
            if self._state == "handshake":
                if len(pending) < m.HANDSHAKE_SIZE:
                    break
                raw = bytearray(pending[: m.HANDSHAKE_SIZE])
                del pending[: m.HANDSHAKE_SIZE]
                if self._handshake is not None:
                    self._handshake(raw)
                    self.tampered = True
                out += raw
                self._state = "header"
            elif self._state == "header":
                if len(pending) < HEADER:
                    break
                raw = bytearray(pending[:HEADER])
                del pending[:HEADER]
                parsed = m.decode_packet_header(raw, page_count=128)
                if self._header is not None and not self.tampered:
                    self.tampered = self._header(raw, parsed)
                out += raw
                if parsed.normal_pages:
                    self._payload_left = parsed.next_packet_size
                    self._state = "payload"
            else:
                take = min(self._payload_left, len(pending))
                if not take:
                    break
                out += pending[:take]
                del pending[:take]
                self._payload_left -= take
                if not self._payload_left:
                    self._state = "header"
        return out

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._pending += data
        out = self._frame()
        if out:
            await self.inner.send_all(out)
        else:
            await trio.lowlevel.checkpoint()


Wrap = Callable[[int, trio.abc.Stream], trio.abc.Stream]


class TcpLink:
    """Loopback TCP for one transfer: the receiver's own listener (127.0.0.1, port 0),
    a sender ``connect`` and an ``accept`` that keep every socket stream they made, so a
    test can check that the library closed each one (``fileno() == -1``).

    Use as ``async with TcpLink.open() as link``; leaving closes the listener and any
    stream still open, so a failed assertion leaks nothing either.

    Attributes:
        route: Channel id -> port to connect to instead of the listener (a proxy).
        sndbuf: ``SO_SNDBUF`` for the sender's sockets, to make a stalled peer felt soon.
    """

    def __init__(self, listener: trio.SocketListener, wrap: Wrap | None) -> None:
        self.listener = listener
        self.port: int = listener.socket.getsockname()[1]
        self.wrap = wrap
        self.route: dict[int, int] = {}
        self.sndbuf: int | None = None
        self.sender_streams: list[trio.SocketStream] = []
        self.receiver_streams: list[trio.SocketStream] = []
        self.extra_streams: list[trio.SocketStream] = []
        # Each accepted stream's peer address, recorded while it still has one.
        self._peers: dict[int, object] = {}

    @classmethod
    @asynccontextmanager
    async def open(cls, wrap: Wrap | None = None) -> AsyncIterator[TcpLink]:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        link = cls(listeners[0], wrap)
        try:
            yield link
        finally:
            await close_all(
                link.listener, *link.sender_streams, *link.receiver_streams, *link.extra_streams
            )

    async def raw_connect(self) -> trio.SocketStream:
        """A connection the test itself drives (not checked, but closed at the end)."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        self.extra_streams.append(stream)
        return stream

    async def connect(self, channel: int) -> trio.abc.Stream:
        stream = await trio.open_tcp_stream("127.0.0.1", self.route.get(channel, self.port))
        self.sender_streams.append(stream)
        if self.sndbuf is not None:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        return self.wrap(channel, stream) if self.wrap else stream

    async def accept(self) -> trio.abc.Stream:
        stream = await self.listener.accept()
        self.receiver_streams.append(stream)
        self._peers[id(stream)] = _peer(stream)
        return stream

    def all_closed(self, side: Literal["sender", "receiver"]) -> bool:
        """Whether every socket of that side's streams is closed."""
        streams = self.sender_streams if side == "sender" else self.receiver_streams
        return all(s.socket.fileno() == -1 for s in streams)

    async def wait_read(self, peer: trio.SocketStream, *, within: float = 1.0) -> None:
        """Wait (at most ``within`` s) until the receiver has accepted the stream whose
        other end is ``peer`` and read every byte sent on it so far."""
        address = peer.socket.getsockname()
        with trio.move_on_after(within):
            while True:
                mine = [s for s in self.receiver_streams if _peer(s) == address]
                if mine and not unread_bytes(mine[0]):
                    return
                await trio.sleep(0.005)

    async def wait_closed(self, address: object, *, within: float = 1.0) -> None:
        """Wait (at most ``within`` s) until the receiver has closed the stream it
        accepted from ``address``: until it has reacted, not only until a reset reached
        that stream (after which its peer name is gone)."""
        with trio.move_on_after(within):
            while True:
                mine = [s for s in self.receiver_streams if self._peers.get(id(s)) == address]
                if mine and all(s.socket.fileno() == -1 for s in mine):
                    return
                await trio.sleep(0.005)


def _peer(stream: trio.SocketStream) -> object:
    try:
        return stream.socket.getpeername()
    except OSError:  # closed, or reset by the peer
        return None


def unread_bytes(stream: trio.SocketStream) -> int:
    """Bytes in the socket's receive queue that the application has not read yet."""
    try:
        raw = fcntl.ioctl(stream.socket.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:  # closed meanwhile: nothing left to read
        return 0
    count: int = struct.unpack("i", raw)[0]
    return count


class MemoryLink:
    """The same as :class:`TcpLink` over ``trio.testing.memory_stream_pair``: every end
    is a :class:`TrackedStream`, so closing shows."""

    def __init__(self, wrap: Wrap | None = None) -> None:
        self.wrap = wrap
        self.sender_streams: list[TrackedStream] = []
        self.receiver_streams: list[TrackedStream] = []
        self._accept_send, self._accept_receive = trio.open_memory_channel[TrackedStream](100)

    @classmethod
    @asynccontextmanager
    async def open(cls, wrap: Wrap | None = None) -> AsyncIterator[MemoryLink]:
        yield cls(wrap)

    async def raw_connect(self) -> TrackedStream:
        """A connection the test itself drives (not checked)."""
        await trio.lowlevel.checkpoint()
        ours, theirs = trio.testing.memory_stream_pair()
        self._accept_send.send_nowait(TrackedStream(theirs))
        return TrackedStream(ours)

    async def connect(self, channel: int) -> trio.abc.Stream:
        stream = await self.raw_connect()
        self.sender_streams.append(stream)
        return self.wrap(channel, stream) if self.wrap else stream

    async def accept(self) -> trio.abc.Stream:
        stream = await self._accept_receive.receive()
        self.receiver_streams.append(stream)
        return stream

    def all_closed(self, side: Literal["sender", "receiver"]) -> bool:
        streams = self.sender_streams if side == "sender" else self.receiver_streams
        return all(s.closed for s in streams)


Link = TcpLink | MemoryLink

TRANSFER_UUID = uuid.UUID(int=0x5EED)


@attrs.define
class Outcome:
    """What each end of a faulty transfer raised (``None``: it succeeded)."""

    sender: BaseException | None = None
    receiver: BaseException | None = None
    added: list[BaseException] = attrs.Factory(list)
    """The exceptions ``receiver.add_channel`` raised."""
    receiver_object: m.Receiver | None = None
    """The receiver, for its stats after the end."""
    sender_closed: bool = False
    """Every stream the sender opened was closed when its ``async with`` ended."""
    receiver_closed: bool = False
    """Every stream the receiver accepted was closed when its ``async with`` ended."""


async def queue_everything(sources: Sequence[m.RAMBlock], sender: m.Sender) -> None:
    for block in sources:
        await sender.queue_pages(block, range(0, block.size, PAGE))
    await sender.sync()


async def run_faulty_transfer(
    link: Link,
    sources: Sequence[m.RAMBlock],
    targets: Sequence[m.RAMBlock],
    *,
    channels: int = 2,
    accept: int | None = None,
    body: Callable[[m.Sender], Awaitable[None]] | None = None,
    sender_options: dict[str, Any] | None = None,
    receiver_options: dict[str, Any] | None = None,
    patience: float = 5.0,
) -> Outcome:
    """Run a sender and a receiver over ``link`` where something is expected to fail.

    The receiver accepts ``accept`` (default: ``channels``) connections and hands each to
    ``add_channel`` in turn, then waits for the end. The sender runs ``body`` (default:
    queue every page, then ``sync``), then waits (at most ``patience`` seconds) for the
    receiver to finish before leaving its block, so its exit meets the receiver's
    verdict: a failed receiver must show up as a :class:`MultiFDError` there.
    Only :class:`MultiFDError` is caught; anything else fails the test.
    """
    outcome = Outcome()
    receiver_done = trio.Event()
    receiver_options = {"uuid": TRANSFER_UUID, **(receiver_options or {})}
    sender_options = {"uuid": TRANSFER_UUID, **(sender_options or {})}
    count = channels if accept is None else accept
    receiver_ready = trio.Event()

    async def receive() -> None:
        try:
            async with m.open_receiver(targets, channels=channels, **receiver_options) as receiver:
                outcome.receiver_object = receiver
                receiver_ready.set()
                for _ in range(count):
                    stream = await link.accept()
                    try:
                        await receiver.add_channel(stream)
                    except m.MultiFDError as exc:
                        outcome.added.append(exc)
                        raise
                await receiver.wait_closed()
        except m.MultiFDError as exc:
            outcome.receiver = exc
        finally:
            outcome.receiver_closed = link.all_closed("receiver")
            receiver_done.set()

    async def send() -> None:
        try:
            async with m.open_sender(link.connect, channels=channels, **sender_options) as sender:
                await (body or (lambda s: queue_everything(sources, s)))(sender)
                with trio.move_on_after(patience):
                    await receiver_done.wait()
        except m.MultiFDError as exc:
            outcome.sender = exc
        finally:
            outcome.sender_closed = link.all_closed("sender")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await receiver_ready.wait()
        nursery.start_soon(send)
    return outcome


# -- The cutting proxy -----------------------------------------------------------------------


@attrs.frozen
class At:
    """A byte position in a sender's channel stream: ``offset`` bytes into its
    ``index``-th ``part`` (0-based). ``"stream"`` counts from the first byte,
    ``"header"`` counts every packet header, ``"payload"`` the payloads, ``"sync"`` the
    SYNC packets' headers. ``At("header", 1)`` is the boundary after the first packet."""

    part: Literal["stream", "handshake", "header", "payload", "sync"]
    index: int = 0
    offset: int = 0


class StreamMap:
    """Where the handshake, packet headers and payloads of a channel stream lie, worked
    out from its bytes as they arrive (the framing a receiver uses)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.starts: dict[str, list[int]] = {"header": [], "payload": [], "sync": []}
        self._next = 0  # where the first structure not yet framed starts

    def feed(self, data: bytes | bytearray) -> None:
        self.data += data
        while True:
            if self._next == 0:
                if len(self.data) < m.HANDSHAKE_SIZE:
                    return
                self._next = m.HANDSHAKE_SIZE
            if len(self.data) < self._next + HEADER:
                return
            start = self._next
            header = m.decode_packet_header(self.data[start : start + HEADER], page_count=128)
            self.starts["header"].append(start)
            if header.is_sync:
                self.starts["sync"].append(start)
            self._next = start + HEADER
            if header.normal_pages:
                self.starts["payload"].append(self._next)
                self._next += header.next_packet_size

    def locate(self, at: At) -> int | None:
        """The absolute position of ``at``, or ``None`` while it is not known yet."""
        if at.part in ("stream", "handshake"):
            return at.offset
        starts = self.starts[at.part]
        return starts[at.index] + at.offset if at.index < len(starts) else None

    @property
    def safe(self) -> int:
        """Bytes that lie before any position not located yet."""
        return min(len(self.data), self._next)


class _Proxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_port``: :meth:`running` accepts
    connections and hands each, with its own upstream connection, to :meth:`_relay`;
    every socket is closed when the block ends, however it ends."""

    listener: trio.SocketListener
    """The proxy's own listener, from :meth:`running` on."""

    # The listener's receive buffer, when not the system's.
    _rcvbuf: int | None = None

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.sockets: list[trio.SocketStream] = []

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Self]:
        self.listener = listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        if self._rcvbuf is not None:
            listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf)
        self.port = listener.socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve, listener)
                yield self
                nursery.cancel_scope.cancel()
        finally:
            await close_all(listener, *self.sockets)

    async def _serve(self, listener: trio.SocketListener) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                client = await listener.accept()
                self.sockets.append(client)
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
                self.sockets.append(upstream)
                nursery.start_soon(self._relay, client, upstream)

    async def _relay(self, client: trio.SocketStream, upstream: trio.SocketStream) -> None:
        raise NotImplementedError

    async def _down(self, upstream: trio.SocketStream, client: trio.SocketStream) -> None:
        """Forward the receiver's bytes to the sender, its end of stream as one."""
        while data := await upstream.receive_some(64 * 1024):
            await client.send_all(data)
        await client.send_eof()


class CuttingProxy(_Proxy):
    """A TCP proxy on 127.0.0.1 for one channel: forwards both ways until exactly
    ``at`` bytes of the sender's stream have reached the receiver, then cuts.

    ``how="close"`` closes both sides (the receiver sees an orderly end of stream; the
    sender, whose unread bytes the proxy drops, a reset), ``how="reset"`` closes both
    with ``SO_LINGER`` 0 (a reset each way). Before cutting it waits for ``after`` (if
    given), then ``hold`` seconds, then (with ``link``) until the receiver has read every
    forwarded byte, so what the receiver sees does not depend on timing. A stream that
    ends before ``at`` is forwarded whole, end of stream included.

    Its listener's small receive buffer makes a sender held at the cut block soon.
    """

    _rcvbuf = 32 * 1024

    def __init__(
        self,
        target_port: int,
        at: At,
        how: Literal["close", "reset"],
        *,
        after: trio.Event | None = None,
        hold: float = 0.0,
        link: TcpLink | None = None,
    ) -> None:
        super().__init__(target_port)
        self.at = at
        self.how = how
        self.after = after
        self.hold = hold
        self.link = link
        self.reached = trio.Event()
        self.cut = trio.Event()
        self.forwarded = 0

    async def _relay(self, client: trio.SocketStream, upstream: trio.SocketStream) -> None:
        address = upstream.socket.getsockname()
        how = "close"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._down, upstream, client)
                if await self._up(client, upstream):
                    await self._before_cut(upstream)
                    nursery.cancel_scope.cancel()
                    how = self.how
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            how = "reset"  # a peer went away first: pass the failure on as a reset
        # The receiver's side first, and (with a link) the sender's only once the
        # receiver has reacted: else the sender's reaction (resetting its other
        # channels) could reach the receiver first, and what the receiver reports
        # would depend on timing.
        for stream in (upstream, client):
            if how == "reset" and stream.socket.fileno() != -1:
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await trio.aclose_forcefully(stream)
            if stream is upstream and self.link is not None and self.reached.is_set():
                await self.link.wait_closed(address)
        if self.reached.is_set():
            self.cut.set()

    async def _up(self, client: trio.SocketStream, upstream: trio.SocketStream) -> bool:
        """Forward the sender's bytes up to the cut; ``True`` once there."""
        stream_map = StreamMap()
        while True:
            cut = stream_map.locate(self.at)
            limit = min(stream_map.safe if cut is None else cut, len(stream_map.data))
            if self.forwarded < limit:
                await upstream.send_all(stream_map.data[self.forwarded : limit])
                self.forwarded = limit
                continue
            if cut is not None and self.forwarded == cut:
                return True
            data = await client.receive_some(64 * 1024)
            if not data:
                await upstream.send_eof()
                return False
            stream_map.feed(data)

    async def _before_cut(self, upstream: trio.SocketStream) -> None:
        self.reached.set()
        if self.after is not None:
            await self.after.wait()
        await trio.sleep(self.hold)
        if self.link is not None:
            await self.link.wait_read(upstream)


class InsertingProxy(_Proxy):
    """A TCP proxy on 127.0.0.1 for one channel that inserts ``extra`` bytes into the
    sender's stream right before ``at`` (as a faulty middlebox might) and otherwise
    relays faithfully: each end of stream is passed on as one, a peer's failure as a
    reset. ``inserted`` is set once the bytes are on their way to the receiver."""

    def __init__(self, target_port: int, at: At, extra: bytes) -> None:
        super().__init__(target_port)
        self.at = at
        self.extra = extra
        self.inserted = trio.Event()

    async def _relay(self, client: trio.SocketStream, upstream: trio.SocketStream) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._down, upstream, client)
                await self._up(client, upstream)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            for stream in (upstream, client):
                if stream.socket.fileno() != -1:
                    linger = struct.pack("ii", 1, 0)
                    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        await trio.aclose_forcefully(upstream)
        await trio.aclose_forcefully(client)

    async def _up(self, client: trio.SocketStream, upstream: trio.SocketStream) -> None:
        stream_map = StreamMap()
        sent = 0
        while data := await client.receive_some(64 * 1024):
            stream_map.feed(data)
            if not self.inserted.is_set():
                at = stream_map.locate(self.at)
                limit = stream_map.safe if at is None else min(at, len(stream_map.data))
                await upstream.send_all(stream_map.data[sent:limit])
                sent = limit
                if sent != at:
                    continue
                await upstream.send_all(self.extra)
                self.inserted.set()
            await upstream.send_all(stream_map.data[sent:])
            sent = len(stream_map.data)
        await upstream.send_all(stream_map.data[sent:])
        await upstream.send_eof()


class RecordingListener(trio.abc.Listener[trio.abc.Stream]):
    """A TCP listener that keeps every stream it accepted (for ``Receiver.serve``)."""

    def __init__(self, inner: trio.SocketListener) -> None:
        self.inner = inner
        self.accepted: list[trio.SocketStream] = []

    @classmethod
    @asynccontextmanager
    async def open(cls) -> AsyncIterator[RecordingListener]:
        listener = cls((await trio.open_tcp_listeners(0, host="127.0.0.1"))[0])
        try:
            yield listener
        finally:
            await close_all(listener.inner, *listener.accepted)

    @property
    def port(self) -> int:
        port: int = self.inner.socket.getsockname()[1]
        return port

    async def accept(self) -> trio.abc.Stream:
        stream = await self.inner.accept()
        self.accepted.append(stream)
        return stream

    async def aclose(self) -> None:
        await self.inner.aclose()
