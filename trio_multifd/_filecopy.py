"""File copy over multifd: ``trio-multifd send`` and ``trio-multifd recv``, the two
ends' course from the control stream's manifest (:mod:`._control`) to the verdict.

The file travels as two RAM blocks: ``data`` covers its whole pages (an ``mmap`` of the
file on both sides) and ``tail`` is one page holding the final partial page padded with
zeros. The sender queues only pages inside data extents (``SEEK_DATA``/``SEEK_HOLE``), and
the engine sends all-zero pages as zero pages; the receiver's blocks are known-zero (a
fresh ``ftruncate``), so it never touches a page that no data reached: the copy is at
least as sparse as the source.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import mmap
import os
import re
import signal
import ssl
import stat
import uuid as uuid_mod
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NoReturn

import attrs
import trio

from ._block import RAMBlock
from ._control import (
    CONTROL_MAGIC,
    PeerClosed,
    PeerGone,
    accept_control,
    receive_message,
    refusal,
    send_message,
    tell,
)
from ._errors import (
    CopyError,
    MappingError,
    MultiFDError,
    TransferIncompleteError,
    TransportError,
    TruncatedError,
)
from ._extents import CHECKSUM, PAGE, page_ranges, scan_in_thread
from ._methods import get_method
from ._receiver import open_receiver
from ._sender import open_sender
from ._stats import TransferStats

__all__ = ["MAX_CHANNELS", "Progress", "Summary", "describe", "receive_file", "send_file"]

IDLE_TIMEOUT = 60.0
"""How long either side waits for its peer to make progress (the default of
``idle_timeout``): the go-ahead, the next byte of page data, the verdict or a sign that
the receiver is still checking."""
CHECKING_INTERVAL = 5.0
"""How often a receiver computing the checksum tells the sender so (at most)."""
MAX_SIZE = 2**63 - 1
"""The largest file size a manifest may declare (the largest ``off_t``)."""
# The permission bits a copy takes from its source: not setuid, setgid or sticky.
_MODE_BITS = 0o777
_DEFAULT_MODE = 0o644
# What fchmod says on a file system that keeps no such bits (vfat says EPERM).
_NO_PERMISSION_BITS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP}
MAX_CHANNELS = 16
"""The most channels a receiver accepts from a manifest by default (``--max-channels``).

The sender chooses the count, and each zstd channel's frame may make the receiver hold a
32 MiB window (:data:`~trio_multifd._methods._zstd.MAX_WINDOW_SIZE`), filled by a few KiB of
run-length blocks: 255 channels would let a peer claim 8 GiB with 64 KiB on the wire; 16
bound it to 512 MiB."""
SENDERS_WORD_WAIT = 5.0
"""How long a receiver whose channels were reset or ended mid-transfer waits at most
for the sender's word on the control stream (an abort message, or its end) to say why:
the sender writes it, or its process's end closes the stream, right after the reset."""
_MESSAGE_REST = 1.0
# How long the rest of a control message may take once its first byte is in (the sender
# writes each at once).
LEASE_POLL = 0.05
"""How often the sender looks whether another process wants to change its file."""

# Test hooks, read from the environment (documented in docs/cli.rst): a sender with
# TRIO_MULTIFD_TEST_CORRUPT_CHECKSUM=1 sends a manifest whose checksum is wrong; with
# TRIO_MULTIFD_TEST_STALL=SECONDS it pauses that long halfway through the pages.
_CORRUPT_ENV = "TRIO_MULTIFD_TEST_CORRUPT_CHECKSUM"
_STALL_ENV = "TRIO_MULTIFD_TEST_STALL"


@attrs.frozen
class Summary:
    """What a finished copy reports (``--json`` prints it)."""

    path: str
    size: int
    data_bytes: int
    seconds: float
    wire_bytes: int
    normal_pages: int
    zero_pages: int
    checksum: str
    channels: int
    compression: str

    def to_json(self, command: str) -> dict[str, Any]:
        return {
            "ok": True,
            "command": command,
            "path": self.path,
            "size": self.size,
            "data_bytes": self.data_bytes,
            "seconds": round(self.seconds, 4),
            "gbps": round(self.data_bytes / self.seconds / 1e9, 4) if self.seconds else 0.0,
            "wire_bytes": self.wire_bytes,
            "normal_pages": self.normal_pages,
            "zero_pages": self.zero_pages,
            "checksum": self.checksum,
            "channels": self.channels,
            "compression": self.compression,
        }


Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``: called a few times a second."""


# -- files ------------------------------------------------------------------------------------


@attrs.define(eq=False)
class _SourceLease:
    """A read lease on the file being sent, so that nobody truncates it under the mapping.

    Pages are sent from a shared mapping of the file, where a page cut off by a
    truncation is a SIGBUS that kills the process. With the lease, held from the open to
    the last page, the kernel holds back another process's truncation or open for
    writing (for up to ``/proc/sys/fs/lease-break-time`` seconds) and tells us; the copy
    then stops with a clear error (its content would no longer match the checksum
    anyway) and lets the file go. Without a lease (the file is already open for
    writing, belongs to another user, or its file system has no leases) only the
    engine's faulting-in of each packet's pages guards the copy: a truncation is then a
    MappingError, unless it falls between a packet's faulting-in and its compression.
    """

    fd: int
    path: str
    held: bool
    broken: bool = False

    @classmethod
    def take(cls, fd: int, path: str) -> _SourceLease:
        try:
            # The break notice would be SIGIO, whose default action ends the process;
            # SIGURG is ignored by default, and the lease's state is polled instead.
            fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError:
            return cls(fd, path, held=False)
        return cls(fd, path, held=True)

    def check(self) -> None:
        """Raise :class:`CopyError` once another process wants to change the file."""
        if self.held and fcntl.fcntl(self.fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:
            self.broken = True
            raise CopyError(
                f"{self.path} was opened for writing or truncated by another process while"
                " it was being sent: the copy stopped (its content would no longer match"
                " the checksum)"
            )

    async def watch(self) -> None:
        """:meth:`check` until cancelled, well within the kernel's lease-break time."""
        while self.held:
            self.check()
            await trio.sleep(LEASE_POLL)

    def release(self) -> None:
        """Let a waiting writer go on; only once nothing touches the mapping."""
        if self.held:
            fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            self.held = False


# -- framing ----------------------------------------------------------------------------------


# -- TLS --------------------------------------------------------------------------------------


# -- progress ---------------------------------------------------------------------------------


async def _watch(get: Callable[[], int], total: int, progress: Progress | None) -> None:
    if progress is None:
        return
    while True:
        progress(get(), total)
        await trio.sleep(0.1)


# -- the sender -------------------------------------------------------------------------------


async def send_file(
    path: str,
    host: str,
    port: int,
    *,
    channels: int = 4,
    compression: str = "none",
    level: int | None = None,
    tls: ssl.SSLContext | None = None,
    progress: Progress | None = None,
    connect_timeout: float = 30.0,
    idle_timeout: float = IDLE_TIMEOUT,
    io_threads: int | None = None,
) -> Summary:
    """Send the file at ``path`` to a ``recv`` listening at ``host:port``.

    ``idle_timeout`` bounds each wait for the receiver: its go-ahead, and after the last
    page its verdict (renewed by each message saying it is still checking)."""
    try:
        # Checked before the open, which is not harmless for every node: it lets a
        # writer waiting on a FIFO through (to meet a closed pipe), arms a watchdog,
        # rewinds a tape. The fstat after it still decides, should the node be replaced.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise CopyError(f"{path} is not a regular file")
        try:
            # Non-blocking: a FIFO put there since the check would otherwise wait for a
            # writer before the regular-file check below.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except BlockingIOError:
            # A regular file under another process's write lease (an SMB oplock, an NFS
            # delegation): wait for its holder, as a plain open does.
            fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CopyError(f"cannot open {path}: {exc.strerror}") from None
    mapping: mmap.mmap | None = None
    blocks: list[RAMBlock] = []
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise CopyError(f"{path} is not a regular file")
        lease = _SourceLease.take(fd, path)
        size = status.st_size
        whole = size // PAGE * PAGE
        ranges = [(s, min(e, whole)) for s, e in page_ranges(fd, size) if s < whole]
        tail_len = size - whole
        tail = bytearray(PAGE)
        if tail_len:
            os.preadv(fd, [memoryview(tail)[:tail_len]], whole)
        data_bytes = sum(e - s for s, e in ranges) + (PAGE if tail_len else 0)
        checksum, nonzero_pages = await scan_in_thread(
            fd, size, count_pages=True, name=str(path), check=lease.check
        )
        if os.pread(fd, 1, size):
            # The copy would end at the size, and its checksum agree: an empty copy of
            # /proc/cpuinfo (size 0) would pass for a good one.
            raise CopyError(
                f"{path} holds more than its size of {size} bytes (a file of /proc, or one"
                " that grows): it cannot be sent"
            )
        if os.environ.get(_CORRUPT_ENV):
            checksum = ("0" if checksum[0] != "0" else "1") + checksum[1:]
        transfer_uuid = uuid_mod.uuid4()
        manifest = {
            "type": "manifest",
            "name": _manifest_name(path),
            "size": size,
            "page_size": PAGE,
            "data_bytes": data_bytes,
            "nonzero_bytes": nonzero_pages * PAGE,
            "method": compression,
            "channels": channels,
            "uuid": str(transfer_uuid),
            "checksum": {"algorithm": CHECKSUM, "value": checksum},
            "mode": stat.S_IMODE(status.st_mode) & _MODE_BITS,
        }

        async def open_stream() -> trio.abc.Stream:
            try:
                with trio.fail_after(connect_timeout):
                    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
                    if tls is None:
                        return stream
                    ssl_stream = trio.SSLStream(stream, tls, server_hostname=host)
                    try:
                        await ssl_stream.do_handshake()
                    except trio.BrokenResourceError as exc:
                        await trio.aclose_forcefully(ssl_stream)
                        # A certificate that fails verification came from a TLS receiver.
                        hint = (
                            ""
                            if isinstance(exc.__cause__, ssl.SSLCertVerificationError)
                            else " (does the receiver use TLS, with --tls-cert and --tls-key?)"
                        )
                        raise CopyError(
                            f"TLS handshake with {host}:{port} failed:"
                            f" {exc.__cause__ or exc}{hint}"
                        ) from None
                    return ssl_stream
            except trio.TooSlowError:
                raise CopyError(f"could not connect to {host}:{port}: timed out") from None
            except (OSError, trio.BrokenResourceError) as exc:
                cause = exc.__cause__ if exc.__cause__ is not None else exc
                # open_tcp_stream's group holds the error of each address it tried.
                reasons = _leaves(cause) if isinstance(cause, BaseExceptionGroup) else [cause]
                shown = "; ".join(dict.fromkeys(str(reason) for reason in reasons))
                raise CopyError(f"could not connect to {host}:{port}: {shown}") from None

        control = await open_stream()
        try:
            reply = await _go_ahead(control, manifest, lease, idle_timeout, plain=tls is None)
            if reply["type"] == "refuse":
                raise CopyError(f"the receiver refused: {_shown(reply.get('error', reply))}")
            if reply["type"] != "go":
                raise CopyError(
                    f"the receiver answered the manifest with a {_quoted(reply['type'])}"
                    " message, not a go-ahead or a refusal"
                )
            # Without a lease (the file was already open for writing), a change since the
            # checksum is still seen here when it moved the size or the time stamp.
            now = os.fstat(fd)
            if (now.st_size, now.st_mtime_ns) != (status.st_size, status.st_mtime_ns):
                raise CopyError(f"{path} changed after its checksum, before the copy began")
            if whole:
                try:
                    mapping = mmap.mmap(fd, whole, prot=mmap.PROT_READ)
                except OSError as exc:
                    # An address-space limit, a file system without mmap (FUSE with
                    # direct I/O): found only now, as the receiver's own mapping is.
                    raise CopyError(f"cannot map {path}: {exc.strerror}") from None
                blocks.append(RAMBlock("data", mapping))
            tail_block = RAMBlock("tail", tail)

            async def connect(channel: int) -> trio.abc.Stream:
                return await open_stream()

            verdict: dict[str, Any] = {}
            aborted = trio.Event()
            # Set before the engine queues its final SYNC round: a receiver says nothing
            # until every channel has ended after that round, so any message before this
            # (an ok verdict above all) cannot be about the whole copy.
            last_page_queued = False
            stopped_by: list[str] = []  # why read_verdict stopped the transfer, if it did
            # No deadline while pages move (the engine bounds those waits); from the
            # last page on, idle_timeout for each message of the receiver.
            waiting = trio.CancelScope()

            async def next_message() -> dict[str, Any] | None:
                """The receiver's next message, or ``None`` when it ended the stream
                because this side stopped (whose own error says why)."""
                try:
                    return await receive_message(control, "its verdict", peer="the receiver")
                except (trio.BrokenResourceError, PeerClosed) as exc:
                    if lease.broken or aborted.is_set():
                        return None
                    raise PeerGone(
                        "the receiver went away before its verdict (it failed or was stopped)"
                    ) from exc

            async def read_verdict() -> None:
                # Read from the start: the receiver says nothing until it checks the
                # copy, so an end of stream before it means the receiver failed or was
                # stopped, and the transfer is cancelled at once rather than at its end.
                with waiting:
                    try:
                        while (message := await next_message()) is not None:
                            if not last_page_queued:
                                raise CopyError(
                                    "the receiver wrote on its control stream mid-transfer (a"
                                    f" {_quoted(message['type'])} message before the sender's"
                                    " last page; nothing may come from it between the go-ahead"
                                    " and the transfer's end)"
                                )
                            if message["type"] != "checking":
                                verdict.update(message)
                                return
                            if waiting.deadline != math.inf:
                                waiting.deadline = trio.current_time() + idle_timeout
                    except CopyError as exc:
                        stopped_by.append(str(exc))
                        raise

            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_verdict)
                try:
                    async with trio.open_nursery() as watching:
                        async with open_sender(
                            connect,
                            channels=channels,
                            uuid=transfer_uuid,
                            compression=compression,
                            compression_level=level,
                            # A receiver that stops reading is a peer that makes no progress.
                            send_timeout=idle_timeout,
                            io_threads=io_threads,
                        ) as sender:
                            watching.start_soon(lease.watch)
                            watching.start_soon(
                                _watch, lambda: sender.stats.page_bytes, data_bytes, progress
                            )
                            await _queue(sender, blocks[0] if blocks else None, ranges)
                            if tail_len:
                                await sender.queue_page(tail_block, 0)
                            last_page_queued = True
                        watching.cancel_scope.cancel()
                except BaseException as exc:
                    # The receiver sees its channels reset (by the engine, before this) and
                    # waits for these words to say why: a channel's reset says nothing. It
                    # may close the control stream on them.
                    aborted.set()
                    # Cancelled by read_verdict's error (an early or malformed message):
                    # the receiver hears that, not a cancel.
                    reason = stopped_by[0] if stopped_by else _abort_reason(exc)
                    with trio.CancelScope(shield=True):
                        await tell(control, {"type": "abort", "error": reason}, idle_timeout)
                    raise
                if mapping is not None:
                    _unmap(mapping, blocks)
                    mapping = None
                # A writer waits for the lease no longer than the pages take to leave.
                lease.release()
                seconds = trio.current_time() - start
                waiting.deadline = trio.current_time() + idle_timeout
                if progress is not None:
                    progress(data_bytes, data_bytes)
            if waiting.cancelled_caught:
                raise CopyError(f"no verdict from the receiver within {idle_timeout}s")
            if verdict.get("type") != "verdict":
                raise CopyError(
                    f"the receiver sent a {_quoted(verdict.get('type'))} message where its"
                    " verdict belongs"
                )
            if verdict.get("ok") is not True:
                raise CopyError(
                    f"the receiver rejected the copy: {_shown(verdict.get('error', verdict))}"
                )
            if verdict.get("checksum") != checksum:
                raise CopyError(
                    f"the receiver's verdict names checksum {_shown(verdict.get('checksum'))},"
                    f" the file's is {checksum}"
                )
        finally:
            await trio.aclose_forcefully(control)
        stats = sender.stats
        return Summary(
            path=path,
            size=size,
            data_bytes=data_bytes,
            seconds=seconds,
            wire_bytes=stats.bytes,
            normal_pages=stats.normal_pages,
            zero_pages=stats.zero_pages,
            checksum=checksum,
            channels=channels,
            compression=compression,
        )
    finally:
        if mapping is not None:
            _unmap(mapping, blocks)
        os.close(fd)


def _abort_reason(exc: BaseException) -> str:
    """Why the sender stopped mid-transfer, as its abort message says it."""
    rest: BaseException | None = exc
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(trio.Cancelled)
    elif isinstance(exc, trio.Cancelled):
        rest = None
    if rest is None:
        return "it was cancelled (Ctrl-C, SIGTERM or its application)"
    return _cut(describe(rest), _SHOWN_LIMIT)


async def _go_ahead(
    control: trio.abc.Stream,
    manifest: dict[str, Any],
    lease: _SourceLease,
    idle_timeout: float,
    *,
    plain: bool,
) -> dict[str, Any]:
    """Send the manifest and read the receiver's reply, while the lease is watched: a
    writer waits for the file no longer than a poll, however long the receiver takes."""
    reply: dict[str, Any] | CopyError
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lease.watch)
        try:
            with trio.fail_after(idle_timeout):
                await control.send_all(CONTROL_MAGIC)
                await send_message(control, manifest)
                reply = await receive_message(control, "its go-ahead", peer="the receiver")
        except trio.TooSlowError:
            reply = CopyError(f"no go-ahead from the receiver within {idle_timeout}s")
        except PeerClosed as exc:
            # A receiver that uses TLS drops a plain sender's connection so, or resets it.
            hint = " (it failed, was stopped, or uses TLS: then give --tls-ca)" if plain else ""
            reply = CopyError(f"{exc}{hint}")
        except trio.BrokenResourceError as exc:
            # A receiver busy with another copy resets the connections that wait in its
            # listen queue when that copy ends (and a stray one at once, mid-handshakes).
            tls_hint = "; or it uses TLS: then give --tls-ca" if plain else ""
            reply = CopyError(
                "the control stream failed before the receiver's go-ahead:"
                f" {exc.__cause__ or exc} (the receiver failed, was stopped or is busy with"
                f" another copy{tls_hint})"
            )
        except CopyError as exc:
            reply = exc
        nursery.cancel_scope.cancel()
    if isinstance(reply, CopyError):
        try:
            raise reply
        finally:
            # This frame is in its traceback: holding it would make a reference cycle.
            del reply
    return reply


async def _queue(sender: Any, block: RAMBlock | None, ranges: list[tuple[int, int]]) -> None:
    if block is None:
        return
    stall = float(os.environ.get(_STALL_ENV) or 0)
    total = sum(e - s for s, e in ranges)
    queued = 0
    for start, end in ranges:
        if stall and queued + (end - start) > total // 2 >= queued:
            middle = start + (total // 2 - queued) // PAGE * PAGE
            await sender.queue_pages(block, range(start, middle, PAGE))
            await sender.sync()
            await trio.sleep(stall)
            stall = 0
            start = middle
        await sender.queue_pages(block, range(start, end, PAGE))
        queued += end - start


# -- the receiver -----------------------------------------------------------------------------


def _manifest_name(path: str) -> str:
    """The source's name as the manifest carries it: printable UTF-8. A file system takes
    any bytes but NUL and ``/``; each that is not UTF-8, and each character that is not
    printable, becomes U+FFFD (the receiver uses the name only for a directory PATH)."""
    name = os.fsencode(os.path.basename(path)).decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "\ufffd" for c in name)


def _check_manifest(manifest: dict[str, Any]) -> None:
    def bad(field: str) -> CopyError:
        return CopyError(f"bad manifest: field {field!r} is {_quoted(manifest.get(field))}")

    if manifest.get("type") != "manifest":
        raise CopyError(f"expected a manifest, got a {_quoted(manifest.get('type'))} message")
    name = manifest.get("name")
    if (
        not isinstance(name, str)
        or not name
        or "/" in name
        or "\0" in name
        or name in (".", "..")
        or not name.isprintable()
    ):
        raise bad("name")
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        raise bad("name") from None
    for field in ("size", "data_bytes", "nonzero_bytes"):
        # type() rather than isinstance(): JSON's true and false arrive as bool.
        if type(manifest.get(field)) is not int or not 0 <= manifest[field] <= MAX_SIZE:
            raise bad(field)
    if manifest["nonzero_bytes"] > manifest["data_bytes"]:
        raise bad("nonzero_bytes")
    # 4096.0 == 4096: an integer is what the framing says, as for the sizes.
    if type(manifest.get("page_size")) is not int or manifest["page_size"] != PAGE:
        raise bad("page_size")
    channels = manifest.get("channels")
    if type(channels) is not int or not 1 <= channels <= 255:
        raise bad("channels")
    method = manifest.get("method")
    if not isinstance(method, str):
        raise bad("method")
    try:
        get_method(method)
    except ValueError as exc:
        # get_method's error quotes the whole name, which may fill the manifest.
        if len(method) > _QUOTED_LIMIT:
            raise bad("method") from None
        raise CopyError(f"cannot receive: {exc}") from None
    try:
        canonical = str(uuid_mod.UUID(manifest.get("uuid")))
    except (TypeError, ValueError, AttributeError):
        raise bad("uuid") from None
    # Only the form str(UUID) gives: the uuid's first 8 characters name the temporary
    # file, and UUID() also takes braces, "urn:uuid:", blanks and non-ASCII digits.
    if manifest["uuid"] != canonical:
        raise bad("uuid")
    # Optional (a sender before it sent none: the copy gets 0o644).
    mode = manifest.setdefault("mode", _DEFAULT_MODE)
    if type(mode) is not int or not 0 <= mode <= _MODE_BITS:
        raise bad("mode")
    checksum = manifest.get("checksum")
    if (
        not isinstance(checksum, dict)
        or checksum.get("algorithm") != CHECKSUM
        or not isinstance(checksum.get("value"), str)
        or not re.fullmatch(r"[0-9a-f]{32}", checksum["value"])
    ):
        raise bad("checksum")


# A peer's values and words are quoted in errors at most this long (in characters):
# a manifest's field may fill most of 64 KiB, and each escape of a refusal's JSON
# multiplies it, past what one control message may hold and one line should.
_QUOTED_LIMIT = 100
# A receiver's own words may name a path of up to PATH_MAX (4096 bytes).
_SHOWN_LIMIT = 5000


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def _quoted(value: object) -> str:
    """A value from the peer, as Python writes it, cut to :data:`_QUOTED_LIMIT`."""
    return _cut(repr(value), _QUOTED_LIMIT)


def _shown(text: object) -> str:
    """A peer's text as one line: printable as it is, else quoted with escapes; cut to
    :data:`_SHOWN_LIMIT`."""
    text = str(text)
    return _cut(text if text.isprintable() else repr(text), _SHOWN_LIMIT)


async def receive_file(
    path: str,
    host: str,
    port: int,
    *,
    force: bool = False,
    max_channels: int = MAX_CHANNELS,
    tls: ssl.SSLContext | None = None,
    progress: Progress | None = None,
    announce: Callable[[str, int], None] | None = None,
    notice: Callable[[str], None] | None = None,
    handshake_timeout: float = 30.0,
    idle_timeout: float = IDLE_TIMEOUT,
    io_threads: int | None = None,
) -> Summary:
    """Listen at ``host:port``, receive one file into ``path`` (a file name, or an
    existing directory to put the sender's file name in), and return.

    The transfer fails when no page data arrives for ``idle_timeout`` seconds: a sender
    that never opens its channels, or stalls, cannot keep the receiver waiting. A
    manifest asking for more than ``max_channels`` channels is refused. ``notice`` gets
    the lines of :func:`~._control.accept_control` (a TLS handshake that closed)."""
    listeners: list[trio.abc.Listener[trio.abc.Stream]]
    refused = _refused_before_listening(path, force=force)
    if refused:
        raise CopyError(refused)
    try:
        tcp = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise CopyError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    # With port 0 each address (say ::1 and 127.0.0.1) got a port of its own: keep the
    # ones on the port that is announced.
    chosen = tcp[0].socket.getsockname()[1]
    kept: list[trio.SocketListener] = []
    for opened in tcp:
        if opened.socket.getsockname()[1] == chosen:
            kept.append(opened)
        else:
            await trio.aclose_forcefully(opened)
    tcp = kept
    listeners = list(tcp)
    if tls is not None:
        listeners = [trio.SSLListener(listener, tls) for listener in tcp]
    try:
        if announce is not None:
            announce(host, chosen)
        control, manifest = await accept_control(listeners, handshake_timeout, notice)
        try:
            return await _receive_with(
                control,
                manifest,
                listeners,
                path,
                force=force,
                max_channels=max_channels,
                progress=progress,
                handshake_timeout=handshake_timeout,
                idle_timeout=idle_timeout,
                io_threads=io_threads,
            )
        finally:
            # Shielded: once the copy has its name, a cancel must not turn the Summary
            # into an error on the way out.
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(control)
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await trio.aclose_forcefully(listener)


async def _watch_idle(get: Callable[[], int], idle_timeout: float) -> None:
    """Raise when ``get()`` (the bytes received) stays the same for ``idle_timeout``."""
    last, since = get(), trio.current_time()
    while True:
        await trio.sleep(min(1.0, idle_timeout))
        now, value = trio.current_time(), get()
        if value != last:
            last, since = value, now
        elif now - since >= idle_timeout:
            raise CopyError(
                f"no data from the sender for {idle_timeout}s (its channels never opened,"
                " or it stalled)"
            )


async def _checking(control: trio.abc.Stream, interval: float) -> None:
    """Tell the sender, every ``interval``, that the receiver is still checking."""
    while True:
        await trio.sleep(interval)
        await send_message(control, {"type": "checking"})


async def _receive_with(
    control: trio.abc.Stream,
    manifest: dict[str, Any],
    listeners: list[trio.abc.Listener[trio.abc.Stream]],
    path: str,
    *,
    force: bool,
    max_channels: int,
    progress: Progress | None,
    handshake_timeout: float,
    idle_timeout: float,
    io_threads: int | None,
) -> Summary:
    async def refuse(error: str, here: str | None = None) -> CopyError:
        return await refusal(control, error, here, patience=idle_timeout)

    async def reject(error: str) -> CopyError:
        """Tell the sender that the copy failed and why (see :func:`tell`), and return
        the error to raise here."""
        await tell(control, {"type": "verdict", "ok": False, "error": error}, idle_timeout)
        return CopyError(error)

    try:
        _check_manifest(manifest)
    except CopyError as exc:
        raise await refuse(str(exc)) from None
    if manifest["channels"] > max_channels:
        raise await refuse(
            f"the sender asks for {manifest['channels']} channels, more than this"
            f" receiver's --max-channels {max_channels}",
        )
    final, temp, exists = _destination(path, manifest["name"], manifest["uuid"])
    # Found now rather than by the rename after the whole copy, and before the advice
    # to use --force, which would not help.
    unreplaceable = _unreplaceable(final)
    if unreplaceable:
        raise await refuse(unreplaceable)
    if exists and not force:
        raise await refuse(
            f"{final} exists (use --force on the receiver)",
            f"{final} exists: refusing to overwrite it without --force",
        )
    # Checked now: the temporary name is short enough anyway, and the final one would
    # fail only after the whole copy.
    too_long = _name_too_long(final)
    if too_long:
        raise await refuse(too_long)
    size: int = manifest["size"]
    channels: int = manifest["channels"]
    try:
        # Private while it is written: the source may be (its mode comes at the end).
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise await refuse(
            f"cannot create the file: {exc}", f"cannot create {temp}: {exc.strerror}"
        ) from None
    renamed = False
    mapping: mmap.mmap | None = None
    try:
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise await refuse(f"cannot make a file of {size} bytes: {exc.strerror}") from None
        # Refused up front rather than found out mid-copy (a MappingError when the
        # engine faults pages in that the file system has no room for): another writer
        # can still fill the disk during the copy (see docs/cli.rst).
        vfs = os.fstatvfs(fd)
        free = vfs.f_bavail * vfs.f_frsize
        if free < manifest["nonzero_bytes"]:
            raise await refuse(
                f"not enough space for the copy: its data needs {manifest['nonzero_bytes']}"
                f" bytes, the file system has {free} free",
            )
        whole = size // PAGE * PAGE
        tail_len = size - whole
        blocks: list[RAMBlock] = []
        if whole:
            try:
                mapping = mmap.mmap(fd, whole)
            except OSError as exc:
                # A file system may take a size that the address space cannot map.
                raise await refuse(f"cannot map a file of {size} bytes: {exc.strerror}") from None
            # No read-ahead around the pages written: on ext4 with large folios (Linux
            # 6.16+) a write fault reads ahead into folios of up to megabytes, which the
            # write dirties whole, allocating the holes around the page (a copy of a
            # 64 MiB image with 16 MiB of data allocated 50 MiB without this).
            mapping.madvise(mmap.MADV_RANDOM)
            blocks.append(RAMBlock("data", mapping, zeroed=True))
        tail = bytearray(PAGE)
        blocks.append(RAMBlock("tail", tail, zeroed=True))
        start = trio.current_time()
        try:
            stats = await _transfer(
                control,
                manifest,
                listeners,
                blocks,
                refuse,
                progress=progress,
                handshake_timeout=handshake_timeout,
                idle_timeout=idle_timeout,
                io_threads=io_threads,
            )
        except Exception as exc:
            if not _left_by_the_sender(exc):
                raise
            # The channels' reset says nothing of why: the sender's word does, which
            # comes (or its end of stream) on the control stream right after.
            said: list[CopyError] = []
            with trio.move_on_after(min(SENDERS_WORD_WAIT, idle_timeout)):
                await _note_word(control, said)
            if not said or not isinstance(said[0], PeerGone):
                raise
            raise said.pop() from exc
        seconds = trio.current_time() - start
        if progress is not None:
            progress(manifest["data_bytes"], manifest["data_bytes"])
        if mapping is not None:
            _unmap(mapping, blocks)
            mapping = None
        if tail_len and any(tail[:tail_len]):
            try:
                os.pwrite(fd, tail[:tail_len], whole)
            except OSError as exc:
                # Another writer may have filled the disk since the free-space check.
                raise await reject(
                    f"cannot write the copy's last partial page: {exc.strerror}"
                ) from None
        # A sender that stopped at a SYNC ended its channels as cleanly as one that is
        # done; its word (or end of stream), which a sender waiting for the verdict does
        # not send, says why the copy differs.
        word: list[CopyError] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_checking, control, min(CHECKING_INTERVAL, idle_timeout / 3))
            nursery.start_soon(_note_word, control, word)
            checksum, _ = await scan_in_thread(fd, size, count_pages=False, name="the copy")
            nursery.cancel_scope.cancel()
        expected = manifest["checksum"]["value"]
        if checksum != expected and word and isinstance(word[0], PeerGone):
            raise word.pop()
        if checksum != expected:
            raise await reject(
                f"checksum mismatch: the copy has {checksum}, the manifest says {expected}",
            )
        try:
            os.fchmod(fd, manifest["mode"])
        except OSError as exc:
            # A file system without Unix permission bits (vfat, exFAT, some network
            # mounts) refuses a mode it cannot keep: the copy, whole and checked, keeps
            # the one it gives every file rather than being thrown away for it.
            if exc.errno not in _NO_PERMISSION_BITS:
                raise await reject(
                    f"cannot give the copy mode {manifest['mode']:#o}: {exc.strerror}"
                ) from None
        try:
            os.fsync(fd)
        except OSError as exc:
            raise await reject(
                f"cannot write the copy to its file system: {exc.strerror}"
            ) from None
        # A cancel (Ctrl-C, SIGTERM) noticed by now aborts before the copy gets its name;
        # from the name on, the copy is done, and reported so even if a cancel comes.
        await trio.lowlevel.checkpoint()
        try:
            if force:
                os.replace(temp, final)
            else:
                # link() refuses an existing name, atomically: no check-then-rename race.
                os.link(temp, final)
                os.unlink(temp)
        except OSError as exc:
            raise await reject(f"cannot rename the copy to {final}: {exc.strerror}") from None
        renamed = True
        # The sender may be gone or stalled: the copy is whole and named all the same.
        with trio.CancelScope(shield=True):
            await tell(
                control, {"type": "verdict", "ok": True, "checksum": checksum}, idle_timeout
            )

        return Summary(
            path=final,
            size=size,
            data_bytes=manifest["data_bytes"],
            seconds=seconds,
            wire_bytes=stats.bytes,
            normal_pages=stats.normal_pages,
            zero_pages=stats.zero_pages,
            checksum=checksum,
            channels=channels,
            compression=manifest["method"],
        )
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise CopyError(f"control stream failed: {exc.__cause__ or exc}") from None
    finally:
        if mapping is not None:
            _unmap(mapping, blocks)
        os.close(fd)
        if not renamed:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass


async def _transfer(
    control: trio.abc.Stream,
    manifest: dict[str, Any],
    listeners: list[trio.abc.Listener[trio.abc.Stream]],
    blocks: list[RAMBlock],
    refuse: Callable[[str], Awaitable[CopyError]],
    *,
    progress: Progress | None,
    handshake_timeout: float,
    idle_timeout: float,
    io_threads: int | None,
) -> TransferStats:
    """Receive the pages into ``blocks``, from the go-ahead to the last channel's clean
    end, while the control stream is watched."""
    # Entered by hand: only the receiver's own allocation is a refusal, not a
    # MemoryError from inside its block.
    async with contextlib.AsyncExitStack() as stack:
        try:
            receiver = await stack.enter_async_context(
                open_receiver(
                    blocks,
                    channels=manifest["channels"],
                    uuid=uuid_mod.UUID(manifest["uuid"]),
                    compression=manifest["method"],
                    handshake_timeout=handshake_timeout,
                    io_threads=io_threads,
                )
            )
        except MemoryError as exc:
            raise await refuse(
                f"cannot receive a file of {manifest['size']} bytes: {exc}"
            ) from None
        await send_message(control, {"type": "go"})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _watch, lambda: receiver.stats.page_bytes, manifest["data_bytes"], progress
            )
            nursery.start_soon(_watch_control, control)
            nursery.start_soon(_watch_idle, lambda: receiver.stats.bytes, idle_timeout)
            await nursery.start(receiver.serve, listeners)
            await receiver.wait_closed()
            nursery.cancel_scope.cancel()
        return receiver.stats


def _unmap(mapping: mmap.mmap, blocks: list[RAMBlock]) -> None:
    # The blocks' views pin the mapping; release them first. The pages are in the page
    # cache either way: the checksum's pread sees them and fsync writes them.
    for block in blocks:
        block.view.release()
    blocks.clear()
    try:
        mapping.close()
    except BufferError:  # a view the engine still holds: the mapping goes with it
        pass


def _refused_before_listening(path: str, *, force: bool) -> str | None:
    """Why ``recv`` cannot take ``path`` whatever a sender sends: found before it
    listens, not once a sender has connected and sent its manifest."""
    if os.path.isdir(path):
        # The sender's name in it is checked once the manifest gives it.
        return _unwritable(path, path)
    if path.endswith(os.sep):
        return f"{path} is not a directory"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"cannot receive into {path}: {parent} is not a directory"
    unreplaceable = _unreplaceable(path)
    if unreplaceable:
        return unreplaceable
    if not force and os.path.lexists(path):
        return f"{path} exists: refusing to overwrite it without --force"
    return _unwritable(path, parent)


def _unwritable(path: str, folder: str) -> str | None:
    """Why the copy's temporary file cannot be created in ``folder``, if it cannot."""
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        return f"cannot receive into {path}: {folder} is on a read-only file system"
    return f"cannot receive into {path}: no permission to create a file in {folder}"


_NODE_KINDS = [
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
]


def _unreplaceable(final: str) -> str | None:
    """Why the copy cannot take the name ``final``: a node there, not through a symbolic
    link (the link is what a rename replaces), that is not a regular file. Renaming over
    a device would drop the node itself (``recv /dev/sdb --force`` would leave the disk
    without its node and the image in /dev's memory)."""
    try:
        mode = os.lstat(final).st_mode
    except OSError:
        return None
    for test, kind in _NODE_KINDS:
        if test(mode):
            return f"{final} is {kind}: it cannot be replaced by the copy"
    return None


def _destination(path: str, name: str, transfer: str) -> tuple[str, str, bool]:
    """The final name, the temporary name beside it, and whether the final one exists."""
    final = os.path.join(path, name) if os.path.isdir(path) else path
    directory = os.path.dirname(os.path.abspath(final))
    # The final name may use all of NAME_MAX (255 bytes); the temporary one adds 15.
    stem = os.fsencode(os.path.basename(final))[:200].decode("utf-8", "ignore")
    temp = os.path.join(directory, f".{stem}.{transfer[:8]}.part")
    return final, temp, os.path.lexists(final)


def _name_too_long(final: str) -> str | None:
    """Why ``final``'s name is too long for its file system, if it is."""
    directory, base = os.path.split(os.path.abspath(final))
    try:
        limit = os.pathconf(directory, "PC_NAME_MAX")
    except OSError:
        return None  # creating the file will say what is wrong with the directory
    if len(os.fsencode(base)) > limit:
        return f"the name {_quoted(base)} is too long for the file system of {directory}"
    return None


async def _senders_word(control: trio.abc.Stream) -> CopyError:
    """What the sender says on its control stream between the manifest and the verdict,
    where it says nothing unless it stops: a :class:`PeerGone` for its end of stream or
    its ``abort`` message, a :class:`CopyError` for anything else (a byte breaks the
    framing)."""
    try:
        first = await control.receive_some(1)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        first = b""
    if not first:
        return PeerGone("the sender went away (its control stream closed mid-transfer)")
    message: dict[str, Any] | None = None
    # Shielded: a cancel must not leave the stream mid-message for the next reader (see
    # _receive_with); the sender writes a message at once, so its rest is already here.
    with (
        trio.CancelScope(shield=True),
        trio.move_on_after(_MESSAGE_REST),
        contextlib.suppress(CopyError, trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        message = await receive_message(
            control, "the rest of its message", bytes(first), peer="the sender"
        )
    if message is not None and message["type"] == "abort":
        return PeerGone(f"the sender stopped mid-transfer: {_shown(message.get('error'))}")
    return CopyError(
        "the sender wrote on its control stream mid-transfer (nothing but an abort may come"
        " from it between the manifest and the verdict)"
    )


async def _watch_control(control: trio.abc.Stream) -> NoReturn:
    raise await _senders_word(control)


async def _note_word(control: trio.abc.Stream, said: list[CopyError]) -> None:
    said.append(await _senders_word(control))


def _left_by_the_sender(exc: BaseException) -> bool:
    """Whether ``exc``, from the receiver's block, is what a sender that stopped leaves:
    its channels reset or ended, and no error of this side's own."""
    leaves = list(_leaves(exc)) if isinstance(exc, BaseExceptionGroup) else [exc]
    return not any(isinstance(leaf, CopyError | MappingError) for leaf in leaves) and any(
        isinstance(leaf, TransportError | TruncatedError | TransferIncompleteError)
        for leaf in leaves
    )


def describe(exc: BaseException) -> str:
    """One line for an error, the exception group case included."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = list(_leaves(exc))
        # This side's own failure first, then a mapped file's fault (a truncated source,
        # a full disk), which explains why the peer left, then the rest.
        ranked = sorted(
            leaves,
            key=lambda e: (
                0
                if isinstance(e, CopyError) and not isinstance(e, PeerGone)
                else 1
                if isinstance(e, MappingError)
                else 2
                if isinstance(e, CopyError)
                else 3
            ),
        )
        chosen = ranked[0] if ranked else exc
        return describe(chosen) if chosen is not exc else str(exc)
    if isinstance(exc, MultiFDError):
        return f"transfer failed: {exc}"
    return str(exc) or type(exc).__name__


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
