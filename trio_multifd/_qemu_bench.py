"""QEMU's own multifd as a benchmark baseline, measured in the same run as trio_multifd.

Two QEMU processes (``qemu-system-x86_64``, paused with ``-S``: no guest code runs) migrate
a guest whose RAM is a file on tmpfs: the source's holds the bench's data, the
destination's the receivers' non-zero pattern (or zeros for ``known_zero``), both
preallocated so every page is mapped before the clock starts, as the other cases' buffers
are. The migration goes over 127.0.0.1 TCP with QEMU's ``multifd`` capability, channel
count and compression, driven through QMP; afterwards the two RAM files must be equal.

The clock is QEMU's own: the timestamp of the source's ``MIGRATION`` event that enters
``active`` (setup done) to the destination's that enters ``completed`` (every page in
place). CPU seconds are each process's ``utime + stime`` from the ``migrate`` command to
the end, and peak RSS its ``VmHWM`` (guest RAM included, as the other cases' data buffers
are).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from ._benchdata import MIB, digest, fill_data, fill_pattern
from ._benchrun import RunResult, die_with_parent, failed_run, last_line

__all__ = ["QEMU_BINARY", "QEMU_METHODS", "find_qemu", "qemu_argv", "run_qemu_once"]

QEMU_METHODS = ("none", "zlib", "zstd")
"""The methods QEMU's ``multifd-compression`` parameter shares with trio_multifd."""

QEMU_BINARY = "qemu-system-x86_64"
"""The QEMU that ``--qemu`` runs unless given another (looked up on ``PATH``)."""

_LEVEL_PARAMETER = {"zlib": "multifd-zlib-level", "zstd": "multifd-zstd-level"}


def find_qemu(binary: str = QEMU_BINARY) -> str | None:
    """The path of the QEMU binary (a name is looked up on ``PATH``), or ``None``."""
    return shutil.which(binary)


def qemu_argv(
    binary: str, *, ram_path: str, size: int, qmp_path: str, destination: bool
) -> list[str]:
    """The command line of one side: a paused ``pc`` machine whose preallocated RAM is
    ``ram_path``; the destination waits for ``migrate-incoming``."""
    argv = [
        binary,
        "-accel",
        "tcg",
        "-S",
        "-machine",
        "pc,memory-backend=mem",
        "-m",
        f"{size // MIB}M",
        "-object",
        f"memory-backend-file,id=mem,size={size},mem-path={ram_path},share=on,prealloc=on",
        "-nodefaults",
        "-display",
        "none",
        "-qmp",
        f"unix:{qmp_path},server=on,wait=off",
    ]
    if destination:
        argv += ["-incoming", "defer"]
    return argv


class _Qmp:
    """A minimal QMP client: commands in order, events kept, every read bounded by the
    run's deadline."""

    def __init__(self, path: str, process: subprocess.Popen[bytes], deadline: float) -> None:
        self._deadline = deadline
        self.events: list[dict[str, Any]] = []
        while True:
            self._sock = socket.socket(socket.AF_UNIX)
            try:
                self._sock.connect(path)
                break
            except OSError:
                self._sock.close()
                if process.poll() is not None:
                    raise ConnectionError(
                        f"QEMU exited with status {process.returncode}"
                    ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"QEMU's QMP socket {path} did not open") from None
                time.sleep(0.01)
        self._file = self._sock.makefile("rb")
        try:
            self._read("greeting")
            self.command("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def _read(self, what: str) -> dict[str, Any]:
        left = self._deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
            line = self._file.readline()
        except TimeoutError:
            raise TimeoutError(f"QEMU sent no {what} before the run's deadline") from None
        if not line:
            raise ConnectionError("QEMU closed its QMP socket (it exited)")
        message: dict[str, Any] = json.loads(line)
        return message

    def command(self, name: str, **arguments: Any) -> Any:
        """Run a command and return its ``return`` value; an error raises."""
        request = {"execute": name, "arguments": arguments}
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read(f"answer to {name}")
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                raise RuntimeError(f"QMP {name}: {message['error'].get('desc', message)}")
            else:
                return message.get("return")

    def wait_event(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first event (kept or new) that ``match`` accepts."""
        for event in self.events:
            if match(event):
                return event
        while True:
            message = self._read("migration event it waited for")
            if "event" in message:
                self.events.append(message)
                if match(message):
                    return message


def _status(event: dict[str, Any]) -> str | None:
    """The migration status a QMP event reports, ``None`` for other events."""
    return str(event["data"]["status"]) if event["event"] == "MIGRATION" else None


def _ended(event: dict[str, Any]) -> bool:
    return _status(event) in ("completed", "failed")


def _active(event: dict[str, Any]) -> bool:
    return _status(event) == "active"


def _timestamp(event: dict[str, Any]) -> float:
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _file_digest(path: str, size: int) -> str:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as ram:
        return digest(memoryview(ram))


def _ram_file(path: str, size: int, fill: Callable[[memoryview], None]) -> None:
    with open(path, "w+b") as f:
        # Allocated, not sparse: a full tmpfs fails here (ENOSPC), not with a SIGBUS on
        # a write through the mapping.
        os.posix_fallocate(f.fileno(), 0, size)
        with mmap.mmap(f.fileno(), size) as ram:
            fill(memoryview(ram))


@contextlib.contextmanager
def _ram_files(size: int, data: str, seed: int, known_zero: bool) -> Iterator[tuple[str, str]]:
    # On tmpfs when there is one: guest RAM in memory, as the other cases' buffers are.
    where = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="trio-multifd-qemu-", dir=where) as folder:
        source, destination = os.path.join(folder, "src.ram"), os.path.join(folder, "dst.ram")
        _ram_file(source, size, lambda view: fill_data(data, view, seed=seed))
        # Zero pages must be written over the pattern, as in the other cases; a
        # known-zero destination starts zeroed (QEMU then skips writing zero pages).
        _ram_file(destination, size, (lambda view: None) if known_zero else fill_pattern)
        yield source, destination


def run_qemu_once(
    binary: str,
    *,
    channels: int,
    compression: str,
    data: str,
    size: int,
    level: int | None = None,
    seed: int = 0,
    known_zero: bool = False,
    timeout: float | None = None,
) -> RunResult:
    """Migrate ``size`` bytes of ``data`` between two QEMU processes; never raises for a
    failed run (the result says why)."""
    if compression not in QEMU_METHODS:
        return failed_run(size, f"QEMU's multifd has no method {compression!r}")
    if size % MIB:
        return failed_run(size, "QEMU's guest RAM must be a whole number of MiB")
    if timeout is None:
        timeout = 60 + size / 50e6
    deadline = time.monotonic() + timeout
    errors: list[str] = []
    try:
        with _ram_files(size, data, seed, known_zero) as (source_ram, destination_ram):
            folder = os.path.dirname(source_ram)
            processes: list[subprocess.Popen[bytes]] = []
            clients: list[_Qmp] = []
            try:
                for name, ram in (("src", source_ram), ("dst", destination_ram)):
                    argv = qemu_argv(
                        binary,
                        ram_path=ram,
                        size=size,
                        qmp_path=os.path.join(folder, f"{name}.qmp"),
                        destination=name == "dst",
                    )
                    # stderr to a file: a pipe read only at the end could fill and block.
                    with open(os.path.join(folder, f"{name}.err"), "wb") as err:
                        processes.append(
                            subprocess.Popen(
                                argv,
                                stdout=subprocess.DEVNULL,
                                stderr=err,
                                # Two paused QEMUs holding guest RAM otherwise.
                                preexec_fn=die_with_parent,
                            )
                        )
                for name, process in zip(("src", "dst"), processes, strict=True):
                    clients.append(_Qmp(os.path.join(folder, f"{name}.qmp"), process, deadline))
                return _migrate(
                    clients,
                    processes,
                    channels,
                    compression,
                    level,
                    size,
                    source_ram,
                    destination_ram,
                )
            finally:
                for client in clients:
                    client.close()
                for process in processes:
                    process.kill()
                    process.wait()
                for name in ("src", "dst"):
                    with (
                        contextlib.suppress(OSError),
                        open(os.path.join(folder, f"{name}.err"), errors="replace") as f,
                    ):
                        errors.append(last_line(f.read()))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        detail = next((e for e in errors if e), "")
        return failed_run(size, f"QEMU run failed: {exc}{'; ' + detail if detail else ''}")


def _migrate(
    clients: list[_Qmp],
    processes: list[subprocess.Popen[bytes]],
    channels: int,
    compression: str,
    level: int | None,
    size: int,
    source_ram: str,
    destination_ram: str,
) -> RunResult:
    source, destination = clients
    parameters: dict[str, Any] = {
        "multifd-channels": channels,
        "multifd-compression": compression,
        # QEMU 7.2 caps a migration at 128 MiB/s unless told otherwise.
        "max-bandwidth": 1 << 40,
    }
    if level is not None and compression in _LEVEL_PARAMETER:
        parameters[_LEVEL_PARAMETER[compression]] = level
    for client in clients:
        client.command(
            "migrate-set-capabilities",
            capabilities=[
                {"capability": "multifd", "state": True},
                {"capability": "events", "state": True},
            ],
        )
        client.command("migrate-set-parameters", **parameters)
    # Port 0: the destination picks a free port and says which.
    destination.command("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = destination.command("query-migrate")["socket-address"][0]["port"]
    cpu_before = [_cpu_seconds(p.pid) for p in processes]
    source.command("migrate", uri=f"tcp:127.0.0.1:{port}")
    # The source first: if it failed, the destination may never end.
    end = source.wait_event(_ended)
    if _status(end) == "failed":
        info = source.command("query-migrate")
        return failed_run(size, f"QEMU's source failed: {info.get('error-desc', 'no reason')}")
    end = destination.wait_event(_ended)
    if _status(end) == "failed":
        info = destination.command("query-migrate")
        return failed_run(
            size, f"QEMU's destination failed: {info.get('error-desc', 'no reason')}"
        )
    cpu = [_cpu_seconds(p.pid) - before for p, before in zip(processes, cpu_before, strict=True)]
    seconds = _timestamp(end) - _timestamp(source.wait_event(_active))
    verified = _file_digest(source_ram, size) == _file_digest(destination_ram, size)
    return RunResult(
        seconds=seconds,
        size=size,
        sender_cpu_s=cpu[0],
        receiver_cpu_s=cpu[1],
        sender_rss_mib=_peak_rss_mib(processes[0].pid),
        receiver_rss_mib=_peak_rss_mib(processes[1].pid),
        verified=verified,
        error=None if verified else "target differs from source (hash mismatch)",
        load=os.getloadavg()[0],
    )
