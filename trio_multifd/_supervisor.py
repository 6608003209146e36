"""Structured teardown shared by both ends: first error wins, everything is cancelled,
and the user sees one exception.

This replaces QEMU's ``terminate_threads`` (an atomic "exiting" flag, semaphores posted
to wake every waiter, channels shut down by hand) with a nursery's cancel scope.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import NoReturn, final

import trio

from ._errors import MultiFDError

__all__ = ["Supervisor", "interrupt_in", "logger", "refuse_unless_cancelled"]

logger = logging.getLogger("trio_multifd")
# A library stays silent unless the application configures logging.
logger.addHandler(logging.NullHandler())


async def refuse_unless_cancelled(error: RuntimeError) -> NoReturn:
    """Raise ``error`` (a wait that the transfer's end cut short), unless the caller is
    being cancelled: then its ``Cancelled``.

    A task woken by the transfer's end may run before the cancellation that the same
    failure sent its scope could reach it (it was rescheduled already). Inside the
    transfer's block that cancellation is what turns into the transfer's own error; a
    ``RuntimeError`` would pass for the application's and replace it.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        raise error
    finally:
        # This frame is in its traceback: holding it would make a reference cycle.
        del error


class _Unchained(Exception):
    """What the Cancelled of :func:`_cancel_unchained` have as their ``__context__``."""


def _cancel_unchained(scope: trio.CancelScope) -> None:
    """Cancel ``scope`` so that the Cancelled it raises are not chained to the exception
    being handled (the transfer's error, when a channel task fails).

    Trio raises them at once, in this call, so Python gives them that exception as their
    ``__context__``: the error would hold its own traceback's frames' Cancelled, a
    reference cycle (see :meth:`Supervisor.fail`).
    """
    try:
        raise _Unchained("the transfer failed")
    except _Unchained as unchained:
        unchained.__context__ = None
        scope.cancel()


def _weakly(error: Exception) -> Callable[[], Exception | None]:
    try:
        return weakref.ref(error)
    except TypeError:
        # A built-in exception (a bug's: KeyError, say) takes no weak reference: it is
        # kept, and with it, until the cyclic collector runs, what its traceback holds.
        return lambda: error


def _first_leaf(exceptions: Sequence[BaseException]) -> BaseException:
    first = exceptions[0]
    return _first_leaf(first.exceptions) if isinstance(first, BaseExceptionGroup) else first


def _is_interrupt(exc: BaseException) -> bool:
    return not isinstance(exc, Exception | trio.Cancelled | BaseExceptionGroup)


def interrupt_in(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The first exception in ``group`` (nested groups included) that is neither an
    ``Exception`` nor ``Cancelled``: a ``KeyboardInterrupt`` that Trio's signal handler
    raised in one of the library's tasks, say, which is to leave bare, as it would
    from a plain ``await``."""
    interrupts, _ = group.split(_is_interrupt)
    return None if interrupts is None else _first_leaf(interrupts.exceptions)


@final
class Supervisor:
    """Owns a transfer's nursery and decides what leaves its ``async with``."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.failed = False
        self._error: Exception | None = None
        self._error_after: Callable[[], Exception | None] | None = None
        self._ended = False
        # A KeyboardInterrupt (or another BaseException) raised in one of our tasks.
        self.interrupt: BaseException | None = None
        self._errors: list[Exception] = []
        # RuntimeErrors of calls that the transfer's failure refused: see refusal().
        self._refusals: list[RuntimeError] = []
        self._nursery: trio.Nursery | None = None

    @property
    def error(self) -> Exception | None:
        """The transfer's error (see :attr:`failed`): after the end's block, only while
        something else holds it.

        Its traceback runs through the application's frames, which hold this end: kept
        past the block, it would make the end, the channels' buffers and those frames'
        locals (the application's blocks) a reference cycle, freed only by the cyclic
        collector once the application dropped the error.
        """
        if self._error_after is not None:
            return self._error_after()
        return self._error

    @property
    def nursery(self) -> trio.Nursery:
        """The nursery of the transfer's tasks (see :meth:`check_opened`)."""
        self.check_opened()
        assert self._nursery is not None
        return self._nursery

    def check_opened(self) -> None:
        """Raise ``RuntimeError`` if the end was made directly, not by its ``open_*``
        function: it has no channels, and waiting for one would wait for ever."""
        if self._nursery is None:
            raise RuntimeError(
                f"this {self.role} was not opened: make it with open_{self.role}(), whose"
                " block runs its channels"
            )

    def refusal(self, message: str) -> RuntimeError:
        """The ``RuntimeError`` of a call that the transfer's end refused or cut short,
        with the transfer's error, if it failed, as its ``__cause__``.

        Left uncaught in the block (a shielded ``sync()`` in its cleanup, say), such an
        error only says that the transfer failed: the block raises the transfer's error
        instead, as it would have without the cleanup.
        """
        refused = RuntimeError(message)
        refused.__cause__ = self.error
        refused.__suppress_context__ = True
        if self._error is not None or self.interrupt is not None:
            self._refusals.append(refused)
        return refused

    def fail(self, exc: Exception, *, channel: int | None = None) -> None:
        """Record ``exc`` (of ``channel``, when it names none yet); the first one
        recorded cancels the whole transfer. Any exception but a :class:`MultiFDError` is
        a bug (say, of a third-party compression method) and gets a note naming the
        channel."""
        if not isinstance(exc, MultiFDError):
            if channel is not None:
                exc.add_note(f"raised in channel {channel} of the {self.role}")
        elif exc.channel is None:
            exc.channel = channel
        if self._ended:
            # A handshake that failed after the block: there is nothing left to cancel.
            if not self.failed:
                self.failed = True
                self._error_after = _weakly(exc)
            return
        self._errors.append(exc)
        if self.failed:
            return
        self.failed = True
        self._error = exc
        # The text, not the error: a handler may keep its records (a MemoryHandler,
        # pytest's), and the error's traceback holds the transfer's frames and buffers.
        logger.error("%s failed: %s", self.role, str(exc))
        # cancel() raises each waiting task's Cancelled right here, with a traceback
        # whose frames link up to this one and its callers': a frame still holding the
        # error would tie it to those Cancelled, which tasks of the application
        # (Trio's nursery exits, contextlib's) keep in frames that the error's own
        # traceback holds, a reference cycle.
        del exc
        if self._nursery is not None:
            _cancel_unchained(self._nursery.cancel_scope)

    def interrupted(self, exc: BaseException) -> None:
        """A task of the transfer is ending with ``exc``: when that is, or a group of it
        holds, an exception that is neither an ``Exception`` nor ``Cancelled`` (a
        ``KeyboardInterrupt`` that Trio's signal handler raised in the library's code,
        say), the first one is recorded, to leave the block bare, and the transfer
        cancelled at once. The task's cleanup awaits: there the teardown's ``Cancelled``
        replaces the exception in flight, which the nursery then swallows, and a call of
        the application's that the cleanup wakes (a ``queue_pages`` waiting for room)
        would be refused with a ``RuntimeError`` passing for the application's own."""
        if isinstance(exc, BaseExceptionGroup):
            # A nursery of the task's own (one in the application's connect, as
            # trio.open_tcp_stream has) ends with a group of its tasks' Cancelled when
            # the transfer is torn down: that is no interrupt.
            found = interrupt_in(exc)
            if found is None:
                return
            exc = found
        elif isinstance(exc, Exception | trio.Cancelled):
            return
        if self.interrupt is None:
            self.interrupt = exc
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def channel_failed(self, exc: MultiFDError, channel: int) -> None:
        """A channel task's error: recorded like :meth:`fail`, unless the task is
        already being cancelled (the application left, or another channel failed
        first), when it is only its peer reacting to the teardown; then the task's
        ``Cancelled`` is raised instead."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self.fail(exc, channel=channel)
        del exc  # see fail()

    def _is_ours(self, exc: BaseException) -> bool:
        if isinstance(exc, BaseExceptionGroup):
            return all(self._is_ours(e) for e in exc.exceptions)
        return isinstance(exc, trio.Cancelled) or any(
            exc is e for e in (self.interrupt, *self._errors, *self._refusals)
        )

    def _outcome(self, exc: BaseException, body_exc: BaseException | None) -> BaseException:
        if body_exc is not None and not self._is_ours(body_exc):
            # The application's own exception (KeyboardInterrupt included) passes
            # through as it was raised, not wrapped in our nursery's group; from a group
            # of the application's, the Cancelled and errors of this transfer are
            # stripped (they only say the transfer stopped because of it).
            if isinstance(body_exc, BaseExceptionGroup):
                _, rest = body_exc.split(lambda e: self._is_ours(e))
                if rest is not None:
                    return rest
            return body_exc
        # Before a transfer error: the application was told to stop, not to retry.
        if self.interrupt is not None:
            return self.interrupt
        if isinstance(exc, BaseExceptionGroup):
            # Raised on the caller's own task outside the body, by Trio's SIGINT
            # handler: while the end waited for its channels to connect, or at the exit,
            # for the last round or the receiver's confirmation. Trio puts it in the
            # nursery's group.
            interrupt = interrupt_in(exc)
            if interrupt is not None:
                return interrupt
        error = self._error
        if error is not None:
            # A group that holds something else than the transfer's errors and
            # cancellations (a bug in another task) must not vanish: it is chained, over
            # the error's own cause if need be. One of ours only would say nothing, and
            # holds the error itself and the Cancelled raised while it was handled, whose
            # tracebacks lead back to it: a reference cycle.
            if not self._is_ours(exc):
                error.__cause__ = exc
            return error
        if isinstance(exc, BaseExceptionGroup) and exc.split(trio.Cancelled)[1] is None:
            # Cancelled from outside: one Cancelled, as a plain await would raise, not
            # the nursery's group of every task's (the body's own, when it has one).
            if isinstance(body_exc, trio.Cancelled):
                return body_exc
            # Not one from inside the body's group (the application's nursery's): raised
            # out of the block, its traceback would take in contextlib's frame, which
            # holds that group, a reference cycle.
            return _first_leaf([e for e in exc.exceptions if e is not body_exc] or exc.exceptions)
        return exc

    @asynccontextmanager
    async def run(
        self,
        start: Callable[[trio.Nursery], Awaitable[None]],
        finish: Callable[[], Awaitable[None]],
    ) -> AsyncIterator[None]:
        """Run ``start``, the body, then ``finish``, all inside the transfer's nursery."""
        pending: BaseException | None = None
        body_exc: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await start(nursery)
                try:
                    yield
                except BaseException as exc:
                    body_exc = exc
                    raise
                await finish()
        except BaseException as exc:
            pending = self._outcome(exc, body_exc)
        else:
            # The nursery absorbs the Cancelled of its own scope: the recorded error
            # must be raised explicitly, or the body's failure would pass as success.
            pending = self.interrupt or self._error
        finally:
            self._let_go()
        if pending is not None:
            try:
                raise pending
            finally:
                # This frame is in the traceback: its locals must not hold the error.
                del pending, body_exc

    def _let_go(self) -> None:
        """Hold the exceptions of the transfer no more (see :attr:`error`)."""
        self._ended = True
        if self._error is not None:
            self._error_after = _weakly(self._error)
        self._error = None
        self.interrupt = None
        self._errors.clear()
        self._refusals.clear()
