"""Moving a channel's bytes: a zero-copy path for sockets and a generic path for streams.

A channel's packets are moved by a worker thread (see the engine), so that the kernel's
copies of several channels, and compression, run on several cores while the Trio thread
only coordinates. The ``*_sync`` methods are what that thread calls: on sockets they do
the I/O right there (``sendmsg`` / ``recvmsg_into`` on a duplicate of the socket's
descriptor, waiting in ``poll`` when the socket is not ready, releasing the GIL); on
other streams they hand each operation back to Trio (``trio.from_thread.run``). Every
wait checks for cancellation at least every :data:`CANCEL_CHECK` seconds.

Every failure of the underlying stream leaves this module as a
:class:`~trio_multifd.MultiFDError` naming the channel: :class:`TransportError` for a
broken stream, :class:`TruncatedError` for an end of stream inside a structure,
:class:`SendStalledError` / :class:`ReceiveTimeoutError` for a peer that stopped moving.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import socket as stdlib_socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar, final

import trio

from ._errors import (
    DeliveryError,
    ReceiveTimeoutError,
    SendStalledError,
    TransportError,
    TruncatedError,
)

__all__ = [
    "ACCEPT_LIMIT",
    "CANCEL_CHECK",
    "FAILURE_SIGNAL",
    "NOT_TLS",
    "Buffer",
    "Partial",
    "ReadySet",
    "SocketTransport",
    "Transport",
    "Turns",
    "accept_into",
    "clock_note",
    "deadline_scope",
    "find_socket",
    "lenient_tls",
    "open_transport",
    "peer_name",
    "root_cause",
]

T = TypeVar("T")

Buffer = bytes | bytearray | memoryview
"""What a channel sends: any bytes-like object, not copied on the socket path."""

Partial = Callable[[memoryview], None]
"""A check of a structure's first bytes, before the wait for the rest (see
:meth:`Transport.receive_or_eof`)."""

_TCP_FAMILIES = (stdlib_socket.AF_INET, stdlib_socket.AF_INET6)
# Closing with SO_LINGER {on, 0} sends a TCP reset: how the receiver tells a sender that
# a channel failed (a clean FIN means "everything read and completed").
_LINGER_RESET = struct.pack("ii", 1, 0)
FAILURE_SIGNAL = b"!"
"""What a failing end writes, at a packet boundary, before closing a stream that cannot be
reset: no header starts with it (a header starts with the magic)."""

NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE"})
"""OpenSSL's reasons for a TLS handshake whose first bytes are no TLS record (a peer
without TLS): ``WRONG_VERSION_NUMBER`` up to 3.1, ``RECORD_LAYER_FAILURE`` from 3.2."""

# Trio sets it on TCP streams where the socket module has it (see lift_send_cap).
_NOTSENT_LOWAT: int | None = getattr(stdlib_socket, "TCP_NOTSENT_LOWAT", None)

# The most buffers one sendmsg/recvmsg_into takes (a packet of 1024 scattered 512-byte
# pages and its header is 1025); the rest goes in the next call.
_IOV_MAX: int = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024

# The peer's end of stream as a poll event (Linux only; elsewhere it shows as POLLIN).
_RDHUP = getattr(select, "POLLRDHUP", 0)
_READABLE = select.POLLIN | _RDHUP
# Poll events of a socket that the peer reset or hung up.
_BROKEN = select.POLLERR | select.POLLHUP | _RDHUP

CANCEL_CHECK = 0.02
"""Longest wait of a worker thread between two checks for cancellation (seconds)."""
_CANCEL_CHECK_MS = round(CANCEL_CHECK * 1000)

SPIN = 200e-6
"""How long a worker thread polls without sleeping when its socket stops being ready
right after moving bytes (seconds).

A thread that sleeps is woken by its peer's data or acknowledgements, and Linux tends to
run a woken thread on the waker's core: on loopback the sending and the receiving thread
then share one core while the other idles, which halved the throughput of about half the
runs. Spinning briefly keeps a busy thread on its own core; measured on 2 cores, 1
channel: median 2.5 GB/s (bimodal, 2.1-5.1) without, 4.8 GB/s (3.7-5.0) with 200 us.
A spin that ends without the socket ready skips the next :data:`SPIN_BACKOFF` waits: a
thread that waits for a slower peer (compression) does not burn the core the peer needs.
"""

SPIN_BACKOFF = 8
"""Waits that skip the spin after a spin in vain."""


@final
class _Spinner:
    """Spin before sleeping (:data:`SPIN`), but only right after bytes moved, and not
    for the next :data:`SPIN_BACKOFF` waits after a spin in vain."""

    __slots__ = ("_skip", "moved")

    def __init__(self) -> None:
        self.moved = False
        self._skip = 0

    def poll(self, poller: select.poll) -> list[tuple[int, int]]:
        """Poll ``poller``: spinning first if bytes moved, then for up to
        :data:`CANCEL_CHECK`; return its events (none when the wait timed out)."""
        if self.moved:
            self.moved = False
            if self._skip:
                self._skip -= 1
            else:
                deadline = time.monotonic() + SPIN
                while time.monotonic() < deadline:
                    events = poller.poll(0)
                    if events:
                        return events
                self._skip = SPIN_BACKOFF
        return poller.poll(_CANCEL_CHECK_MS)


def _layers(stream: object) -> Iterator[object]:
    """``stream`` and the streams it wraps, outermost first: SSLStream and friends hold
    another stream in ``.transport_stream`` (at most 8 deep: a cycle must not hang)."""
    for _ in range(8):
        yield stream
        stream = getattr(stream, "transport_stream", None)
        if stream is None:
            return


def find_socket(stream: object) -> trio.socket.SocketType | None:
    """The socket at the bottom of ``stream``'s layers (TLS over TCP, say), if any."""
    # SocketStream exposes .socket.
    for layer in _layers(stream):
        sock = getattr(layer, "socket", None)
        if isinstance(sock, trio.socket.SocketType):
            return sock
    return None


def peer_name(stream: trio.abc.Stream) -> str:
    """Who is at the other end of ``stream``: ``host:port`` over IP, else the peer's
    socket path, or ``""`` when there is none to tell (an unbound Unix socket, a stream
    with no socket, one already reset)."""
    sock = find_socket(stream)
    try:
        address = sock.getpeername() if sock is not None else None
    except OSError:
        return ""
    if isinstance(address, tuple):
        host, port = address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return address if isinstance(address, str) else ""


def root_cause(exc: BaseException) -> BaseException:
    """The innermost cause: Trio wraps an ``ssl.SSLError`` or ``OSError`` in
    ``BrokenResourceError``, and the user wants the wrapped reason."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _advance(buffers: list[memoryview], sent: int) -> list[memoryview]:
    while sent:
        first = buffers[0]
        if sent < len(first):
            buffers[0] = first[sent:]
            return buffers
        sent -= len(first)
        del buffers[0]
    return buffers


def deadline_scope(timeout: float | None) -> trio.CancelScope:
    """A ``move_on_after(timeout)``, where ``None`` never expires."""
    return trio.move_on_after(math.inf if timeout is None else timeout)


def clock_note(since: float, timeout: float | None) -> str:
    """What the message of an expired Trio-clock ``timeout``, started at ``since``
    (``time.monotonic()``), adds when far less real time passed: the clock jumped.

    A ``trio.testing.MockClock`` with autojump (pytest-trio's ``autojump_clock``) leaps
    to the next deadline whenever every task waits, and a task waiting for a worker
    thread, this end's or the peer's in the same process, waits too: a healthy transfer
    then fails on a 60 s timeout after a fraction of a real second. Without this note the
    message would send the reader looking for a 60 s stall that never happened.
    """
    elapsed = time.monotonic() - since
    if timeout is None or elapsed >= timeout / 2:
        return ""
    return (
        f" (after {elapsed:.2f}s of real time: the Trio clock jumped ahead, as a"
        " trio.testing.MockClock with autojump does when every task waits, even on"
        " worker threads that move packets)"
    )


class Transport:
    """One channel's stream, with the operations the engine needs.

    Attributes:
        channel: The channel id, named in every error (``None`` before the handshake).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        channel: int | None,
        send_timeout: float | None = None,
        receive_timeout: float | None = None,
    ) -> None:
        self.stream = stream
        self.channel = channel
        self.send_timeout = send_timeout
        self.receive_timeout = receive_timeout
        self.closed = False
        # A send_all that did not return leaves the stream in an unknown state (Trio's
        # contract): reset() must not write to it again.
        self._send_interrupted = False

    ends_in_band: bool = True
    """Whether the sender announces and flags its stream's end in band
    (``Feature.IN_BAND_END``): a stream with no reset, so that a bare end of stream
    must not pass for the end of the transfer. The failure byte cannot stand in: it
    cannot follow a ``send_all`` cut short by a cancel, nor go in while the receiver is
    behind and the stream's buffer full. Not so for TCP (a reset), nor for QEMU, which
    knows nothing of it; but a sender with checksums sets it on every stream."""

    @property
    def can_half_close(self) -> bool:
        """Whether the stream can signal EOF and still receive (not so for TLS)."""
        return isinstance(self.stream, trio.abc.HalfCloseableStream)

    def _broken(self, exc: BaseException, doing: str) -> TransportError:
        err = TransportError(
            f"stream failed while {doing}: {root_cause(exc)!r}", channel=self.channel
        )
        err.__cause__ = exc
        return err

    async def send_parts(self, parts: Sequence[Buffer], what: str = "a packet") -> None:
        """Send every byte of ``parts`` (``what``, named in a timeout's message) in order."""
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        since = time.monotonic()
        with deadline_scope(self.send_timeout) as scope:
            try:
                self._send_interrupted = True
                await self.stream.send_all(data)
                self._send_interrupted = False
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise self._broken(exc, "sending") from exc
        if scope.cancelled_caught:
            raise SendStalledError(
                f"sending {what} took longer than send_timeout={self.send_timeout}s"
                + clock_note(since, self.send_timeout),
                channel=self.channel,
            )

    async def _receive_some(self, max_bytes: int, what: str) -> bytes | bytearray:
        since = time.monotonic()
        with deadline_scope(self.receive_timeout) as scope:
            try:
                data = await self.stream.receive_some(max_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise self._broken(exc, f"receiving {what}") from exc
            # A stream that breaks receive_some's contract would otherwise fail the copy
            # into the target with a bare ValueError, or, with the extra bytes dropped,
            # leave the next structure read out of step.
            if len(data) > max_bytes:
                raise TransportError(
                    f"the stream returned {len(data)} bytes of {what} when asked for at"
                    f" most {max_bytes} (a bug in {type(self.stream).__name__}.receive_some)",
                    channel=self.channel,
                )
            return data
        assert scope.cancelled_caught
        raise ReceiveTimeoutError(
            f"no byte of {what} arrived for receive_timeout={self.receive_timeout}s"
            + clock_note(since, self.receive_timeout),
            channel=self.channel,
        )

    async def receive_into(self, views: Sequence[memoryview], what: str, before: int = 0) -> None:
        """Fill ``views`` exactly from the stream, never reading past them; ``before``
        bytes of ``what`` arrived earlier (they count in a truncation's message).

        Raises:
            TruncatedError: The stream ended first.
        """
        total = sum(len(v) for v in views)
        got = 0
        for view in views:
            pos = 0
            while pos < len(view):
                # Asking for no more than the view still needs: no byte of the next
                # structure is ever read here, so no buffer of leftovers is needed.
                data = await self._receive_some(len(view) - pos, what)
                if not data:
                    raise self._truncated(what, before + got + pos, before + total)
                view[pos : pos + len(data)] = data
                pos += len(data)
            got += pos

    async def receive_or_eof(self, view: memoryview, what: str, partial: Partial) -> bool:
        """Fill ``view``; return ``False`` for a clean end of stream before its first byte.

        When the first bytes do not fill ``view``, ``partial`` is called with them
        before the wait for the rest, to raise at once if they cannot start ``what``
        (a stream out of step would otherwise wait for the peer's next bytes).
        """
        # Without a timeout: a healthy channel may sit idle between packets for any time.
        saved, self.receive_timeout = self.receive_timeout, None
        try:
            data = await self._receive_some(len(view), what)
        finally:
            self.receive_timeout = saved
        if not data:
            return False
        view[: len(data)] = data
        if len(data) < len(view):
            partial(view[: len(data)])
            await self.receive_into([view[len(data) :]], what, len(data))
        return True

    # -- called from a worker thread -----------------------------------------------------------

    def send_parts_sync(self, parts: Sequence[Buffer]) -> None:
        """:meth:`send_parts`, from a worker thread."""
        trio.from_thread.run(self.send_parts, parts)

    def receive_into_sync(self, views: Sequence[memoryview], what: str, before: int = 0) -> None:
        """:meth:`receive_into`, from a worker thread."""
        trio.from_thread.run(self.receive_into, views, what, before)

    def receive_or_eof_sync(self, view: memoryview, what: str, partial: Partial) -> bool:
        """:meth:`receive_or_eof`, from a worker thread."""
        return trio.from_thread.run(self.receive_or_eof, view, what, partial)

    def check_hang_up_sync(self, doing: str, *, plain_close_is_end: bool) -> None:
        """Raise the error of a channel that poll reported reset or hung up; with
        ``plain_close_is_end``, a plain close (no error on the stream) is none: what the
        peer wrote before it is still to be read, its end included."""
        if not plain_close_is_end:
            raise TransportError(f"the peer hung up while {doing}", channel=self.channel)

    def close_sync_side(self) -> None:
        """Release what the thread side holds (nothing for generic streams)."""

    def check_peer_sync(self, doing: str = "the channel was idle") -> None:
        """Raise if the peer has already failed or closed the channel (a sender's check
        while idle and before its final SYNC; ``doing`` says when); only sockets can
        tell without reading."""

    def _truncated(self, what: str, got: int, total: int) -> TruncatedError:
        return TruncatedError(
            f"stream ended inside {what} after {got} of {total} bytes",
            field="stream",
            value=got,
            limit=total,
            channel=self.channel,
        )

    async def finish(self, within: float | None) -> None:
        """Half-close, then wait for the peer's clean close (the delivery confirmation).

        Raises:
            DeliveryError: The peer reset the stream, sent data, or did not close within
                ``within`` seconds.
        """
        if self.can_half_close:
            assert isinstance(self.stream, trio.abc.HalfCloseableStream)
            try:
                await self.stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise DeliveryError(
                    f"could not half-close the stream: {exc!r}", channel=self.channel
                ) from exc
        since = time.monotonic()
        with deadline_scope(within) as scope:
            try:
                data = await self.stream.receive_some(1)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise DeliveryError(
                    "the receiver did not confirm the transfer: its stream failed"
                    f" ({exc!r}); it reported an error or stopped early",
                    channel=self.channel,
                ) from exc
        if scope.cancelled_caught:
            raise DeliveryError(
                f"the receiver did not close the channel within {within}s after the final SYNC"
                + clock_note(since, within),
                channel=self.channel,
            )
        if data:
            raise DeliveryError(
                "the receiver sent data instead of closing the channel", channel=self.channel
            )

    async def aclose(self) -> None:
        """Close cleanly (the peer sees an orderly end of stream)."""
        self.closed = True
        self.close_sync_side()
        with trio.move_on_after(5) as scope:
            scope.shield = True
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self.stream)

    async def reset(self) -> None:
        """Close at once, so that the peer learns of a failure.

        On TCP that is a reset (``SO_LINGER`` 0). Other streams (Unix sockets, memory
        streams) have no reset: one byte is written first, which a sender waiting for the
        clean close reads as the failure it is (a QEMU destination never writes on a
        multifd channel), and which a receiver cannot take for a packet boundary.
        """
        if self.closed:
            return
        self.closed = True
        sock = find_socket(self.stream)
        self.close_sync_side()
        if sock is not None and sock.family in _TCP_FAMILIES:
            try:
                sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        elif not self._send_interrupted:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 0.2):
                try:
                    await self.stream.send_all(FAILURE_SIGNAL)
                except (
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    trio.BusyResourceError,
                    OSError,
                ):
                    pass
        await trio.aclose_forcefully(self.stream)


class SocketTransport(Transport):
    """The fast path: ``sendmsg`` scatter-gather from the blocks' memory and
    ``recvmsg_into`` straight into the target pages, no copy and no allocation per packet,
    done by a worker thread on a duplicate of the socket's descriptor.

    The socket stays non-blocking, as Trio left it: the thread tries each operation
    and, when the kernel has no room or no data, waits in ``poll`` for at most
    :data:`CANCEL_CHECK`, so it notices cancellation in time. Measured on loopback
    against a blocking socket with kernel timeouts: ~1.5x the throughput at one channel
    (0.38 against 0.57 CPU seconds per GB in the sender), ~10% less at four. Trio does
    no I/O on the socket while the thread owns it.
    """

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType, **kw: Any) -> None:
        super().__init__(stream, **kw)
        # Only TCP has a reset (a Unix socket's close is a plain end of stream).
        self.ends_in_band = sock.family not in _TCP_FAMILIES
        # A second descriptor of the same socket, so that the thread never touches the
        # trio socket object.
        self.sync_sock: stdlib_socket.socket | None = stdlib_socket.socket(
            sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno())
        )
        self._fd = self.sync_sock.fileno()
        self._readable = select.poll()
        self._readable.register(self._fd, select.POLLIN)
        self._writable = select.poll()
        self._writable.register(self._fd, select.POLLOUT)
        # The sockets of other channels whose failure a wait to send must notice.
        self._watched: dict[int, SocketTransport] = {}
        self._spinner = _Spinner()

    def lift_send_cap(self) -> None:
        """Let the kernel hold as much unsent data as its buffer takes.

        Trio's SocketStream caps a TCP socket's unsent data at 16 KiB
        (``TCP_NOTSENT_LOWAT``), for the latency of small writes; 0 restores the system's
        default (``net.ipv4.tcp_notsent_lowat``: no cap unless configured). For a
        compressing sender, the slow end: with the cap its 512 KiB ``sendmsg`` returned
        early and its thread woke ~290 times per GiB (~20 without), and the sender's CPU
        fell from 0.95 to 0.80 s/GB at 4 channels of zstd (the receiver's rose from 0.42
        to 0.56: its acknowledgements now push the queued bytes), 1.28 to 1.36 GB/s.
        Without compression the receiver is the slow end and the cap measured better
        (4.04 against 3.50 GB/s). See ``docs/performance.rst``.
        """
        if _NOTSENT_LOWAT is not None and self._sock.family in _TCP_FAMILIES:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(stdlib_socket.IPPROTO_TCP, _NOTSENT_LOWAT, 0)

    def close_sync_side(self) -> None:
        if self.sync_sock is not None:
            self.sync_sock.close()
            self.sync_sock = None

    @property
    def _sock(self) -> stdlib_socket.socket:
        assert self.sync_sock is not None
        return self.sync_sock

    def watch_peers(self, others: Sequence[SocketTransport]) -> None:
        """Make waits to send also watch ``others`` (channels of the same sending
        thread): a receiver never writes on a channel, so anything readable there is its
        failure, raised as that channel's :class:`TransportError`. Without this a thread
        waiting for room on one channel would not notice that the receiver reset another.
        """
        for other in others:
            if other is not self:
                self._watched[other._fd] = other
                self._writable.register(other._fd, select.POLLIN)

    def _ready(self, events: list[tuple[int, int]]) -> bool:
        ready = False
        for fd, _ in events:
            if fd == self._fd:
                ready = True
            else:
                self._watched[fd].check_peer_sync(
                    f"its thread waited to send on channel {self.channel}"
                )
        return ready

    def _wait(self, poller: select.poll, since: float, timeout: float | None, doing: str) -> None:
        """Wait until the socket is ready again; each :data:`CANCEL_CHECK` without it,
        check for cancellation and for the channel's own timeout, counted from the last
        progress (``since``; ``timeout`` ``None`` waits forever). A watched channel's
        failure (:meth:`watch_peers`) is raised as that channel's error."""
        if self._ready(self._spinner.poll(poller)):
            return
        trio.from_thread.check_cancelled()
        if timeout is None or time.monotonic() - since < timeout:
            return
        if doing == "sending":
            raise SendStalledError(
                f"the peer accepted no byte for send_timeout={timeout}s",
                channel=self.channel,
            )
        raise ReceiveTimeoutError(
            f"no byte of {doing} arrived for receive_timeout={timeout}s",
            channel=self.channel,
        )

    def check_peer_sync(self, doing: str = "the channel was idle") -> None:
        # A receiver never writes on a channel and closes it only after the transfer
        # completed: anything readable, a hang-up or an error here is its failure.
        try:
            data = self._sock.recv(1, stdlib_socket.MSG_PEEK | stdlib_socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            raise self._broken(exc, f"idle ({doing})") from exc
        what = "sent data (its failure signal)" if data else "closed the channel"
        raise TransportError(
            f"the receiver {what} while {doing}: it failed or left", channel=self.channel
        )

    def check_hang_up_sync(self, doing: str, *, plain_close_is_end: bool) -> None:
        error = self._sock.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_ERROR)
        if error:
            raise self._broken(OSError(error, os.strerror(error)), doing)
        super().check_hang_up_sync(doing, plain_close_is_end=plain_close_is_end)

    def send_parts_sync(self, parts: Sequence[Buffer]) -> None:
        buffers = [memoryview(p) for p in parts]
        sendmsg = self._sock.sendmsg
        progress = time.monotonic()
        while buffers:
            try:
                sent = sendmsg(buffers[:_IOV_MAX])
            except BlockingIOError:
                # send_timeout bounds each wait for progress, not the whole packet: a
                # slow but moving peer is not stalled.
                self._wait(self._writable, progress, self.send_timeout, "sending")
                continue
            except OSError as exc:
                raise self._broken(exc, "sending") from exc
            buffers = _advance(buffers, sent)
            progress = time.monotonic()
            self._spinner.moved = True

    def receive_into_sync(self, views: Sequence[memoryview], what: str, before: int = 0) -> None:
        buffers = list(views)
        total = sum(len(v) for v in buffers)
        got = 0
        recvmsg_into = self._sock.recvmsg_into
        progress = time.monotonic()
        while buffers:
            try:
                n = recvmsg_into(buffers[:_IOV_MAX])[0]
            except BlockingIOError:
                self._wait(self._readable, progress, self.receive_timeout, what)
                continue
            except OSError as exc:
                raise self._broken(exc, f"receiving {what}") from exc
            if not n:
                raise self._truncated(what, before + got, before + total)
            got += n
            buffers = _advance(buffers, n)
            progress = time.monotonic()
            self._spinner.moved = True

    def receive_or_eof_sync(self, view: memoryview, what: str, partial: Partial) -> bool:
        recv_into = self._sock.recv_into
        while True:
            try:
                n = recv_into(view)
            except BlockingIOError:
                # Between packets a healthy channel may sit idle for any time.
                self._wait(self._readable, 0.0, None, what)
                continue
            except OSError as exc:
                raise self._broken(exc, f"receiving {what}") from exc
            if not n:
                return False
            self._spinner.moved = True
            if n < len(view):
                partial(view[:n])
                self.receive_into_sync([view[n:]], what, n)
            return True


class ReadySet(Generic[T]):
    """The channels of a receiving thread, and the wait for any of them to have bytes to
    read: the channels that wait for their next packet, and the parked ones (waiting at
    SYNC, not read) for a reset or hang-up only.

    Socket channels are polled together (spinning first after bytes moved, as a single
    channel's waits do). A channel over another stream cannot be polled: it gets a
    thread of its own, and :meth:`wait` returns it at once unless it is parked (its
    reads wait in Trio).
    """

    def __init__(self) -> None:
        self._poller = select.poll()
        self._sockets: dict[int, T] = {}
        self._streams: list[T] = []
        self._parked: set[int] = set()
        # Parked sockets polled no more, not even for a hang-up (see mute()).
        self._muted: set[int] = set()
        self.spinner = _Spinner()

    def __len__(self) -> int:
        """How many of the channels are read (not parked)."""
        return len(self._sockets) - len(self._parked) + len(self._streams)

    def add(self, transport: Transport, item: T) -> None:
        """Read ``transport`` too, returning ``item`` from :meth:`wait` when it is readable."""
        if isinstance(transport, SocketTransport):
            self._poller.register(transport._fd, _READABLE)
            self._sockets[transport._fd] = item
        else:
            self._streams.append(item)

    def park(self, transport: Transport, item: T) -> None:
        """Stop reading ``transport``; :meth:`wait` still returns ``item`` if the peer
        resets or hangs up."""
        if isinstance(transport, SocketTransport):
            # POLLERR and POLLHUP are reported whatever the mask; a FIN is not.
            self._poller.modify(transport._fd, 0)
            self._parked.add(transport._fd)
        else:
            self._streams.remove(item)

    def mute(self, transport: Transport) -> None:
        """Stop polling the parked ``transport`` until :meth:`unpark`, even for a
        hang-up: its peer closed it, which poll would report again at every wait. A
        parked stream is not waited on in the first place, so none is muted."""
        assert isinstance(transport, SocketTransport)
        self._poller.unregister(transport._fd)
        self._muted.add(transport._fd)

    def unpark(self, transport: Transport, item: T) -> None:
        """Read ``transport`` again."""
        if isinstance(transport, SocketTransport):
            if transport._fd in self._muted:
                self._muted.discard(transport._fd)
                self._poller.register(transport._fd, _READABLE)
            else:
                self._poller.modify(transport._fd, _READABLE)
            self._parked.discard(transport._fd)
        else:
            self._streams.append(item)

    def remove(self, transport: Transport, item: T) -> None:
        """Forget ``transport`` (a channel that is read)."""
        if isinstance(transport, SocketTransport):
            self._poller.unregister(transport._fd)
            del self._sockets[transport._fd]
        else:
            self._streams.remove(item)

    def wait(self, *, block: bool = True) -> list[T]:
        """The items whose channels are readable (an error or an end of stream counts)
        or, parked, reset: none after :data:`CANCEL_CHECK` without any (at once with
        ``block`` false)."""
        if self._streams:
            return list(self._streams)
        sockets = self._sockets
        events = self.spinner.poll(self._poller) if block else self._poller.poll(0)
        if len(events) > 1 and any(flags & _BROKEN for _, flags in events):
            # A channel the peer reset or closed goes first, one still in its round before
            # a parked one (which delivered its round): when the peer's reaction to the
            # first failure resets the others, the error raised names the first.
            parked = self._parked
            events.sort(key=lambda e: 2 if not e[1] & _BROKEN else e[0] in parked)
        return [sockets[fd] for fd, _ in events]


class Turns(Generic[T]):
    """Gives a sending thread's packets to its channels in turn, passing over a socket
    that has no room right now when another one has, so that a slow channel holds up
    its thread's others only when every one of them is full."""

    def __init__(self, channels: Sequence[tuple[Transport, T]]) -> None:
        self._items = [item for _, item in channels]
        self._fds = [t._fd if isinstance(t, SocketTransport) else -1 for t, _ in channels]
        self._poller = select.poll()
        for fd in self._fds:
            if fd >= 0:
                self._poller.register(fd, select.POLLOUT)
        self._next = 0

    def next(self) -> T:
        """The channel to send the next packet on."""
        count = len(self._items)
        start = self._next
        if count > 1:
            writable = {fd for fd, _ in self._poller.poll(0)}
            for step in range(count):
                index = (start + step) % count
                if self._fds[index] in writable:
                    self._next = (index + 1) % count
                    return self._items[index]
        self._next = (start + 1) % count
        return self._items[start]


ACCEPT_LIMIT = 64
"""How many accepted connections a listening end reads at once before it knows what they
are (their handshake, or a control stream's opening): the rest wait in the listen queue."""

# What accept() fails with when the process or the system is out of descriptors or
# memory: retried after ACCEPT_PAUSE, as trio.serve_listeners does.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_PAUSE = 0.1


async def accept_into(
    listener: trio.abc.Listener[trio.abc.Stream],
    nursery: trio.Nursery,
    handle: Callable[[trio.abc.Stream], Awaitable[object]],
    slots: trio.Semaphore,
) -> None:
    """Accept connections on ``listener`` until cancelled, each handled by
    ``handle(stream)`` in a task of ``nursery``, no more at once than ``slots`` allows
    (a listening port meets port scanners and floods: each connection holds
    descriptors until its handler is done)."""

    async def handled(stream: trio.abc.Stream) -> None:
        try:
            await handle(stream)
        finally:
            slots.release()

    while True:
        await slots.acquire()
        try:
            stream = await listener.accept()
        except BaseException as exc:
            slots.release()
            if not isinstance(exc, OSError) or exc.errno not in _OUT_OF_RESOURCES:
                raise
            await trio.sleep(ACCEPT_PAUSE)
            continue
        nursery.start_soon(handled, stream)


def lenient_tls(stream: trio.abc.Stream | trio.abc.Listener[trio.abc.Stream]) -> bool:
    """Whether ``stream`` (or a listener's streams) has a TLS layer made with
    ``https_compatible=True``: its close sends no ``close_notify`` and it reads a bare
    TCP close as a clean end of stream, so a receiver's confirmation and its crash look
    alike. trio keeps the setting private."""
    return any(
        isinstance(layer, trio.SSLStream | trio.SSLListener)
        and getattr(layer, "_https_compatible", False)
        for layer in _layers(stream)
    )


def open_transport(
    stream: trio.abc.Stream,
    *,
    channel: int | None,
    send_timeout: float | None = None,
    receive_timeout: float | None = None,
) -> Transport:
    """Wrap ``stream``: the zero-copy socket path when it is a :class:`trio.SocketStream`.

    Raises:
        TransportError: The socket could not be duplicated for the worker thread (the
            process is out of descriptors); ``stream`` is closed.
    """
    # Only a SocketStream itself (a final class): an application's stream that merely
    # exposes its inner socket (to read its options, say) may count, limit or transform
    # its bytes, and the fast path would go around it after the handshake.
    sock = stream.socket if isinstance(stream, trio.SocketStream) else None
    if sock is not None and hasattr(sock, "sendmsg"):
        try:
            return SocketTransport(
                stream,
                sock,
                channel=channel,
                send_timeout=send_timeout,
                receive_timeout=receive_timeout,
            )
        except OSError as exc:
            sock.close()  # what the stream's aclose() would do, without a checkpoint
            raise TransportError(f"cannot take the socket over: {exc}", channel=channel) from exc
    return Transport(
        stream, channel=channel, send_timeout=send_timeout, receive_timeout=receive_timeout
    )
