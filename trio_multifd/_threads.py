"""Which worker thread moves which channel's packets.

Both ends move packets in worker threads: ``sendmsg``, ``recvmsg_into``, zlib and zstd
release the GIL, so the Trio thread only coordinates. Channels over sockets share
``io_threads`` threads, dealt round-robin by channel id (channel ``c`` goes to thread
``c % io_threads``); a channel over any other stream (TLS, memory streams) hands each
operation back to Trio and gets a thread of its own.

Why not one thread per channel: on a machine with fewer cores than threads (both ends of
a loopback transfer share the cores), every extra thread costs context switches and a
GIL hand-over after each system call. Measured on 2 cores, 4 channels, both ends on one
machine: see ``docs/performance.rst``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import attrs
import trio

from ._transport import SocketTransport, Transport
from ._wire import checked_count

__all__ = ["WorkerRun", "default_io_threads", "io_thread_count", "shared_slot", "thread_slot"]


def default_io_threads(compressing: bool) -> int:
    """The default worker thread count of one end: with compression one per core
    (compression is the sender's work: zlib needs every core it can get; a receiver
    decoding 4 zstd channels alone in one thread held the sender back: 1.24 against
    1.44 GB/s with two, medians of 5, 2 cores); otherwise half the cores, at least one
    (the kernel's copies are the work and both ends of a transfer on one machine share
    its cores)."""
    cores = os.cpu_count() or 1
    return cores if compressing else max(1, cores // 2)


def io_thread_count(io_threads: int | None, channels: int, *, compressing: bool) -> int:
    """Check ``io_threads`` (``None`` for :func:`default_io_threads`) and return how many
    worker threads the channels over sockets share: never more than the channels."""
    if io_threads is None:
        io_threads = default_io_threads(compressing)
    else:
        checked_count("io_threads", io_threads, 1, 255)
    return min(io_threads, channels)


def shared_slot(channel: int, threads: int) -> int:
    """The shared thread of ``channel`` if its stream is a socket."""
    return channel % threads


def thread_slot(channel: int, transport: Transport, threads: int) -> int | None:
    """The shared thread that moves ``channel``'s packets, or ``None`` when the channel
    needs a thread of its own (its stream is not a socket that the thread can poll)."""
    if isinstance(transport, SocketTransport):
        return shared_slot(channel, threads)
    return None


@attrs.define(eq=False)
class WorkerRun:
    """A crew's worker thread, as the tasks of the crew's channels see it: the task of
    the first channel runs it, the others wait for it to succeed, and none closes its
    stream while the thread may still use it."""

    done: trio.Event = attrs.Factory(trio.Event)
    """Set when the thread returned normally."""
    stopped: trio.Event = attrs.Factory(trio.Event)
    """Set when the thread is over: returned, raised or cancelled."""
    started: bool = False

    async def run(self, work: Callable[[], None], limiter: trio.CapacityLimiter) -> None:
        """Run ``work`` in a worker thread; its exception is raised here."""
        self.started = True
        # The thread's exception comes back through a list, not through Trio's outcome:
        # the frames of its traceback link up to Trio's thread-cache frame, whose local
        # outcome would hold the exception, a reference cycle that keeps the channels'
        # buffers (the thread's locals) until the cyclic collector runs.
        raised: list[BaseException] = []

        def guarded() -> None:
            try:
                work()
            except BaseException as exc:
                raised.append(exc)

        try:
            await trio.to_thread.run_sync(guarded, limiter=limiter)
        finally:
            self.stopped.set()
        if raised:
            raise raised.pop()
        self.done.set()

    async def released(self) -> None:
        """Wait, cancelled or not, until the thread no longer uses the crew's sockets.

        Bounded because a crew's tasks leave early only through the transfer's
        cancellation, which reaches the thread too: a cancelled thread stops within one
        packet or one poll interval (:data:`~trio_multifd._transport.CANCEL_CHECK`)."""
        if self.started:
            with trio.CancelScope(shield=True):
                await self.stopped.wait()
