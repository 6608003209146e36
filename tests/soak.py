"""The soak run (``nox -s soak``, not part of the default checks).

For a bounded time, transfers over 8 TCP channels move random pages of random blocks
through many SYNC rounds, each run with its own method, integrity setting and zero pages;
some runs have one channel cut at a random byte by a relay. The sender waits for the
receiver's check of round n before it changes and queues round n+1, so every completed
round is checked byte for byte. Prints GiB moved, rounds verified, faults injected, how
each run ended, and bytes lost (pages of a completed round that differ from the source),
which must be 0. Exits 1 on any loss, hang or unexpected exception.

    python -m tests.soak --seconds 90
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter

import trio

import trio_multifd as m

PAGE = 4096
CHANNELS = 8
RUN_TIMEOUT = 60.0


async def relay(
    listener: trio.SocketListener, upstream_port: int, cut_at: int, cut: trio.Event
) -> None:
    """Forward one connection to ``upstream_port``, closing both sides after ``cut_at``
    bytes from the sender (a cable pulled mid-stream)."""
    client = await listener.accept()
    upstream = await trio.open_tcp_stream("127.0.0.1", upstream_port)
    forwarded = 0

    async def down() -> None:
        try:
            while data := await upstream.receive_some(65536):
                await client.send_all(data)
        except trio.BrokenResourceError:
            pass

    async with client, upstream, trio.open_nursery() as nursery:
        nursery.start_soon(down)
        try:
            while data := await client.receive_some(65536):
                if forwarded + len(data) >= cut_at:
                    await upstream.send_all(data[: cut_at - forwarded])
                    cut.set()
                    break
                forwarded += len(data)
                await upstream.send_all(data)
        except trio.BrokenResourceError:
            pass
        nursery.cancel_scope.cancel()


async def one_run(rng: random.Random, seconds_left: float) -> dict[str, object]:
    method = rng.choice(["none", "zlib", "zstd"])
    integrity = rng.random() < 0.3
    faulty = rng.random() < 0.3
    sizes = [rng.choice([8, 16, 32]) * 2**20 for _ in range(3)]
    sources = []
    for size in sizes:
        data = bytearray(rng.randbytes(size))
        for page in range(0, size // PAGE, 8):
            data[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)
        sources.append(data)
    blocks = [m.RAMBlock(f"block{i}", data) for i, data in enumerate(sources)]
    targets = [m.RAMBlock(f"block{i}", bytearray(b"\xa5" * size)) for i, size in enumerate(sizes)]
    rounds = rng.randint(4, 12)
    checked: dict[int, trio.Event] = {}
    verified = 0
    lost = 0
    moved = 0
    outcome: dict[str, object] = {"method": method, "integrity": integrity, "faulty": faulty}

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    relay_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    relay_port = relay_listeners[0].socket.getsockname()[1]
    cut_channel = rng.randrange(CHANNELS)
    cut_at = rng.randrange(1, sum(sizes) // CHANNELS)
    cut = trio.Event()

    async def connect(channel: int) -> trio.abc.Stream:
        target = relay_port if faulty and channel == cut_channel else port
        return await trio.open_tcp_stream("127.0.0.1", target)

    async def receive(task_status: trio.TaskStatus[None]) -> None:
        nonlocal verified, lost
        try:
            async with m.open_receiver(
                targets, channels=CHANNELS, compression=method, integrity=integrity
            ) as receiver:
                await receiver.serve(listeners, task_status=task_status)
                while True:
                    number = await receiver.sync()
                    for source, target in zip(sources, targets, strict=True):
                        if target.view != source:
                            lost += sum(
                                PAGE
                                for p in range(0, len(source), PAGE)
                                if target.view[p : p + PAGE] != source[p : p + PAGE]
                            )
                    verified += 1
                    checked.setdefault(number, trio.Event()).set()
        except m.TransferIncompleteError:
            outcome["receiver"] = "complete"
        except m.MultiFDError as exc:
            outcome["receiver"] = type(exc).__name__

    async def send() -> None:
        nonlocal moved
        try:
            async with m.open_sender(
                connect, channels=CHANNELS, compression=method, integrity=integrity
            ) as sender:
                for number in range(1, rounds + 1):
                    if number == 1:
                        for block in blocks:
                            await sender.queue_pages(block, range(0, block.size, PAGE))
                    else:
                        # Each page at most once per round: a page queued twice in one
                        # round may land with either content (the next round resends it).
                        chosen = {
                            (i, rng.randrange(blocks[i].page_count) * PAGE)
                            for i in (rng.randrange(len(blocks)) for _ in range(3000))
                        }
                        for i, page in sorted(chosen)[: rng.randint(50, 3000)]:
                            sources[i][page : page + 8] = rng.randbytes(8)
                            await sender.queue_page(blocks[i], page)
                    assert await sender.sync() == number
                    with trio.move_on_after(RUN_TIMEOUT / 2):
                        # A receiver that failed never checks: then the sender goes
                        # on and learns of the failure from its channels.
                        await checked.setdefault(number, trio.Event()).wait()
                moved = sender.stats.page_bytes
            outcome["sender"] = "complete"
        except m.MultiFDError as exc:
            outcome["sender"] = type(exc).__name__

    started = time.monotonic()
    try:
        with trio.fail_after(min(RUN_TIMEOUT, max(seconds_left, 10))):
            async with trio.open_nursery() as nursery:
                if faulty:
                    nursery.start_soon(relay, relay_listeners[0], port, cut_at, cut)
                await nursery.start(receive)
                await send()
                # A cut ends the receiver too; a clean run ends when its rounds are done.
                nursery.cancel_scope.deadline = trio.current_time() + 10
    except trio.TooSlowError:
        outcome["hang"] = True
    finally:
        for listener in (*listeners, *relay_listeners):
            await listener.aclose()
    outcome.update(
        seconds=time.monotonic() - started,
        rounds_verified=verified,
        bytes_lost=lost,
        bytes=moved,
        cut=cut.is_set(),
    )
    return outcome


async def soak(seconds: float, seed: int) -> int:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    results = []
    while time.monotonic() < deadline:
        result = await one_run(rng, deadline - time.monotonic())
        results.append(result)
        print(result, file=sys.stderr, flush=True)
    endings = Counter(f"sender {r.get('sender')} / receiver {r.get('receiver')}" for r in results)
    moved = sum(int(r["bytes"]) for r in results)  # type: ignore[call-overload]
    lost = sum(int(r["bytes_lost"]) for r in results)  # type: ignore[call-overload]
    hangs = sum(1 for r in results if r.get("hang"))
    faults = sum(1 for r in results if r["cut"])
    print(f"runs: {len(results)}, GiB moved: {moved / 2**30:.2f}")
    print(f"rounds verified: {sum(int(r['rounds_verified']) for r in results)}")  # type: ignore[call-overload]
    print(f"faults injected: {faults}")
    for ending, count in endings.most_common():
        print(f"  {count} x {ending}")
    print(f"hangs: {hangs}, bytes lost: {lost}")
    return 1 if lost or hangs else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    print(f"soak: seed {args.seed}, {args.seconds:.0f} s", file=sys.stderr)
    return trio.run(soak, args.seconds, args.seed)


if __name__ == "__main__":
    sys.exit(main())
