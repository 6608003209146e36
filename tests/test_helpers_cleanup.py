"""The test helpers that own sockets close every one of them even when the test using
them was cancelled (a timeout): a failing test must not leak into the next ones."""

from __future__ import annotations

import trio
import trio.testing

from .proxy import At, CuttingProxy, RecordingListener, TcpLink


async def test_a_cancelled_tcp_link_closes_its_listener_and_streams() -> None:
    with trio.CancelScope() as scope:
        async with TcpLink.open() as link:
            await link.connect(0)
            await link.accept()
            await link.raw_connect()
            scope.cancel()
            await trio.lowlevel.checkpoint()
    streams = link.sender_streams + link.receiver_streams + link.extra_streams
    assert len(streams) == 3
    assert [link.listener.socket.fileno(), *(s.socket.fileno() for s in streams)] == [-1] * 4


async def test_a_cancelled_cutting_proxy_closes_its_listener_and_relayed_streams() -> None:
    async with TcpLink.open() as link:
        with trio.CancelScope() as scope:
            async with CuttingProxy(
                link.port, At("stream", offset=1 << 20), "close"
            ).running() as proxy:
                link.route[0] = proxy.port
                await link.connect(0)
                await link.accept()  # the proxy's upstream
                await trio.testing.wait_all_tasks_blocked()  # its relay has recorded it
                scope.cancel()
                await trio.lowlevel.checkpoint()
    assert len(proxy.sockets) == 2
    sockets = [proxy.listener.socket, *(s.socket for s in proxy.sockets)]
    assert [s.fileno() for s in sockets] == [-1] * 3


async def test_a_cancelled_recording_listener_closes_itself_and_its_streams() -> None:
    with trio.CancelScope() as scope:
        async with RecordingListener.open() as listener:
            client = await trio.open_tcp_stream("127.0.0.1", listener.port)
            await listener.accept()
            scope.cancel()
            await trio.lowlevel.checkpoint()
    await client.aclose()
    sockets = [listener.inner.socket, *(s.socket for s in listener.accepted)]
    assert [s.fileno() for s in sockets] == [-1] * 2
