"""The benchmark: trio_multifd against what one would use instead, process against process.

Every measured run is two fresh processes (``python -m trio_multifd._bench``), a
receiver and a sender, talking over 127.0.0.1 TCP. The parent only orchestrates:

1. it starts the receiver, which allocates its target, fills it with a non-zero pattern
   (first writes to fresh memory are slow and noisy on small VMs, and the pattern makes
   the verification cover zero pages; a ``known_zero`` run keeps a fresh, untouched
   mapping instead), listens on port 0 and prints the port;
2. it starts the sender, which generates the data (every page written, zero pages
   included, so that reads hit real memory), hashes it, connects, and reads the clock
   (``CLOCK_MONOTONIC``, one clock for every process of the machine) once every
   connection is up;
3. the receiver reads the clock when the last byte is in place, then hashes its target;
   both print one JSON line of results (times, ``getrusage`` CPU and peak RSS, hash).

Data generation, pre-touch, connection setup and hashing are outside the timed part.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import random
import resource
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

import attrs

__all__ = [
    "DATA_KINDS",
    "QEMU_BINARY",
    "QEMU_METHODS",
    "Case",
    "CaseResult",
    "RunResult",
    "check_run",
    "format_table",
    "make_cases",
    "run_bench",
    "run_once",
]

PAGE = 4096
SLICE = 512 * 1024
"""The baselines' send size: one multifd packet of page data."""
MIB = 1024 * 1024
PATTERN = 0xA5

DATA_KINDS = ("random", "compressible", "zero", "zero-all", "mixed")
"""Data kinds: ``random`` fresh random bytes; ``compressible`` per 4 KiB page 1 KiB random
+ 3 KiB text; ``zero`` 15 pages in 16 all zero (the 16th random); ``zero-all`` every page
zero; ``mixed`` (the demo's) a quarter zero pages, a quarter random, half text."""


QEMU_METHODS = ("none", "zlib", "zstd")
"""The methods QEMU's ``multifd-compression`` parameter shares with trio_multifd."""

QEMU_BINARY = "qemu-system-x86_64"
"""The QEMU that ``--qemu`` runs unless given another (looked up on ``PATH``)."""


def _now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _maxrss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- data -------------------------------------------------------------------------------------

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "this",
    "which",
    "or",
    "be",
    "are",
    "it",
    "an",
    "not",
    "have",
    "had",
    "were",
    "but",
    "all",
    "their",
    "been",
    "has",
    "one",
    "more",
    "when",
    "will",
    "would",
    "there",
    "can",
    "page",
    "memory",
    "block",
    "channel",
    "packet",
    "sync",
    "transfer",
    "receiver",
    "sender",
    "stream",
    "buffer",
    "kernel",
    "migration",
    "device",
    "virtual",
    "machine",
    "guest",
    "host",
    "network",
    "socket",
    "thread",
    "process",
    "table",
    "offset",
    "length",
    "header",
    "payload",
    "checksum",
    "compression",
    "level",
    "window",
    "dictionary",
    "entropy",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "10",
    "16",
    "32",
    "64",
    "128",
    "256",
    "512",
    "1024",
    "4096",
    "=",
    "(",
    ")",
    "{",
    "}",
    ";",
    ":",
    ",",
    ".",
    "->",
    "/",
]


def text_pool(size: int, seed: int = 0) -> bytes:
    """Text-like bytes (words, numbers, punctuation, line breaks): what logs, source code
    and heap strings look like to a compressor."""
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < size:
        line = " ".join(rng.choices(_WORDS, k=rng.randint(4, 14))) + "\n"
        parts.append(line)
        length += len(line)
    return "".join(parts).encode()[:size]


def fill_data(kind: str, view: memoryview, *, seed: int = 0) -> None:
    """Write ``kind`` data over all of ``view`` (a multiple of 4 KiB). Every page is
    written, zero pages included, so the data sits in real memory."""
    if kind not in DATA_KINDS:
        raise ValueError(f"unknown data kind {kind!r}")
    size = len(view)
    rng = random.Random(seed)
    pool = text_pool(MIB, seed) if kind in ("compressible", "mixed") else b""
    zeros = bytes(PAGE)
    chunk = 256 * PAGE
    for base in range(0, size, chunk):
        end = min(base + chunk, size)
        if kind == "random":
            view[base:end] = os.urandom(end - base)
            continue
        if kind == "zero-all":
            view[base:end] = bytes(end - base)
            continue
        noise = os.urandom(end - base)
        for page in range(base, end, PAGE):
            index = page // PAGE
            rel = page - base
            if kind == "compressible":
                view[page : page + 1024] = noise[rel : rel + 1024]
                at = rng.randrange(len(pool) - 3 * 1024)
                view[page + 1024 : page + PAGE] = pool[at : at + 3 * 1024]
            elif kind == "zero":
                view[page : page + PAGE] = noise[rel : rel + PAGE] if index % 16 == 0 else zeros
            else:  # mixed: a quarter zero, a quarter random, half text
                quarter = index % 4
                if quarter == 0:
                    view[page : page + PAGE] = zeros
                elif quarter == 1:
                    view[page : page + PAGE] = noise[rel : rel + PAGE]
                else:
                    at = rng.randrange(len(pool) - PAGE)
                    view[page : page + PAGE] = pool[at : at + PAGE]


def fill_pattern(view: memoryview) -> None:
    """Fill ``view`` with the non-zero pattern byte (pre-touching every page)."""
    block = bytes([PATTERN]) * MIB
    for base in range(0, len(view), MIB):
        end = min(base + MIB, len(view))
        view[base:end] = block[: end - base]


def digest(view: memoryview) -> str:
    """The hash both ends of a run compare (xxh3_128)."""
    import xxhash

    return xxhash.xxh3_128(view).hexdigest()


# -- worker processes -------------------------------------------------------------------------


def _emit(out: TextIO, obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def _slices(size: int, parts: int) -> list[tuple[int, int]]:
    """Split ``size`` bytes into ``parts`` page-aligned (start, end) ranges."""
    pages = size // PAGE
    per = math.ceil(pages / parts)
    return [
        (i * per * PAGE, min((i + 1) * per * PAGE, size)) for i in range(parts) if i * per < pages
    ]


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
            threads = [
                threading.Thread(
                    target=_recv_exact_sock, args=(order[i], view[start:end]), daemon=True
                )
                for i, (start, end) in enumerate(ranges)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        t1 = _now()
        cpu = _cpu() - cpu0
        placed = size  # each connection read its whole slice, or raised
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
        threads = [
            threading.Thread(
                target=_send_slices_sock, args=(socks[i], view[start:end]), daemon=True
            )
            for i, (start, end) in enumerate(ranges)
        ]
        t0 = _now()
        cpu0 = _cpu()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
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
    """``python -m trio_multifd._bench {send|recv} SPEC_JSON``: one side of one run."""
    role, spec = argv[0], json.loads(argv[1])
    if role == "recv":
        _receiver_worker(spec, sys.stdout)
    elif role == "send":
        _sender_worker(spec, sys.stdout)
    else:
        raise SystemExit(f"unknown role {role!r}")
    return 0


# -- one run, driven from the parent ----------------------------------------------------------


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


def _spawn(role: str, spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "trio_multifd._bench", role, json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
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
        recv_out, recv_err = recv.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return failed_run(size, f"timed out after {timeout:.0f}s")
    finally:
        for proc in (recv, send):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    load = os.getloadavg()[0]
    if send.returncode or recv.returncode:
        which = "sender" if send.returncode else "receiver"
        err = send_err if send.returncode else recv_err
        return failed_run(size, f"{which} failed: {last_line(err)}", load=load)
    try:
        sender = json.loads(last_line(send_out))
        receiver = json.loads(last_line(recv_out))
    except ValueError:
        return failed_run(size, "a worker exited without its result line", load=load)
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
        load=load,
    )


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


def failed_run(size: int, error: str, *, load: float = 0.0) -> RunResult:
    return RunResult(
        seconds=0.0,
        size=size,
        sender_cpu_s=0.0,
        receiver_cpu_s=0.0,
        sender_rss_mib=0.0,
        receiver_rss_mib=0.0,
        verified=False,
        error=error,
        load=load,
    )


# -- cases and the whole benchmark ------------------------------------------------------------


@attrs.frozen
class Case:
    """One benchmark case: an implementation at a connection count, method and data."""

    impl: str
    channels: int
    compression: str
    data: str

    @property
    def raw_impl(self) -> str:
        """The baseline with the same connection count."""
        return "raw_socket" if self.channels == 1 else "raw_socket_threads"

    def baseline(self) -> Case:
        """The case this one is compared with."""
        return Case(self.raw_impl, self.channels, "none", self.data)

    def counterpart(self) -> Case:
        """The trio_multifd case of the same channels, method and data."""
        return Case("trio_multifd", self.channels, self.compression, self.data)


@attrs.define
class CaseResult:
    """A case's runs over every repeat."""

    case: Case
    size: int
    known_zero: bool = False
    io_threads: int | None = None
    runs: list[RunResult] = attrs.Factory(list)
    ratios: list[float] = attrs.Factory(list)
    qemu_ratios: list[float] | None = None
    """Per-repeat ratios to QEMU's multifd (a trio_multifd case, when QEMU ran)."""

    @property
    def verified(self) -> bool:
        """Whether every run delivered an identical copy."""
        return bool(self.runs) and all(r.verified for r in self.runs)

    def to_json(self) -> dict[str, Any]:
        """The case as the ``--json`` object (see docs/performance.rst)."""
        ok = [r for r in self.runs if r.verified]
        gb = self.size / 1e9

        def med(values: Iterable[float]) -> float:
            values = list(values)
            return statistics.median(values) if values else 0.0

        obj: dict[str, Any] = {
            "impl": self.case.impl,
            "channels": self.case.channels,
            "compression": self.case.compression,
            "data": self.case.data,
            "bytes": self.size,
            # A failed run has no speed: null, keeping the list aligned with the repeats.
            "gbps": [round(r.gbps, 4) if r.verified else None for r in self.runs],
            "gbps_median": round(med(r.gbps for r in ok), 4),
            "verified": self.verified,
            "sender_cpu_s_per_gb": round(med(r.sender_cpu_s / gb for r in ok), 4),
            "receiver_cpu_s_per_gb": round(med(r.receiver_cpu_s / gb for r in ok), 4),
            "sender_peak_rss_mib": round(max((r.sender_rss_mib for r in ok), default=0.0), 1),
            "receiver_peak_rss_mib": round(max((r.receiver_rss_mib for r in ok), default=0.0), 1),
            # Beyond the spec'd fields: RSS less the data buffer each side holds (the
            # source or the target, which counts in RSS once touched), and the load.
            "sender_rss_beyond_data_mib": round(
                max((r.sender_rss_mib for r in ok), default=0.0) - self.size / MIB, 1
            ),
            # A known-zero trio_multifd target is never touched where the data is zero:
            # nothing of it to subtract, the figure is the whole peak (an upper bound).
            "receiver_rss_beyond_target_mib": round(
                max((r.receiver_rss_mib for r in ok), default=0.0)
                - (0 if self.known_zero and self.case.impl == "trio_multifd" else self.size) / MIB,
                1,
            ),
            "load_1m": [round(r.load, 2) for r in self.runs],
        }
        if self.case.impl == "trio_multifd":
            obj["raw_impl"] = self.case.raw_impl
            obj["io_threads"] = self.io_threads
            # No ratios without baselines: null then.
            obj["ratio_to_raw"] = round(med(self.ratios), 4) if self.ratios else None
            if self.qemu_ratios is not None:
                obj["ratio_to_qemu"] = (
                    round(med(self.qemu_ratios), 4) if self.qemu_ratios else None
                )
            wire = [r.sender.get("wire_bytes") for r in ok if r.sender.get("wire_bytes")]
            if wire:
                obj["wire_bytes"] = wire[0]
        errors = [r.error for r in self.runs if r.error]
        if errors:
            obj["error"] = errors[0]
        return obj


def make_cases(
    *,
    channels: Sequence[int],
    compressions: Sequence[str],
    data: Sequence[str],
    baselines: bool,
    qemu: bool = False,
) -> list[Case]:
    """The cases of one repeat, in the order they run: per data kind, per connection
    count, the baseline right before the trio_multifd runs it is compared with; with
    ``qemu``, QEMU's multifd right after each trio_multifd run of a method it has."""
    cases: list[Case] = []
    for kind in data:
        if baselines:
            cases.append(Case("naive_trio", 1, "none", kind))
        for count in channels:
            if baselines:
                cases.append(Case("trio_multifd", count, "none", kind).baseline())
            for method in compressions:
                cases.append(Case("trio_multifd", count, method, kind))
                if qemu and method in QEMU_METHODS:
                    cases.append(Case("qemu_multifd", count, method, kind))
    return cases


def run_bench(
    *,
    size: int,
    channels: Sequence[int],
    compressions: Sequence[str],
    data: Sequence[str],
    repeat: int,
    baselines: bool,
    level: int | None = None,
    known_zero: bool = False,
    io_threads: int | None = None,
    qemu: str | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> list[CaseResult]:
    """Run every case ``repeat`` times, interleaved within each repeat.

    ``qemu`` is the path of a ``qemu-system-x86_64`` to run QEMU's own multifd on the
    same data after each trio_multifd case (see ``_qemu_bench``); ``None`` skips it.

    With ``known_zero`` every receiver starts from fresh, untouched memory (no pattern
    fill), and trio_multifd's target is a known-zero block (``RAMBlock(zeroed=True)``).
    ``io_threads`` goes to both ends of the trio_multifd runs (``None``: their default).
    """
    cases = make_cases(
        channels=channels,
        compressions=compressions,
        data=data,
        baselines=baselines,
        qemu=qemu is not None,
    )
    results = {case: CaseResult(case, size, known_zero, io_threads) for case in cases}
    for case in cases:
        if case.impl == "qemu_multifd":
            results[case.counterpart()].qemu_ratios = []
    total = len(cases) * repeat
    done = 0
    for rep in range(repeat):
        for case in cases:
            run = _runner(case, qemu=qemu, known_zero=known_zero, io_threads=io_threads)(
                channels=case.channels,
                compression=case.compression,
                data=case.data,
                size=size,
                level=level if case.compression != "none" else None,
                seed=rep,
            )
            done += 1
            status = f"{run.gbps:.2f} GB/s" if run.verified else f"FAILED: {run.error}"
            progress(
                f"[{done}/{total}] repeat {rep + 1}: {case.impl} ch={case.channels}"
                f" {case.compression} {case.data}: {status} (load {run.load:.2f})"
            )
            results[case].runs.append(run)
            if case.impl == "trio_multifd" and baselines:
                base = results[case.baseline()].runs
                ratio = _ratio(run, base[-1]) if len(base) == rep + 1 else None
                if ratio is not None:
                    results[case].ratios.append(ratio)
            if case.impl == "qemu_multifd":
                ours = results[case.counterpart()]
                assert ours.qemu_ratios is not None, "set for every QEMU counterpart"
                ratio = _ratio(ours.runs[-1], run)
                if ratio is not None:
                    ours.qemu_ratios.append(ratio)
    return list(results.values())


def _ratio(ours: RunResult, theirs: RunResult) -> float | None:
    """One repeat's ratio of a trio_multifd run to the run it is compared with, when
    both verified."""
    return ours.gbps / theirs.gbps if ours.verified and theirs.verified else None


def _runner(
    case: Case, *, qemu: str | None, known_zero: bool, io_threads: int | None
) -> Callable[..., RunResult]:
    """What runs ``case``: a QEMU migration, or a pair of this module's processes."""
    if case.impl == "qemu_multifd":
        # Imported here: _qemu_bench builds on this module.
        from ._qemu_bench import run_qemu_once

        assert qemu is not None, "a qemu_multifd case needs a QEMU binary"
        return functools.partial(run_qemu_once, qemu, known_zero=known_zero)
    return functools.partial(run_once, case.impl, known_zero=known_zero, io_threads=io_threads)


def format_table(results: Sequence[CaseResult]) -> str:
    """The people's table: medians, spread, ratio (and to QEMU, when it ran), CPU and
    memory per side."""
    with_qemu = any(result.qemu_ratios is not None for result in results)
    header = (
        f"{'impl':<19} {'ch':>2} {'method':<6} {'data':<12} {'GB/s':>6} {'min-max':>11}"
        f" {'ratio':>6}{' /qemu' if with_qemu else ''}"
        f" {'CPU s/GB snd/rcv':>16} {'RSS+ MiB snd/rcv':>16} {'ok':>3}"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        obj = result.to_json()
        runs = [gbps for gbps in obj["gbps"] if gbps is not None]
        spread = f"{min(runs):.2f}-{max(runs):.2f}" if runs else "-"
        ratio = obj.get("ratio_to_raw")
        ratio_text = f"{ratio:.2f}" if isinstance(ratio, float) else ""
        to_qemu = obj.get("ratio_to_qemu")
        qemu_text = f" {to_qemu:>5.2f}" if isinstance(to_qemu, float) else " " * 6
        cpu = f"{obj['sender_cpu_s_per_gb']:.2f}/{obj['receiver_cpu_s_per_gb']:.2f}"
        rss = (
            f"{obj['sender_rss_beyond_data_mib']:.0f}/{obj['receiver_rss_beyond_target_mib']:.0f}"
        )
        lines.append(
            f"{obj['impl']:<19} {obj['channels']:>2} {obj['compression']:<6} {obj['data']:<12}"
            f" {obj['gbps_median']:>6.2f} {spread:>11} {ratio_text:>6}"
            f"{qemu_text if with_qemu else ''} {cpu:>16} {rss:>16}"
            f" {'yes' if obj['verified'] else 'NO':>3}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
