"""Bytes that a middlebox inserts into a channel: the stream is out of step, and the
receiver must say so as soon as they arrive, not once the sender happens to write
enough to fill a header, which a sender waiting between rounds may not do for long."""

from __future__ import annotations

import pytest
import trio

import trio_multifd as m

from .helpers import PAGE, block_pair
from .proxy import HEADER, At, InsertingProxy, TcpLink, run_faulty_transfer


@pytest.mark.parametrize(
    "extra",
    [b"x", b"\x11\x22\x33\x45" * 25],
    ids=["one-byte", "almost-the-magic"],
)
async def test_bytes_inserted_after_a_sync_fail_both_ends_while_the_sender_is_idle(
    extra: bytes,
) -> None:
    src, dst = block_pair("mem", 256, seed=4)

    async def body(sender: m.Sender) -> None:
        await sender.queue_pages(src, range(0, src.size, PAGE))
        await sender.sync()
        await trio.sleep_forever()  # nothing more to send yet: only a failure ends this

    with trio.fail_after(10):
        async with TcpLink.open() as link:
            proxy = InsertingProxy(link.port, At("sync", 0, HEADER), extra)
            async with proxy.running():
                link.route[1] = proxy.port
                outcome = await run_faulty_transfer(link, [src], [dst], body=body)
    assert proxy.inserted.is_set()
    error = outcome.receiver
    assert type(error) is m.MagicError, repr(error)
    assert (error.channel, error.packet_num) == (1, None)
    assert "out of step" in str(error)
    assert type(outcome.sender) is m.TransportError, repr(outcome.sender)
    assert outcome.sender_closed and outcome.receiver_closed
    assert outcome.receiver_object is not None
    assert outcome.receiver_object.rounds_completed == 1
    assert dst.view == src.view
