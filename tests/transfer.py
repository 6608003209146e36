"""Run a whole transfer between a sender and a receiver in one Trio run."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

import trio_multifd as m

from .helpers import close_all, memory_channels

Body = Callable[[m.Sender], Awaitable[None]]


@asynccontextmanager
async def listening(
    kind: str,
) -> AsyncIterator[tuple[list[trio.SocketListener], Callable[[int], Awaitable[trio.abc.Stream]]]]:
    """Listeners on loopback TCP (port 0) or a Unix socket, and a matching ``connect``."""
    if kind == "tcp":
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def connect(channel: int) -> trio.abc.Stream:
            return await trio.open_tcp_stream("127.0.0.1", port)

    else:
        folder = tempfile.mkdtemp()
        path = os.path.join(folder, "multifd.sock")
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(16)
        listeners = [trio.SocketListener(sock)]

        async def connect(channel: int) -> trio.abc.Stream:
            return await trio.open_unix_socket(path)

    try:
        yield listeners, connect
    finally:
        await close_all(*listeners)


async def transfer(
    sources: Sequence[m.RAMBlock],
    targets: Sequence[m.RAMBlock],
    body: Body,
    *,
    channels: int = 2,
    via: str = "tcp",
    compression: str = "none",
    sender_options: dict[str, Any] | None = None,
    receiver_options: dict[str, Any] | None = None,
) -> tuple[m.TransferStats, m.TransferStats, list[int]]:
    """Run ``body(sender)`` against a receiver; return both stats and the rounds the
    receiving application saw through ``receiver.sync()``."""
    seen: list[int] = []
    sender_stats: m.TransferStats | None = None
    receiver_options = receiver_options or {}
    sender_options = sender_options or {}
    async with m.open_receiver(
        targets, channels=channels, compression=compression, **receiver_options
    ) as receiver:

        async def follow_rounds() -> None:
            try:
                while True:
                    seen.append(await receiver.sync())
            except m.TransferIncompleteError:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow_rounds)
            if via == "memory":
                connect, ends = memory_channels(channels)
                for end in ends:
                    nursery.start_soon(receiver.add_channel, end)
                async with m.open_sender(
                    connect, channels=channels, compression=compression, **sender_options
                ) as sender:
                    await body(sender)
                sender_stats = sender.stats
            else:
                async with listening(via) as (listeners, connect):
                    await nursery.start(receiver.serve, listeners)
                    async with m.open_sender(
                        connect, channels=channels, compression=compression, **sender_options
                    ) as sender:
                        await body(sender)
                    sender_stats = sender.stats
            await receiver.wait_closed()
        assert sender_stats is not None
        return sender_stats, receiver.stats, seen
