"""QEMU 7.2 as the multifd sender, trio_multifd's receiver as the destination of its
channels, live: every page QEMU sends over multifd lands in the target, byte for byte.

A paused source QEMU (the bench's command line: ``pc`` machine, tcg, guest RAM in a file
on /dev/shm) migrates to a TCP port or a Unix socket of this test. There QEMU opens its
main migration channel (its own stream, magic "QEVM", drained here) and the multifd
channels (multifd magic), handed to ``Receiver.add_channel``. QEMU 7.2 sends all-zero
pages on its main channel, so the target is pre-filled with a sentinel: afterwards a
page still holding it was not sent over multifd and must be zero at the source; every
other page must equal the source's (checked for QEMU's main block, ``mem``; the ROMs
that also travel need blocks of their own). Skipped without ``qemu-system-x86_64``
(Debian: ``qemu-system-x86``).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio

import trio_multifd as m
from trio_multifd._benchrun import die_with_parent
from trio_multifd._qemu_bench import _Qmp, find_qemu, qemu_argv

from .transfer import listening

QEMU = find_qemu()
pytestmark = pytest.mark.skipif(
    QEMU is None or not os.path.isdir("/dev/shm"),
    reason="needs qemu-system-x86_64 (Debian: qemu-system-x86) and a tmpfs at /dev/shm",
)

PAGE = 4096
RAM = 64 * 2**20
SENTINEL = b"\xa5" * PAGE
ZERO = bytes(PAGE)
QEVM = b"QEVM"
MULTIFD = (0x11223344).to_bytes(4, "big")


def source_image(seed: int) -> bytearray:
    """Random pages, every 8th all zero (those travel on QEMU's main channel)."""
    image = bytearray(random.Random(seed).randbytes(RAM))
    for start in range(0, RAM, 8 * PAGE):
        image[start : start + PAGE] = ZERO
    return image


@contextlib.contextmanager
def paused_source(image: bytearray) -> Iterator[_Qmp]:
    """A source QEMU whose guest RAM is ``image``, and its QMP client."""
    assert QEMU is not None
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        ram = os.path.join(folder, "ram")
        with open(ram, "wb") as f:
            f.write(image)
        argv = qemu_argv(
            QEMU, ram_path=ram, size=RAM, qmp_path=os.path.join(folder, "qmp"), destination=False
        )
        process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        try:
            qmp = _Qmp(os.path.join(folder, "qmp"), process, time.monotonic() + 60)
            try:
                yield qmp
            finally:
                qmp.close()
        finally:
            process.kill()
            process.wait()


def ram_blocks(qmp: _Qmp) -> dict[str, int]:
    """QEMU's RAM blocks and their used lengths (HMP ``info ramblock``): ROMs travel over
    multifd too, and a receiver must know every block named in a packet."""
    table = str(qmp.command("human-monitor-command", **{"command-line": "info ramblock"}))
    blocks = {}
    for row in table.splitlines():
        fields = row.split()  # name, page size, "KiB", offset, used, total
        if len(fields) == 6 and fields[4].startswith("0x"):
            blocks[fields[0]] = int(fields[4], 16)
    return blocks


async def magic_of(stream: trio.SocketStream) -> bytes:
    """The connection's first 4 bytes, peeked: the stream is handed over whole."""
    # A peek has no event to wait on: the bytes are there within a few polls.
    while len(data := await stream.socket.recv(4, socket.MSG_PEEK)) < 4 and data:  # noqa: ASYNC110
        await trio.sleep(0.001)
    return data


async def receive_migration(
    qmp: _Qmp, blocks: list[m.RAMBlock], channels: int, compression: str, via: str
) -> m.TransferStats:
    async with listening(via) as (listeners, _):
        return await _receive_on(listeners[0], qmp, blocks, channels, compression)


async def _receive_on(
    listener: trio.SocketListener,
    qmp: _Qmp,
    blocks: list[m.RAMBlock],
    channels: int,
    compression: str,
) -> m.TransferStats:
    address = listener.socket.getsockname()
    uri = f"unix:{address}" if isinstance(address, str) else f"tcp:127.0.0.1:{address[1]}"
    main_done = trio.Event()

    async def drain(stream: trio.SocketStream) -> None:
        async with stream:
            while await stream.receive_some():
                pass
        main_done.set()

    with trio.fail_after(60):
        async with (
            trio.open_nursery() as connections,
            m.open_receiver(blocks, channels=channels, compression=compression) as receiver,
        ):

            async def route(stream: trio.SocketStream) -> None:
                # The main channel and the multifd channels come in any order.
                if await magic_of(stream) == QEVM:
                    await drain(stream)
                else:
                    await receiver.add_channel(stream)

            async def accept() -> None:
                while True:
                    connections.start_soon(route, await listener.accept())

            connections.start_soon(accept)
            await trio.to_thread.run_sync(lambda: qmp.command("migrate", uri=uri))
            end = await trio.to_thread.run_sync(
                lambda: qmp.wait_event(
                    lambda e: (
                        e["event"] == "MIGRATION"
                        and e["data"]["status"] in ("completed", "failed")
                    )
                ),
                abandon_on_cancel=True,
            )
            assert end["data"]["status"] == "completed"
            # QEMU is done writing: every multifd channel ends cleanly after its SYNC.
            await receiver.wait_closed()
            await main_done.wait()
            connections.cancel_scope.cancel()
    return receiver.stats


def migrate(qmp: _Qmp, channels: int, compression: str) -> dict[str, Any]:
    """Set QEMU's multifd up; return its parameters."""
    qmp.command(
        "migrate-set-capabilities",
        capabilities=[
            {"capability": "multifd", "state": True},
            {"capability": "events", "state": True},
        ],
    )
    parameters = {
        "multifd-channels": channels,
        "multifd-compression": compression,
        "max-bandwidth": 1 << 40,  # QEMU 7.2 caps a migration at 128 MiB/s otherwise
    }
    qmp.command("migrate-set-parameters", **parameters)
    return parameters


# Over a Unix socket QEMU closes each channel once it has written everything, which a
# channel waiting at its SYNC sees as a hang-up: that must not fail the transfer.
@pytest.mark.parametrize("via", ["tcp", "unix"])
@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("channels", [2, 4])
async def test_a_qemu_source_migrates_its_ram_into_the_receiver(
    channels: int, compression: str, via: str
) -> None:
    image = source_image(seed=channels)
    with paused_source(image) as qmp:
        migrate(qmp, channels, compression)
        targets = {
            name: bytearray(SENTINEL * (size // PAGE)) for name, size in ram_blocks(qmp).items()
        }
        blocks = [m.RAMBlock(name, target) for name, target in targets.items()]
        stats = await receive_migration(qmp, blocks, channels, compression, via)
    # QEMU's own RAM block is named after its memory backend, "mem".
    target = targets["mem"]
    carried = 0
    for start in range(0, RAM, PAGE):
        page, source = target[start : start + PAGE], image[start : start + PAGE]
        if page == SENTINEL:
            assert source == ZERO, f"page {start:#x} never arrived"
        else:
            assert page == source, f"page {start:#x} differs"
            carried += 1
    assert carried == RAM // PAGE - RAM // (8 * PAGE)  # every non-zero page
    # QEMU 7.2 sometimes sends a page twice (last of one packet, first of the next).
    assert stats.normal_pages >= carried
    assert all(channel.syncs >= 1 for channel in stats.channels)
