"""Structured teardown shared by both ends: first error wins, everything is cancelled,
and the user sees one exception.

This replaces QEMU's ``terminate_threads`` (an atomic "exiting" flag, semaphores posted
to wake every waiter, channels shut down by hand) with a nursery's cancel scope.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import NoReturn, final

import trio

from ._errors import MultiFDError

__all__ = ["Supervisor", "logger", "refuse_unless_cancelled"]

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
    raise error


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


@final
class Supervisor:
    """Owns a transfer's nursery and decides what leaves its ``async with``."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.error: Exception | None = None
        self._errors: list[Exception] = []
        # RuntimeErrors of calls that the transfer's failure refused: see refusal().
        self._refusals: list[RuntimeError] = []
        self._nursery: trio.Nursery | None = None

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
        if self.error is not None:
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
        self._errors.append(exc)
        if self.error is not None:
            return
        self.error = exc
        logger.error("%s failed: %s", self.role, exc)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def channel_failed(self, exc: MultiFDError, channel: int) -> None:
        """A channel task's error: recorded like :meth:`fail`, unless the task is
        already being cancelled (the application left, or another channel failed
        first), when it is only its peer reacting to the teardown; then the task's
        ``Cancelled`` is raised instead."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self.fail(exc, channel=channel)

    def _is_ours(self, exc: BaseException) -> bool:
        if isinstance(exc, BaseExceptionGroup):
            return all(self._is_ours(e) for e in exc.exceptions)
        return isinstance(exc, trio.Cancelled) or any(
            exc is e for e in (*self._errors, *self._refusals)
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
        if self.error is not None:
            # The group is chained for debugging, but not over the error's own cause (a
            # TransportError's OSError, say), which says more, unless the group holds
            # something else too (a bug in another task), which must not vanish.
            if exc is not self.error and (self.error.__cause__ is None or not self._is_ours(exc)):
                self.error.__cause__ = exc
            return self.error
        if isinstance(exc, BaseExceptionGroup) and exc.split(trio.Cancelled)[1] is None:
            # Cancelled from outside: one Cancelled, as a plain await would raise, not
            # the nursery's group of every task's (the body's own, when it has one).
            if isinstance(body_exc, trio.Cancelled):
                return body_exc
            return _first_leaf(exc)
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
            pending = self.error
        if pending is not None:
            raise pending
