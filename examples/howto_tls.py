"""How-to: run every channel over TLS (``trio.SSLStream`` on both sides).

Both ends run in one program here, on 127.0.0.1, with certificates made by ``trustme``
(a throwaway CA). In production, load your own: ``ssl.create_default_context(cafile=...)``
on the sender, ``load_cert_chain(...)`` on the receiver.

    python examples/howto_tls.py
"""

from __future__ import annotations

import os
import ssl
import sys

import trio
import trustme

import trio_multifd

CHANNELS = 4
SIZE = 16 * 2**20


async def receive(
    listener: trio.SocketListener, server_context: ssl.SSLContext, target: bytearray
) -> None:
    block = trio_multifd.RAMBlock("buffer", target)
    async with trio_multifd.open_receiver([block], channels=CHANNELS) as receiver:
        async with trio.open_nursery() as nursery:
            for _ in range(CHANNELS):
                tcp_stream = await listener.accept()
                # The receiver is the TLS server. add_channel completes the TLS handshake
                # (within handshake_timeout) before it reads the multifd handshake.
                tls_stream = trio.SSLStream(tcp_stream, server_context, server_side=True)
                nursery.start_soon(receiver.add_channel, tls_stream)
        await receiver.wait_closed()


async def receive_with_serve(
    listener: trio.SocketListener, server_context: ssl.SSLContext, target: bytearray
) -> None:
    # The same with serve(): a trio.SSLListener hands out SSLStreams, and serve() counts
    # only channels whose TLS and multifd handshakes both succeed.
    tls_listener = trio.SSLListener(listener, server_context)
    block = trio_multifd.RAMBlock("buffer", target)
    async with trio_multifd.open_receiver([block], channels=CHANNELS) as receiver:
        await receiver.serve([tls_listener])
        await receiver.wait_closed()


async def send(port: int, client_context: ssl.SSLContext, source: bytearray) -> None:
    async def connect(channel_id: int) -> trio.abc.Stream:
        tcp_stream = await trio.open_tcp_stream("127.0.0.1", port)
        # server_hostname is checked against the receiver's certificate.
        return trio.SSLStream(tcp_stream, client_context, server_hostname="localhost")

    block = trio_multifd.RAMBlock("buffer", source)
    async with trio_multifd.open_sender(connect, channels=CHANNELS) as sender:
        await sender.queue_pages(block, range(0, block.size, block.page_size))
    # A normal exit: the receiver confirmed it completed every round, over TLS too.


async def main() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    for receiver in (receive, receive_with_serve):
        source = bytearray(os.urandom(SIZE))
        target = bytearray(SIZE)
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(receiver, listener, server_context, target)
            await send(port, client_context, source)
        ok = target == source
        print(f"{receiver.__name__}: {SIZE} bytes over {CHANNELS} TLS channels, verified: {ok}")
        if not ok:
            sys.exit(1)


if __name__ == "__main__":
    trio.run(main)
