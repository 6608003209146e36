"""The control stream of ``trio-multifd send`` and ``recv`` (see docs/cli.rst).

Like QEMU's main migration channel, it is the sender's first connection to the
receiver's port, and carries what the receiver needs before any page moves and the
verdict after the last one:

- the sender opens the connection with the 8-byte magic :data:`CONTROL_MAGIC`;
- then each message, both ways, is a 4-byte big-endian length and that many bytes of
  UTF-8 JSON (an object with a ``"type"``), at most :data:`MAX_MESSAGE` bytes;
- sender -> receiver: ``manifest``; receiver -> sender: ``go`` or ``refuse``; the sender
  then opens the multifd channels to the same port (QEMU's handshake magic
  ``0x11223344`` is what they start with), sends, and after its final SYNC reads
  receiver -> sender ``verdict``; a sender that stops before then says why first, with
  sender -> receiver ``abort``.

Also the TLS contexts both ends wrap their connections in.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

import trio

from ._errors import CopyError
from ._transport import ACCEPT_LIMIT, NOT_TLS, accept_into, find_socket, peer_name

__all__ = [
    "CONTROL_MAGIC",
    "MAX_MESSAGE",
    "PeerClosed",
    "PeerGone",
    "accept_control",
    "client_context",
    "receive_exact",
    "receive_message",
    "refusal",
    "send_message",
    "server_context",
    "tell",
]

CONTROL_MAGIC = b"TMFDCTL\x01"
"""The first 8 bytes of a control stream: ``TMFDCTL`` and the framing version, 1."""


MAX_MESSAGE = 64 * 1024
"""The largest control message either side accepts."""


class PeerGone(CopyError):
    """The peer left mid-copy: a symptom when this side failed too, and then the other
    error is the one shown (see :func:`._filecopy.describe`)."""


class PeerClosed(CopyError):
    """The control stream ended before a whole message."""


async def receive_exact(stream: trio.abc.Stream, count: int, what: str, *, peer: str) -> bytes:
    """``count`` bytes, of ``what`` that ``peer`` (say, ``"the receiver"``) sends."""
    data = bytearray()
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        if not chunk:
            raise PeerClosed(f"{peer} closed the control stream before {what}")
        data += chunk
    return bytes(data)


async def send_message(stream: trio.abc.Stream, message: dict[str, Any]) -> None:
    """Send one length-prefixed JSON message."""
    body = json.dumps(message).encode()
    await stream.send_all(struct.pack(">I", len(body)) + body)


async def receive_message(
    stream: trio.abc.Stream, what: str, first: bytes = b"", *, peer: str
) -> dict[str, Any]:
    """Receive one length-prefixed JSON message (an object), of which ``first`` (at most
    the 4 bytes of its length) was already read; its errors name ``peer``."""
    prefix = first + await receive_exact(stream, 4 - len(first), what, peer=peer)
    (length,) = struct.unpack(">I", prefix)
    if length > MAX_MESSAGE:
        # Neither end of trio-multifd writes such a message: these are another protocol's
        # bytes ("HTTP", an SSH banner) or none at all (random bytes).
        raise CopyError(
            f"{peer} sent a control message of {length} bytes (limit {MAX_MESSAGE}): it"
            f" began with {prefix!r}, so it does not speak trio-multifd's framing"
        )
    body = await receive_exact(stream, length, what, peer=peer)
    try:
        message = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CopyError(f"bad control message from {peer}: {type(exc).__name__}: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise CopyError(f"bad control message from {peer}: not an object with a type")
    return message


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The receiver's TLS context (certificate chain and key)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def client_context(ca: str) -> ssl.SSLContext:
    """The sender's TLS context: trusts ``ca``, checks the host name."""
    return ssl.create_default_context(cafile=ca)


async def tell(control: trio.abc.Stream, message: dict[str, Any], patience: float) -> None:
    """Send ``message`` if the peer still listens, for at most ``patience`` seconds: the
    error that this side is about to raise is its own, and a peer that stopped reading
    must not hold it."""
    with trio.move_on_after(patience):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await send_message(control, message)


async def refusal(
    control: trio.abc.Stream, error: str, here: str | None = None, *, patience: float
) -> CopyError:
    """Tell the sender why the receiver will not take its file (see :func:`tell`), and
    return the error to raise here (``here``, or the same words)."""
    await tell(control, {"type": "refuse", "error": error}, patience)
    return CopyError(here or error)


NOTICE_INTERVAL = 10.0
"""The shortest time between two notices of :func:`accept_control`: any peer may
connect, as often as it likes."""


class _NotASender(Exception):
    """A connection that closed, reset or stayed silent before its first byte, or closed
    during its TLS handshake (the notice says so)."""

    def __init__(self, notice: str | None = None) -> None:
        super().__init__(notice)
        self.notice = notice


class _Limited:
    """Passes a line on to ``say`` at most once per :data:`NOTICE_INTERVAL`."""

    def __init__(self, say: Callable[[str], None] | None) -> None:
        self.say = say
        self.next = -math.inf

    def __call__(self, line: str) -> None:
        now = trio.current_time()
        if self.say is not None and now >= self.next:
            self.next = now + NOTICE_INTERVAL
            self.say(line)


async def accept_control(
    listeners: list[trio.abc.Listener[trio.abc.Stream]],
    handshake_timeout: float,
    notice: Callable[[str], None] | None = None,
) -> tuple[trio.abc.Stream, dict[str, Any]]:
    """The first connection on any of ``listeners`` (a host name may resolve to several
    addresses) that opens as a sender's control stream, and its manifest.

    A listening port meets port scanners and health checks: a connection that closes,
    resets or sends nothing for ``handshake_timeout`` before its first byte is closed
    and the wait goes on, and such connections are read side by side (up to
    :data:`~trio_multifd._transport.ACCEPT_LIMIT`), so a silent one does not hold the
    sender back. A
    connection that sends anything else than a control stream's opening ends the wait
    with its :class:`CopyError`: most likely a sender that is misconfigured (TLS on one
    end only), whose user wants to know.

    A TLS connection that closes during its handshake, after its first bytes (most
    likely a sender that does not trust this end's certificate), is dropped too, and
    ``notice`` is called with a line that says so, at most once per
    :data:`NOTICE_INTERVAL`."""
    outcome: list[tuple[trio.abc.Stream, dict[str, Any]] | CopyError] = []
    limited = _Limited(notice)

    async def read(stream: trio.abc.Stream) -> None:
        try:
            manifest = await _open_control(stream, handshake_timeout)
        except _NotASender as exc:
            await trio.aclose_forcefully(stream)
            if exc.notice:
                limited(exc.notice)
            return
        except CopyError as exc:
            await trio.aclose_forcefully(stream)
            found: tuple[trio.abc.Stream, dict[str, Any]] | CopyError = exc
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        else:
            found = (stream, manifest)
        try:
            if outcome:  # another connection won between two checkpoints
                if not isinstance(found, CopyError):
                    await trio.aclose_forcefully(found[0])
                return
            outcome.append(found)
            nursery.cancel_scope.cancel()
        finally:
            # This frame is in the error's traceback: holding it would make a reference
            # cycle.
            del found

    slots = trio.Semaphore(ACCEPT_LIMIT)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(accept_into, listener, nursery, read, slots)
    except BaseException:
        # Cancelled from outside just as a connection won: nobody else will close it.
        for found in outcome:
            if not isinstance(found, CopyError):
                await trio.aclose_forcefully(found[0])
        raise
    won = outcome.pop()
    if isinstance(won, CopyError):
        try:
            raise won
        finally:
            del won  # see read()
    return won


async def _open_control(stream: trio.abc.Stream, handshake_timeout: float) -> dict[str, Any]:
    """Read a new connection's opening (the magic) and the manifest that follows it.

    Raises:
        _NotASender: The connection closed, reset or stayed silent before its first byte.
        CopyError: It is not a control stream, or its manifest did not come.
    """
    first = b""
    address = peer_name(stream)  # asked first: a peer that resets has no name after
    sender = f"the sender at {address}" if address else "the sender"
    try:
        with trio.fail_after(handshake_timeout):
            if isinstance(stream, trio.SSLStream):
                await _tls_handshake(stream, address)
            first = bytes(await stream.receive_some(len(CONTROL_MAGIC)))
            if not first:
                raise _NotASender
            magic = first + await receive_exact(
                stream, len(CONTROL_MAGIC) - len(first), "the manifest", peer=sender
            )
            if magic != CONTROL_MAGIC:
                # 0x16 0x03: a TLS record carrying a handshake, i.e. a ClientHello.
                hint = (
                    ": a TLS handshake; give the receiver --tls-cert and --tls-key"
                    if magic.startswith(b"\x16\x03")
                    else ""
                )
                raise CopyError(
                    f"a connection{f' from {address}' if address else ''} that is not a"
                    f" trio-multifd control stream (it began with {magic!r}{hint})"
                )
            return await receive_message(stream, "the manifest", peer=sender)
    except trio.TooSlowError:
        if not first:
            raise _NotASender from None
        raise CopyError(f"no manifest from {sender} within {handshake_timeout}s") from None
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        # A TLS connection closed or reset before its ClientHello ends the same way.
        if not first and isinstance(cause, ssl.SSLEOFError | ConnectionResetError):
            raise _NotASender from None
        plain = getattr(cause, "reason", None) in NOT_TLS
        hint = " (does the sender use TLS, with --tls-ca?)" if plain else ""
        raise CopyError(
            f"control stream{f' from {address}' if address else ''} failed: {cause or exc}{hint}"
        ) from None


async def _tls_handshake(stream: trio.SSLStream[trio.abc.Stream], peer: str) -> None:
    """The handshake of a new TLS connection from ``peer``; one that closes during it
    after its first bytes is no sender either, but a notice: the sender with a CA that
    does not trust this end's certificate closes so (its user sees why, this end's does
    not)."""
    sock = find_socket(stream)
    if sock is not None:
        # A scanner's close before its first byte ends the handshake as the sender's does.
        try:
            if not await sock.recv(1, socket.MSG_PEEK):
                raise _NotASender
        except OSError:
            raise _NotASender from None
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        if sock is None or not isinstance(exc.__cause__, ssl.SSLEOFError | ConnectionResetError):
            raise
        raise _NotASender(
            f"a connection{f' from {peer}' if peer else ''} closed during the TLS handshake"
            " (a sender that does not trust this certificate?)"
        ) from None
