"""One measured run of the benchmark: two fresh processes, a receiver and a sender,
talking over 127.0.0.1 TCP (``python -m trio_multifd._benchrun recv|send SPEC``); the
parent only orchestrates:

1. it starts the receiver, which allocates its target, fills it with a non-zero pattern
   (first writes to fresh memory are slow and noisy on small VMs, and the pattern makes
   the verification cover zero pages; a ``known_zero`` run keeps a fresh, untouched
   mapping instead), listens on port 0 and prints the port;
2. it starts the sender, which generates the data (every page written, zero pages
   included, so that reads hit real memory), hashes it, connects, and reads the clock
   (``CLOCK_MONOTONIC``, one clock for every process of the machine) once every
   connection is up;
3. the receiver reads the clock when the last byte is in place, then hashes its target;
   both print one JSON line of results (times, ``getrusage`` CPU and peak RSS, hash,
   bytes of pages placed).

Data generation, pre-touch, connection setup and hashing are outside the timed part.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import mmap
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import attrs

from ._benchdata import PAGE, digest, fill_data, fill_pattern

__all__ = [
    "RunResult",
    "check_run",
    "die_with_parent",
    "failed_run",
    "last_line",
    "run_once",
    "worker_main",
]

_PR_SET_PDEATHSIG = 1

SLICE = 512 * 1024
"""The baselines' send size: one multifd packet of page data."""


def _now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _maxrss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _emit(out: TextIO, obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def _slices(size: int, parts: int) -> list[tuple[int, int]]:
    """Split ``size`` bytes into ``parts`` page-aligned (start, end) ranges, as even as
    whole pages allow (fewer only when there are fewer pages than parts)."""
    pages = size // PAGE
    bounds = [pages * i // parts * PAGE for i in range(parts)] + [size]
    return [(start, end) for start, end in itertools.pairwise(bounds) if start < end]


def _recv_exact_sock(sock: socket.socket, view: memoryview) -> None:
    pos = 0
    while pos < len(view):
        n = sock.recv_into(view[pos:])
        if not n:
            raise ConnectionError(f"connection closed after {pos} of {len(view)} bytes")
        pos += n


def _send_slices_sock(sock: socket.socket, view: memoryview) -> None:
    for pos in range(0, len(view), SLICE):
        sock.sendall(view[pos : pos + SLICE])
    sock.shutdown(socket.SHUT_WR)
    # Wait for the receiver's close: it has everything.
    sock.recv(1)


def _in_threads(
    work: Callable[[socket.socket, memoryview], None],
    jobs: Sequence[tuple[socket.socket, memoryview]],
) -> None:
    """Run ``work`` on each job, a thread per job, and raise the first error of any: a
    thread's exception is otherwise only printed, and the worker would report a
    connection that broke off as one that moved its whole slice."""
    errors: list[BaseException] = []

    def run(sock: socket.socket, view: memoryview) -> None:
        try:
            work(sock, view)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=job, daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _receiver_worker(spec: dict[str, Any], out: TextIO) -> None:
    size = spec["size"]
    impl = spec["impl"]
    channels = spec["channels"]
    target = mmap.mmap(-1, size)
    view = memoryview(target)
    known_zero = bool(spec.get("known_zero"))
    if not known_zero:
        fill_pattern(view)
    result: dict[str, Any] = {}
    if impl in ("raw_socket", "raw_socket_threads"):
        listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        _emit(out, {"port": listener.getsockname()[1]})
        cpu0 = _cpu()
        count = 1 if impl == "raw_socket" else len(_slices(size, channels))
        conns = [listener.accept()[0] for _ in range(count)]
        if impl == "raw_socket":
            _recv_exact_sock(conns[0], view)
        else:
            ranges = _slices(size, channels)
            order = {}
            for conn in conns:
                index = bytearray(1)
                _recv_exact_sock(conn, memoryview(index))
                order[index[0]] = conn
            _in_threads(
                _recv_exact_sock,
                [(order[i], view[start:end]) for i, (start, end) in enumerate(ranges)],
            )
        t1 = _now()
        cpu = _cpu() - cpu0
        placed = size  # each connection read its whole slice, or this raised
        for conn in conns:
            conn.close()
        listener.close()
    else:
        import trio

        t1, cpu, placed = trio.run(_trio_receive, spec, view, out)
    result.update(t_end=t1, cpu_s=cpu, maxrss_mib=_maxrss_mib(), hash=digest(view), placed=placed)
    _emit(out, result)


async def _trio_receive(
    spec: dict[str, Any], view: memoryview, out: TextIO
) -> tuple[float, float, int]:
    """Receive into ``view``; return the clock at the end, the CPU seconds, and the bytes
    of pages placed (all of them, unless the transfer lost some)."""
    import trio

    from ._block import RAMBlock
    from ._receiver import open_receiver

    size = spec["size"]
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    _emit(out, {"port": listeners[0].socket.getsockname()[1]})
    cpu0 = _cpu()
    if spec["impl"] == "naive_trio":
        stream = await listeners[0].accept()
        pos = 0
        while pos < size:
            data = await stream.receive_some(min(SLICE, size - pos))
            if not data:
                raise ConnectionError(f"connection closed after {pos} of {size} bytes")
            view[pos : pos + len(data)] = data
            pos += len(data)
        t1 = _now()
        cpu = _cpu() - cpu0
        placed = pos
        await stream.aclose()
    else:
        block = RAMBlock("bench", view, zeroed=bool(spec.get("known_zero")))
        async with open_receiver(
            [block],
            channels=spec["channels"],
            compression=spec["compression"],
            io_threads=spec.get("io_threads"),
        ) as receiver:
            async with trio.open_nursery() as nursery:
                await nursery.start(receiver.serve, listeners)
            await receiver.wait_closed()
            t1 = _now()
            cpu = _cpu() - cpu0
        placed = receiver.stats.page_bytes
    for listener in listeners:
        await listener.aclose()
    return t1, cpu, placed


def _sender_worker(spec: dict[str, Any], out: TextIO) -> None:
    size = spec["size"]
    impl = spec["impl"]
    channels = spec["channels"]
    port = spec["port"]
    source = mmap.mmap(-1, size)
    view = memoryview(source)
    fill_data(spec["data"], view, seed=spec.get("seed", 0))
    result: dict[str, Any] = {"hash": digest(view)}
    if impl == "raw_socket":
        sock = socket.create_connection(("127.0.0.1", port))
        t0 = _now()
        cpu0 = _cpu()
        _send_slices_sock(sock, view)
        cpu = _cpu() - cpu0
        sock.close()
    elif impl == "raw_socket_threads":
        ranges = _slices(size, channels)
        socks = []
        for i in range(len(ranges)):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(bytes([i]))
            socks.append(sock)
        jobs = [(socks[i], view[start:end]) for i, (start, end) in enumerate(ranges)]
        t0 = _now()
        cpu0 = _cpu()
        _in_threads(_send_slices_sock, jobs)
        cpu = _cpu() - cpu0
        for sock in socks:
            sock.close()
    else:
        import trio

        t0, cpu, stats = trio.run(_trio_send, spec, view)
        result.update(stats)
    result.update(t_start=t0, cpu_s=cpu, maxrss_mib=_maxrss_mib())
    _emit(out, result)


async def _trio_send(
    spec: dict[str, Any], view: memoryview
) -> tuple[float, float, dict[str, int]]:
    import trio

    from ._block import RAMBlock
    from ._sender import open_sender

    port = spec["port"]
    size = spec["size"]
    if spec["impl"] == "naive_trio":
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        t0 = _now()
        cpu0 = _cpu()
        for pos in range(0, size, SLICE):
            await stream.send_all(view[pos : pos + SLICE])
        await stream.send_eof()
        await stream.receive_some(1)
        cpu = _cpu() - cpu0
        await stream.aclose()
        return t0, cpu, {"wire_bytes": size}

    async def connect(channel: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    block = RAMBlock("bench", view)
    async with open_sender(
        connect,
        channels=spec["channels"],
        compression=spec["compression"],
        compression_level=spec.get("level"),
        io_threads=spec.get("io_threads"),
    ) as sender:
        t0 = _now()
        cpu0 = _cpu()
        await sender.queue_pages(block, range(0, size, PAGE))
    cpu = _cpu() - cpu0
    stats = sender.stats
    return (
        t0,
        cpu,
        {
            "wire_bytes": stats.bytes,
            "normal_pages": stats.normal_pages,
            "zero_pages": stats.zero_pages,
            "packets": stats.packets,
        },
    )


def worker_main(argv: Sequence[str]) -> int:
    """``python -m trio_multifd._benchrun {send|recv} SPEC_JSON``: one side of one run."""
    role, spec = argv[0], json.loads(argv[1])
    if role == "recv":
        _receiver_worker(spec, sys.stdout)
    elif role == "send":
        _sender_worker(spec, sys.stdout)
    else:
        raise SystemExit(f"unknown role {role!r}")
    return 0


@attrs.frozen
class RunResult:
    """One measured run: timings and each process's figures, or the error."""

    seconds: float
    size: int
    sender_cpu_s: float
    receiver_cpu_s: float
    sender_rss_mib: float
    receiver_rss_mib: float
    verified: bool
    error: str | None = None
    sender: dict[str, Any] = attrs.Factory(dict)
    load: float = 0.0

    @property
    def gbps(self) -> float:
        """GB/s of page data (1e9 bytes per second)."""
        return self.size / self.seconds / 1e9 if self.seconds > 0 else 0.0


def last_line(text: str) -> str:
    """The last non-blank line of ``text`` (a child's result or its error)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def die_with_parent() -> None:
    """A child's ``preexec_fn``: killed when the bench dies. A bench killed outright
    (SIGTERM, SIGKILL: no ``finally`` runs) must not leave its workers behind, a receiver
    listening for ever with its target allocated."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _spawn(role: str, spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "trio_multifd._benchrun", role, json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=die_with_parent,
    )


def run_once(
    impl: str,
    *,
    channels: int,
    compression: str,
    data: str,
    size: int,
    level: int | None = None,
    known_zero: bool = False,
    io_threads: int | None = None,
    timeout: float | None = None,
    seed: int = 0,
) -> RunResult:
    """Run one transfer between two fresh processes and return its figures.

    Never raises for a failed transfer: the result has ``verified`` false and ``error``.
    """
    if timeout is None:
        timeout = 60 + size / 50e6
    spec: dict[str, Any] = {
        "impl": impl,
        "channels": channels,
        "compression": compression,
        "data": data,
        "size": size,
        "level": level,
        "known_zero": known_zero,
        "io_threads": io_threads,
        "seed": seed,
    }
    recv = _spawn("recv", spec)
    send: subprocess.Popen[str] | None = None
    try:
        assert recv.stdout is not None
        # The receiver prints its port once its target is filled: bounded like the rest.
        if not select.select([recv.stdout], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(recv.args, timeout)
        first = recv.stdout.readline()
        if not first:
            _, err = recv.communicate(timeout=10)
            return failed_run(size, f"receiver did not start: {last_line(err)}")
        try:
            spec["port"] = json.loads(first)["port"]
        except (ValueError, KeyError, TypeError):
            return failed_run(size, f"receiver printed {first.strip()!r}, not its port")
        send = _spawn("send", spec)
        deadline = time.monotonic() + timeout
        send_out, send_err = send.communicate(timeout=timeout)
        stopped = False
        if send.returncode:
            # A receiver waiting for the sender that failed would sit out the whole
            # deadline and hide the sender's error behind a timeout: a moment to end on
            # its own (its own error may be the cause), then it is stopped.
            try:
                recv_out, recv_err = recv.communicate(timeout=1.0)
            except subprocess.TimeoutExpired:
                recv.kill()
                recv_out, recv_err = recv.communicate()
                stopped = True
        else:
            recv_out, recv_err = recv.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return failed_run(size, f"timed out after {timeout:.0f}s")
    finally:
        for proc in (recv, send):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    failures = [
        f"{which} failed: {last_line(err) or _ending(proc.returncode)}"
        for which, proc, err in (("sender", send, send_err), ("receiver", recv, recv_err))
        if proc.returncode and not (proc is recv and stopped)
    ]
    if failures:
        return failed_run(size, "; ".join(failures))
    try:
        sender = json.loads(last_line(send_out))
        receiver = json.loads(last_line(recv_out))
    except ValueError:
        return failed_run(size, "a worker exited without its result line")
    error = check_run(sender, receiver, size)
    verified = error is None
    return RunResult(
        seconds=receiver["t_end"] - sender["t_start"],
        size=size,
        sender_cpu_s=sender["cpu_s"],
        receiver_cpu_s=receiver["cpu_s"],
        sender_rss_mib=sender["maxrss_mib"],
        receiver_rss_mib=receiver["maxrss_mib"],
        verified=verified,
        error=error,
        sender=sender,
        load=os.getloadavg()[0],
    )


def _ending(returncode: int) -> str:
    """How a worker that printed no error ended: a signal (the OOM killer's SIGKILL, say)
    by name, not as a negative status."""
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def check_run(sender: dict[str, Any], receiver: dict[str, Any], size: int) -> str | None:
    """Why a finished run's copy does not count, from both workers' result lines, or
    ``None``."""
    if sender["hash"] != receiver["hash"]:
        return "target differs from source (hash mismatch)"
    # A known-zero target hashes like zero data before any page moves: the count of
    # bytes placed is what shows that they did.
    if receiver["placed"] != size:
        return f"the receiver placed {receiver['placed']} of {size} bytes of pages"
    return None


def failed_run(size: int, error: str) -> RunResult:
    """A run that does not count, and why; the machine's load is still recorded."""
    return RunResult(
        seconds=0.0,
        size=size,
        sender_cpu_s=0.0,
        receiver_cpu_s=0.0,
        sender_rss_mib=0.0,
        receiver_rss_mib=0.0,
        verified=False,
        error=error,
        load=os.getloadavg()[0],
    )


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
