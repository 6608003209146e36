"""``send`` and ``recv`` against hostile or broken peers: a clear one-line error within
``--idle-timeout``, no file left behind, never a hang.

The peers here are hand-written: plain sockets speaking the control framing of
docs/cli.rst (magic, then 4-byte length-prefixed JSON) to a real ``trio-multifd``
subprocess.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme

from trio_multifd import (
    Handshake,
    MappingError,
    TransportError,
    _control as control,
    _extents as extents,
    _filecopy as fc,
    encode_handshake,
)
from trio_multifd._errors import CopyError

from .helpers import small_tmpfs
from .test_cli import TIMEOUT, _command, can_lease, failed_json, receiving, send

GOOD_CHECKSUM = "0" * 32


def manifest(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "manifest",
        "name": "f.bin",
        "size": 8192,
        "page_size": 4096,
        "data_bytes": 8192,
        "nonzero_bytes": 8192,
        "method": "none",
        "channels": 1,
        "uuid": str(uuid.UUID(int=7)),
        "checksum": {"algorithm": "xxh3_128", "value": GOOD_CHECKSUM},
    }
    base.update(changes)
    return base


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def read_message(sock: socket.socket) -> dict[str, Any] | None:
    """One control message, or ``None`` when the peer closed the stream."""
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    message: dict[str, Any] = json.loads(data[4:])
    return message


def open_control(port: int, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall(control.CONTROL_MAGIC + frame(body))
    return sock


def finished(proc: subprocess.Popen[str]) -> tuple[int, list[str]]:
    _out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, err.strip().splitlines()


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (json.dumps(manifest(size=True)).encode(), "field 'size' is True"),
        (json.dumps(manifest(channels=True)).encode(), "field 'channels' is True"),
        (json.dumps(manifest(size=10**30)).encode(), "field 'size'"),
        (json.dumps(manifest(page_size=4096.0)).encode(), "field 'page_size' is 4096.0"),
        (json.dumps(manifest(name="a\0b")).encode(), "field 'name'"),
        (json.dumps(manifest(name="a\ud800")).encode(), "field 'name'"),
        (json.dumps(manifest(name="a\nb")).encode(), "field 'name'"),
        (json.dumps(manifest(name="n" * 256)).encode(), "is too long for the file system"),
        (json.dumps(manifest(nonzero_bytes=8193)).encode(), "field 'nonzero_bytes'"),
        (json.dumps(manifest(nonzero_bytes=None)).encode(), "field 'nonzero_bytes'"),
        (json.dumps(manifest(method="lz4")).encode(), "unknown compression method 'lz4'"),
        (json.dumps(manifest(mode=0o4755)).encode(), "field 'mode' is 2541"),
        (json.dumps(manifest(mode="0644")).encode(), "field 'mode'"),
        # UUID() takes these too; the uuid names the temporary file.
        (json.dumps(manifest(uuid="\n" + "1" * 31)).encode(), "field 'uuid'"),
        (json.dumps(manifest(uuid="urn:uuid:" + str(uuid.UUID(int=7)))).encode(), "field 'uuid'"),
        (
            json.dumps(
                manifest(checksum={"algorithm": "xxh3_128", "value": "abc\ntrio-multifd: OK"})
            ).encode(),
            "field 'checksum'",
        ),
    ],
)
def test_a_bad_manifest_is_refused_by_name_and_leaves_no_file(
    tmp_path: Path, body: bytes, complaint: str
) -> None:
    with receiving(tmp_path) as (proc, port):
        with open_control(port, body) as sock:
            reply = read_message(sock)
        code, lines = finished(proc)
    assert reply is not None and reply["type"] == "refuse"
    assert complaint in reply["error"]
    assert code == 1
    assert len(lines) == 1 and complaint in lines[0], lines
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("sent", "complaint"),
    [
        (
            frame(json.dumps(manifest()).encode("utf-16")),
            "bad control message from {}: UnicodeDecodeError",
        ),
        (frame(b"[" * 30000), "bad control message from {}: RecursionError"),
        (frame(b"[1, 2]"), "bad control message from {}: not an object with a type"),
        (frame(b"42"), "bad control message from {}: not an object with a type"),
        (frame(b'{"type": 5}'), "bad control message from {}: not an object with a type"),
        (b"\x00\x00", "{} closed the control stream before the manifest"),
        (struct.pack(">I", 100) + b'{"type"', "{} closed the control stream before the manifest"),
        (b"", "{} closed the control stream before the manifest"),
    ],
    ids=["utf-16", "nested", "list", "number", "type-number", "cut-length", "cut-body", "none"],
)
def test_a_malformed_or_missing_manifest_is_one_line_naming_the_sender(
    tmp_path: Path, sent: bytes, complaint: str
) -> None:
    with receiving(tmp_path) as (proc, port):
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sender = "the sender at {}:{}".format(*sock.getsockname())
            sock.sendall(control.CONTROL_MAGIC + sent)
            sock.shutdown(socket.SHUT_WR)
            assert read_message(sock) is None
            code, lines = finished(proc)
    assert code == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith("trio-multifd: error: " + complaint.format(sender)), lines
    assert list(tmp_path.iterdir()) == []


def test_a_connection_that_is_no_control_stream_is_named_by_its_address(tmp_path: Path) -> None:
    with receiving(tmp_path) as (proc, port):
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            address = "{}:{}".format(*sock.getsockname())
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
            code, lines = finished(proc)
    assert code == 1
    assert lines == [
        f"trio-multifd: error: a connection from {address} that is not a trio-multifd"
        " control stream (it began with b'GET / HT')"
    ]


async def test_a_control_stream_reset_mid_manifest_is_named_by_its_address() -> None:
    opened = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        with trio.fail_after(TIMEOUT):
            sender = await trio.open_tcp_stream("127.0.0.1", opened[0].socket.getsockname()[1])
            address = "{}:{}".format(*sender.socket.getsockname())
            await sender.send_all(control.CONTROL_MAGIC + struct.pack(">I", 100) + b'{"type"')
            async with trio.open_nursery() as nursery:

                async def reset_once_read() -> None:
                    # Once the receiver waits for the rest: a reset that outran the bytes
                    # before it would be a connection closed before its first byte.
                    await trio.testing.wait_all_tasks_blocked(0.1)
                    sender.socket.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    await sender.aclose()

                nursery.start_soon(reset_once_read)
                with pytest.raises(CopyError) as caught:
                    await control.accept_control([*opened], TIMEOUT)
    finally:
        await opened[0].aclose()
    assert str(caught.value) == (
        f"control stream from {address} failed: [Errno {errno.ECONNRESET}]"
        f" {os.strerror(errno.ECONNRESET)}"
    )


async def test_a_manifest_cut_short_by_a_sender_that_stays_is_given_up_in_time() -> None:
    opened = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        with trio.fail_after(TIMEOUT):
            sender = await trio.open_tcp_stream("127.0.0.1", opened[0].socket.getsockname()[1])
            await sender.send_all(control.CONTROL_MAGIC + struct.pack(">I", 100) + b'{"type"')
            with pytest.raises(CopyError) as caught:
                await control.accept_control([*opened], 0.5)
            address = "{}:{}".format(*sender.socket.getsockname())
            assert str(caught.value) == f"no manifest from the sender at {address} within 0.5s"
            assert await sender.receive_some(1) == b""  # closed by the receiver
            await sender.aclose()
    finally:
        await opened[0].aclose()


def test_a_long_bad_field_is_quoted_cut_short_even_to_a_sender_that_does_not_read(
    tmp_path: Path,
) -> None:
    # Each "é" is 2 bytes in the manifest and 6 in the refusal's JSON, \u00e9: the
    # whole name quoted would make a refusal of 180 KB, past MAX_MESSAGE and more than a
    # socket that is not read takes, which left recv blocked for ever.
    body = json.dumps(manifest(name="\u00e9" * 30000 + "/"), ensure_ascii=False).encode()
    with receiving(tmp_path) as (proc, port):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.connect(("127.0.0.1", port))
            sock.sendall(control.CONTROL_MAGIC + frame(body))
            code, lines = finished(proc)  # before a byte is read
            sock.settimeout(TIMEOUT)
            reply = read_message(sock)
    complaint = "bad manifest: field 'name' is '" + "\u00e9" * 99 + "... (29903 more characters)"
    assert reply == {"type": "refuse", "error": complaint}
    assert code == 1
    assert lines == [f"trio-multifd: error: {complaint}"]
    assert list(tmp_path.iterdir()) == []


def test_a_sender_writing_on_its_control_stream_mid_transfer_is_named_so(
    tmp_path: Path,
) -> None:
    with receiving(tmp_path) as (proc, port):
        with open_control(port, json.dumps(manifest()).encode()) as sock:
            assert read_message(sock) == {"type": "go"}
            sock.sendall(frame(b'{"type": "verdict", "ok": true}'))
            code, lines = finished(proc)  # the control stream is still open
    assert code == 1
    assert lines == [
        "trio-multifd: error: the sender wrote on its control stream mid-transfer (nothing"
        " but an abort may come from it between the manifest and the verdict)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_a_senders_abort_mid_transfer_gives_the_receiver_its_reason(tmp_path: Path) -> None:
    with receiving(tmp_path) as (proc, port):
        with open_control(port, json.dumps(manifest()).encode()) as sock:
            assert read_message(sock) == {"type": "go"}
            sock.sendall(frame(b'{"type": "abort", "error": "disk on fire\\nreally"}'))
            code, lines = finished(proc)  # the control stream is still open
    assert code == 1
    assert lines == [
        "trio-multifd: error: the sender stopped mid-transfer: 'disk on fire\\nreally'"
    ]
    assert list(tmp_path.iterdir()) == []


def test_a_receiver_whose_sender_never_opens_its_channels_gives_up(tmp_path: Path) -> None:
    with receiving(tmp_path, "--idle-timeout", "1") as (proc, port):
        with open_control(port, json.dumps(manifest()).encode()) as sock:
            assert read_message(sock) == {"type": "go"}
            code, lines = finished(proc)  # the control stream is still open
    assert code == 1
    assert lines == ["trio-multifd: error: " + no_data_message(1.0)]
    assert list(tmp_path.iterdir()) == []


def test_a_receiver_whose_sender_stalls_inside_a_packet_gives_up(tmp_path: Path) -> None:
    with receiving(tmp_path, "--idle-timeout", "1") as (proc, port):
        with open_control(port, json.dumps(manifest()).encode()) as sock:
            assert read_message(sock) == {"type": "go"}
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as channel:
                channel.sendall(encode_handshake(Handshake(uuid.UUID(int=7), 0)))
                channel.sendall(bytes.fromhex("112233440000000100"))  # a header's start
                code, lines = finished(proc)
    assert code == 1
    assert lines == ["trio-multifd: error: " + no_data_message(1.0)]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signals", [1, 2], ids=["once", "twice"])
def test_sigterm_stops_a_receiver_and_removes_its_partial_file(
    tmp_path: Path, signals: int
) -> None:
    with receiving(tmp_path, "--json") as (proc, port):
        with open_control(port, json.dumps(manifest()).encode()) as sock:
            assert read_message(sock) == {"type": "go"}
            assert len(list(tmp_path.iterdir())) == 1  # the temporary file
            for _ in range(signals):  # a second one, while it stops, changes nothing
                proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143
    assert json.loads(out) == {"ok": False, "command": "recv", "error": "terminated"}
    assert err.splitlines()[-1] == "trio-multifd: terminated"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_after_the_receivers_report_leaves_its_exit_status_that_of_the_report(
    tmp_path: Path, signum: signal.Signals
) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(100_000))
    with receiving(tmp_path / "copy", "--json") as (proc, port):
        sender = subprocess.Popen(_command("send", str(src), f"127.0.0.1:{port}", "-q"), text=True)
        with killed_if_left(sender):
            assert proc.stdout is not None
            report = json.loads(proc.stdout.readline())
            # Signals all the way to the exit: one lands after any handler is restored.
            while proc.poll() is None:
                proc.send_signal(signum)
                time.sleep(0.0005)
            assert sender.wait(TIMEOUT) == 0
    assert report["ok"] is True
    assert proc.returncode == 0


@contextmanager
def killed_if_left(proc: subprocess.Popen[str]) -> Iterator[None]:
    """Kill ``proc`` on the way out if it is still running (a test that failed)."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def no_data_message(seconds: float) -> str:
    return f"no data from the sender for {seconds}s (its channels never opened, or it stalled)"


@contextmanager
def fake_receiver(
    reply: dict[str, Any] | None, got_manifest: threading.Event | None = None
) -> Iterator[int]:
    """A listener that reads the manifest (then sets ``got_manifest``), sends ``reply``
    (or nothing) and keeps the control stream open until the sender leaves."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            assert (
                conn.recv(len(control.CONTROL_MAGIC), socket.MSG_WAITALL) == control.CONTROL_MAGIC
            )
            (length,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
            conn.recv(length, socket.MSG_WAITALL)
            if got_manifest is not None:
                got_manifest.set()
            if reply is not None:
                conn.sendall(frame(json.dumps(reply).encode()))
            conn.recv(1)  # until the sender closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        thread.join(TIMEOUT)
        listener.close()


def test_a_sender_waits_for_the_go_ahead_no_longer_than_idle_timeout(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 5000)
    with fake_receiver(None) as port:
        proc = send(src, port, "--idle-timeout", "1")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "trio-multifd: error: no go-ahead from the receiver within 1.0s"
    ]


def test_a_writer_opening_the_file_while_the_sender_awaits_its_go_ahead_stops_it(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(64 * 4096))
    if not can_lease(src):
        pytest.skip("this file system has no file leases")
    got_manifest = threading.Event()
    with fake_receiver(None, got_manifest) as port:
        sender = subprocess.Popen(
            _command("send", str(src), f"127.0.0.1:{port}"),
            stderr=subprocess.PIPE,
            text=True,
        )
        with killed_if_left(sender):
            assert got_manifest.wait(TIMEOUT)
            # Waits for the sender's lease; with the file open for writing the sender
            # could not have taken one later, and a truncation would be a SIGBUS.
            fd = os.open(src, os.O_WRONLY)
            os.close(fd)
            _, err = sender.communicate(timeout=TIMEOUT)
    assert sender.returncode == 1
    assert err.splitlines()[-1] == (
        f"trio-multifd: error: {src} was opened for writing or truncated by another"
        " process while it was being sent: the copy stopped (its content would no longer"
        " match the checksum)"
    )


def test_a_refusal_with_control_characters_is_printed_on_one_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 5000)
    with fake_receiver({"type": "refuse", "error": "nope\ntrio-multifd: sent OK"}) as port:
        proc = send(src, port)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "trio-multifd: error: the receiver refused: 'nope\\ntrio-multifd: sent OK'"
    ]


def test_a_long_refusal_is_printed_cut_short(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 5000)
    with fake_receiver({"type": "refuse", "error": "n" * 60000}) as port:
        proc = send(src, port)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "trio-multifd: error: the receiver refused: " + "n" * 5000 + "... (55000 more characters)"
    ]


def test_json_names_a_tls_file_that_cannot_be_loaded(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x")
    missing = tmp_path / "ca.pem"
    assert str(missing) in failed_json(send(src, 9, "--json", "--tls-ca", str(missing)))


async def copy_in_process(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    checking: bool,
    during_check: Callable[[Path], None] = lambda src: None,
    check_seconds: float = 3.5,
) -> tuple[BaseException | fc.Summary, BaseException | fc.Summary]:
    """A copy whose receiver takes ``check_seconds`` to check the file, with
    idle_timeout 1 s; ``checking=False`` silences the receiver's "still checking"
    messages; ``during_check(source path)`` runs as the receiver's check begins."""
    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * 64)
    real = extents.scan
    calls = 0

    def slow_second_call(
        fd: int, size: int, between_chunks: Callable[[], object], *, count_pages: bool, name: str
    ) -> tuple[str, int]:
        nonlocal calls
        calls += 1
        if calls == 2:  # the receiver's, after the sender's own
            during_check(src)
            time.sleep(check_seconds)
        return real(fd, size, between_chunks, count_pages=count_pages, name=name)

    monkeypatch.setattr(extents, "scan", slow_second_call)
    if not checking:

        async def silent(control: trio.abc.Stream, interval: float) -> None:
            await trio.sleep_forever()

        monkeypatch.setattr(fc, "_checking", silent)
    results: dict[str, BaseException | fc.Summary] = {}
    ports: list[int] = []
    ready = trio.Event()

    def announce(host: str, port: int) -> None:
        ports.append(port)
        ready.set()

    async def run(key: str, task: Any) -> None:
        try:
            results[key] = await task()
        except Exception as exc:
            results[key] = exc

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                run,
                "recv",
                lambda: fc.receive_file(
                    str(tmp_path / "dst"), "127.0.0.1", 0, announce=announce, idle_timeout=1.0
                ),
            )
            await ready.wait()
            await run(
                "send",
                lambda: fc.send_file(str(src), "127.0.0.1", ports[0], idle_timeout=1.0),
            )
    return results["send"], results["recv"]


async def test_a_long_check_keeps_the_sender_waiting_for_its_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent, received = await copy_in_process(tmp_path, monkeypatch, checking=True)
    assert isinstance(sent, fc.Summary) and isinstance(received, fc.Summary)
    assert (tmp_path / "dst").read_bytes() == (tmp_path / "src").read_bytes()


def refusing_fchmod(code: int) -> Callable[[int, int], None]:
    def fchmod(fd: int, mode: int) -> None:
        raise OSError(code, os.strerror(code))

    return fchmod


async def test_a_file_system_that_keeps_no_permission_bits_still_gets_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # vfat refuses, with EPERM, any mode but the one its mount gives every file.
    monkeypatch.setattr(os, "fchmod", refusing_fchmod(errno.EPERM))
    sent, received = await copy_in_process(tmp_path, monkeypatch, checking=True, check_seconds=0)
    assert isinstance(sent, fc.Summary) and isinstance(received, fc.Summary)
    assert (tmp_path / "dst").read_bytes() == (tmp_path / "src").read_bytes()


async def test_a_mode_that_cannot_be_set_is_named_on_both_sides_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fchmod", refusing_fchmod(errno.EIO))
    sent, received = await copy_in_process(tmp_path, monkeypatch, checking=True, check_seconds=0)
    mode = (tmp_path / "src").stat().st_mode & 0o777
    error = f"cannot give the copy mode {mode:#o}: Input/output error"
    assert isinstance(received, CopyError) and str(received) == error
    assert isinstance(sent, BaseException) and error in fc.describe(sent)
    assert sorted(os.listdir(tmp_path)) == ["src"]


async def test_the_sender_lets_its_file_go_once_its_pages_have_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[int] = []

    def open_for_writing(src: Path) -> None:
        # Non-blocking: while the sender holds its lease this fails with EAGAIN. The
        # sender lets go as its block ends, which may be just after this check begins,
        # but long before the check's 3.5 s are over and the verdict lets it go.
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            try:
                fd = os.open(src, os.O_WRONLY | os.O_NONBLOCK)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            opened.append(fd)
            os.close(fd)
            return

    sent, received = await copy_in_process(
        tmp_path, monkeypatch, checking=True, during_check=open_for_writing
    )
    assert len(opened) == 1
    assert isinstance(sent, fc.Summary) and isinstance(received, fc.Summary)
    assert (tmp_path / "dst").read_bytes() == (tmp_path / "src").read_bytes()


async def test_a_sender_waits_for_a_silent_verdict_no_longer_than_idle_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent, received = await copy_in_process(tmp_path, monkeypatch, checking=False)
    assert isinstance(sent, CopyError)
    assert str(sent) == "no verdict from the receiver within 1.0s"
    # The receiver's copy checked out: it keeps it whole, or, if it noticed the sender
    # gone before its verdict went out, nothing at all.
    if isinstance(received, fc.Summary):
        assert (tmp_path / "dst").read_bytes() == (tmp_path / "src").read_bytes()
    else:
        assert isinstance(received, CopyError)
        assert not (tmp_path / "dst").exists()


async def test_the_control_stream_is_accepted_on_any_listener() -> None:
    first = await trio.open_tcp_listeners(0, host="127.0.0.1")
    second = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        with trio.fail_after(TIMEOUT):
            port = second[0].socket.getsockname()[1]
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(control.CONTROL_MAGIC + frame(json.dumps(manifest()).encode()))
            accepted, received = await control.accept_control([*first, *second], TIMEOUT)
            assert received == manifest()
            await client.send_all(b"hello")
            assert await accepted.receive_some(5) == b"hello"
            await accepted.aclose()
            await client.aclose()
    finally:
        for listener in (*first, *second):
            await listener.aclose()


def scanner(port: int, how: str) -> socket.socket:
    """A connection that is no sender: closed, reset, or left open and silent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if how != "silent":
        sock.close()
    return sock


@pytest.mark.parametrize("how", ["closed", "reset", "silent"])
def test_a_connection_that_says_nothing_before_the_sender_does_not_end_the_receiver(
    tmp_path: Path, how: str
) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(64 * 4096 + 5))
    with receiving(tmp_path / "dst") as (proc, port):
        # A port scanner or a health check, first on the port; a silent one stays open
        # through the copy, so the sender's control stream is read beside it.
        with scanner(port, how):
            sent = send(src, port, "--channels", "2")
        code, lines = finished(proc)
    assert sent.returncode == 0, sent.stderr
    assert code == 0, lines
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("how", ["closed", "reset"])
async def test_only_a_tls_connection_closed_after_its_first_bytes_is_noted(how: str) -> None:
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    distrustful = ssl.create_default_context()
    trustme.CA().configure_trust(distrustful)
    opened = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = opened[0].socket.getsockname()[1]
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = [
        trio.SSLListener(listener, server_tls) for listener in opened
    ]
    notices: list[str] = []
    noted = trio.Event()

    def notice(line: str) -> None:
        notices.append(line)
        noted.set()

    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(control.accept_control, listeners, TIMEOUT, notice)
                scanner(port, how)  # before its first byte: a port scanner, no notice
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                address = tcp.socket.getsockname()
                sender = trio.SSLStream(tcp, distrustful, server_hostname="127.0.0.1")
                with pytest.raises(trio.BrokenResourceError):
                    await sender.do_handshake()
                await trio.aclose_forcefully(sender)
                await noted.wait()
                nursery.cancel_scope.cancel()
    finally:
        await opened[0].aclose()
    assert notices == [
        f"a connection from {address[0]}:{address[1]} closed during the TLS handshake (a"
        " sender that does not trust this certificate?)"
    ]


async def test_a_connection_silent_for_handshake_timeout_is_dropped() -> None:
    opened = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = [*opened]
    try:
        with trio.fail_after(TIMEOUT):
            silent = await trio.open_tcp_stream("127.0.0.1", opened[0].socket.getsockname()[1])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(control.accept_control, listeners, 0.2)
                # Dropped by the receiver once handshake_timeout has passed.
                assert await silent.receive_some(1) == b""
                nursery.cancel_scope.cancel()
            await silent.aclose()
    finally:
        await opened[0].aclose()


@contextmanager
def verdict_receiver(verdict: bytes) -> Iterator[int]:
    """A receiver that says go, reads every channel to its end, closes each cleanly (the
    delivery confirmation), then sends ``verdict`` as its verdict message's body."""
    listener = socket.create_server(("127.0.0.1", 0))

    def drain(conn: socket.socket) -> None:
        with conn:
            while conn.recv(65536):
                pass

    def serve() -> None:
        control_conn, _ = listener.accept()
        with control_conn:
            control_conn.settimeout(TIMEOUT)
            assert (
                control_conn.recv(len(control.CONTROL_MAGIC), socket.MSG_WAITALL)
                == control.CONTROL_MAGIC
            )
            (length,) = struct.unpack(">I", control_conn.recv(4, socket.MSG_WAITALL))
            channels = json.loads(control_conn.recv(length, socket.MSG_WAITALL))["channels"]
            control_conn.sendall(frame(b'{"type": "go"}'))
            drains = [threading.Thread(target=drain, args=(listener.accept()[0],))]
            drains += [
                threading.Thread(target=drain, args=(listener.accept()[0],))
                for _ in range(channels - 1)
            ]
            for thread in drains:
                thread.start()
            for thread in drains:
                thread.join(TIMEOUT)
            control_conn.sendall(frame(verdict))
            control_conn.recv(1)  # until the sender closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(TIMEOUT)
        listener.close()


@pytest.mark.parametrize(
    ("verdict", "complaint"),
    [
        (
            b'{"type": "verdict", "ok": "no", "error": "bad copy"}',
            "the receiver rejected the copy: bad copy",
        ),
        (b'{"type": "verdict", "ok": [false]}', "the receiver rejected the copy: "),
        (b'{"type": "verdict", "ok": 1}', "the receiver rejected the copy: "),
        (
            b'{"type": "verdict", "ok": true, "checksum": "nonsense"}',
            "the receiver's verdict names checksum nonsense, the file's is ",
        ),
        (b'{"type": "verdict", "ok": true}', "the receiver's verdict names checksum None"),
        (
            b"not json",
            "bad control message from the receiver: JSONDecodeError",
        ),
        (
            b'{"type": "refuse", "error": "too late"}',
            "the receiver sent a 'refuse' message where its verdict belongs",
        ),
    ],
)
def test_only_a_verdict_that_is_ok_with_the_files_checksum_is_a_success(
    tmp_path: Path, verdict: bytes, complaint: str
) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(64 * 4096))
    with verdict_receiver(verdict) as port:
        proc = send(src, port, "--channels", "2", "--idle-timeout", "5", "--quiet")
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"trio-multifd: error: {complaint}"), lines


@contextmanager
def hasty_receiver(early: str | bytes, said: list[dict[str, Any]]) -> Iterator[int]:
    """A receiver that says go and at once sends an ``early`` message (a ``verdict``, ok
    with the manifest's checksum, or a bare message of that type; bytes are the body of
    the message as they are), reads every channel
    to its end and closes it (what a real receiver does after the final SYNC), and puts
    in ``said`` what the sender writes on its control stream before it closes it."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def drain(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # a reset when the sender stops
            conn.settimeout(TIMEOUT)
            while conn.recv(65536):
                pass

    def serve_channels() -> None:
        drains: list[threading.Thread] = []
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                drains.append(threading.Thread(target=drain, args=(listener.accept()[0],)))
                drains[-1].start()
        for thread in drains:
            thread.join(TIMEOUT)

    def serve() -> None:
        conn, _ = listener.accept()
        listener.settimeout(0.1)
        channels = threading.Thread(target=serve_channels)
        with conn:
            conn.settimeout(TIMEOUT)
            assert conn.recv(len(control.CONTROL_MAGIC), socket.MSG_WAITALL) == (
                control.CONTROL_MAGIC
            )
            (length,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
            checksum = json.loads(conn.recv(length, socket.MSG_WAITALL))["checksum"]["value"]
            message: dict[str, Any] = {"type": early}
            if early == "verdict":
                message.update(ok=True, checksum=checksum)
            body = early if isinstance(early, bytes) else json.dumps(message).encode()
            conn.sendall(frame(b'{"type": "go"}') + frame(body))
            channels.start()
            while (reply := read_message(conn)) is not None:
                said.append(reply)
        done.set()
        channels.join(TIMEOUT)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(TIMEOUT)
        listener.close()


@pytest.mark.parametrize("early", ["verdict", "checking", "go"])
def test_a_receiver_that_speaks_before_the_senders_last_page_fails_the_copy(
    tmp_path: Path, early: str
) -> None:
    # Its verdict cannot be about pages that have not been sent: an ok one passed for
    # the copy's success.
    src = tmp_path / "src"
    src.write_bytes(os.urandom(64 * 4096))
    said: list[dict[str, Any]] = []
    with hasty_receiver(early, said) as port:
        proc = send(src, port, "--channels", "2", "--idle-timeout", "5")
    error = (
        f"the receiver wrote on its control stream mid-transfer (a '{early}' message before"
        " the sender's last page; nothing may come from it between the go-ahead and the"
        " transfer's end)"
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"trio-multifd: error: {error}"]
    assert said == [{"type": "abort", "error": error}]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (
            b"{nope",
            "bad control message from the receiver: JSONDecodeError: Expecting property name"
            " enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        (b"[]", "bad control message from the receiver: not an object with a type"),
    ],
    ids=["not-json", "a-list"],
)
def test_a_sender_stopped_by_a_malformed_message_mid_transfer_tells_the_receiver_why(
    tmp_path: Path, body: bytes, error: str
) -> None:
    # Its abort said "it was cancelled (Ctrl-C, SIGTERM or its application)": the
    # message's reader cancels the transfer, and the abort described the cancel.
    src = tmp_path / "src"
    src.write_bytes(os.urandom(64 * 4096))
    said: list[dict[str, Any]] = []
    with hasty_receiver(body, said) as port:
        proc = send(src, port, "--channels", "2", "--idle-timeout", "5")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"trio-multifd: error: {error}"]
    assert said == [{"type": "abort", "error": error}]


def test_the_line_of_a_failed_copy_names_this_sides_own_fault_before_the_peers_leaving() -> None:
    own = MappingError("block 'data': cannot read pages 0x0..0x1000 of its mapped file")
    gone = control.PeerGone("the receiver went away before its verdict (it failed or was stopped)")
    reset = TransportError("stream failed while sending: ConnectionResetError")
    assert fc.describe(ExceptionGroup("", [gone, reset, own])) == f"transfer failed: {own}"
    assert fc.describe(ExceptionGroup("", [reset, gone])) == str(gone)
    stopped = CopyError("the source changed")
    assert fc.describe(ExceptionGroup("", [own, gone, stopped])) == str(stopped)


def test_an_interrupted_receiver_still_prints_one_json_object(tmp_path: Path) -> None:
    with receiving(tmp_path, "--json") as (proc, _port):
        proc.send_signal(signal.SIGINT)
        out, _err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130
    assert json.loads(out) == {"ok": False, "command": "recv", "error": "interrupted"}


def refused_before_listening(dest: str, *extra: str) -> list[str]:
    """Run ``recv dest`` (with ``extra``): it must exit 1 at once; its stderr lines."""
    proc = subprocess.run(
        [*_command("recv"), dest, "--listen", "127.0.0.1:0", *extra],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 1
    return proc.stderr.splitlines()


def test_a_destination_directory_that_does_not_exist_is_refused_before_listening(
    tmp_path: Path,
) -> None:
    missing = f"{tmp_path / 'no-such-dir'}/"
    assert refused_before_listening(missing) == [
        f"trio-multifd: error: {missing} is not a directory"
    ]


def test_a_destination_whose_directory_does_not_exist_is_refused_before_listening(
    tmp_path: Path,
) -> None:
    dest = tmp_path / "no-such-dir" / "f.bin"
    assert refused_before_listening(str(dest)) == [
        f"trio-multifd: error: cannot receive into {dest}: {dest.parent} is not a directory"
    ]


@pytest.mark.parametrize("name", [None, "f.bin"])
def test_a_destination_on_a_read_only_file_system_is_refused_before_listening(
    tmp_path: Path, name: str | None
) -> None:
    # Found once a sender came, it cost that sender the checksum of its whole file.
    with small_tmpfs(tmp_path) as small:
        subprocess.run(["mount", "-o", "remount,ro", str(small)], check=True)
        dest = str(small / name) if name else str(small)
        assert refused_before_listening(dest) == [
            f"trio-multifd: error: cannot receive into {dest}: {small} is on a read-only"
            " file system"
        ]


def test_a_sender_gone_before_the_refusal_still_gets_the_receivers_own_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "f.bin").write_bytes(b"old")
    with receiving(tmp_path) as (proc, port):
        with open_control(port, json.dumps(manifest()).encode()) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        code, lines = finished(proc)
    assert code == 1
    assert len(lines) == 1 and "exists: refusing to overwrite it" in lines[0], lines
    assert (tmp_path / "f.bin").read_bytes() == b"old"


def test_a_sender_whose_receiver_stops_reading_gives_up_after_idle_timeout(
    tmp_path: Path,
) -> None:
    # The go-ahead comes, then no channel is ever accepted: the sender's sockets fill.
    src = tmp_path / "src"
    src.write_bytes(os.urandom(16 << 20))
    started = time.monotonic()
    with fake_receiver({"type": "go"}) as port:
        proc = send(src, port, "--idle-timeout", "1")
    assert time.monotonic() - started < TIMEOUT / 2
    assert proc.returncode == 1
    [line] = proc.stderr.splitlines()
    assert re.fullmatch(
        r"trio-multifd: error: transfer failed: channel \d: the peer accepted no byte for"
        r" send_timeout=1\.0s",
        line,
    ), line


def test_a_tls_file_that_never_opens_does_not_deafen_the_sender_to_sigterm(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x")
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)  # no writer: opening it waits forever
    proc = subprocess.Popen(
        _command("send", str(src), "127.0.0.1:9", "--tls-ca", str(fifo), "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with killed_if_left(proc):
        time.sleep(1.0)  # inside the TLS context's load by now, or about to be
        proc.send_signal(signal.SIGTERM)
        out, _err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143
    assert json.loads(out) == {"ok": False, "command": "send", "error": "terminated"}


def test_a_directory_under_the_final_name_is_refused_before_any_page_even_with_force(
    tmp_path: Path,
) -> None:
    (tmp_path / "f.bin").mkdir()
    with receiving(tmp_path, "--force") as (proc, port):
        with open_control(port, json.dumps(manifest()).encode()) as sock:
            reply = read_message(sock)
        code, lines = finished(proc)
    assert reply is not None and reply["type"] == "refuse"
    assert (
        reply["error"] == f"{tmp_path / 'f.bin'} is a directory: it cannot be replaced by the copy"
    )
    assert code == 1
    assert lines == ["trio-multifd: error: " + reply["error"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def make_node(path: Path, kind: str) -> None:
    if kind == "a FIFO":
        os.mkfifo(path)
    else:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))  # the node stays after the socket closes


NODES = ["a FIFO", "a socket"]


@pytest.mark.parametrize("kind", NODES)
def test_a_fifo_or_socket_at_path_is_refused_before_listening_even_with_force(
    tmp_path: Path, kind: str
) -> None:
    node = tmp_path / "dest"
    make_node(node, kind)
    assert refused_before_listening(str(node), "--force") == [
        f"trio-multifd: error: {node} is {kind}: it cannot be replaced by the copy"
    ]
    assert not node.is_file()


@pytest.mark.parametrize("kind", NODES)
def test_a_fifo_or_socket_under_the_final_name_is_refused_before_any_page_even_with_force(
    tmp_path: Path, kind: str
) -> None:
    make_node(tmp_path / "f.bin", kind)
    with receiving(tmp_path, "--force") as (proc, port):
        with open_control(port, json.dumps(manifest()).encode()) as sock:
            reply = read_message(sock)
        code, lines = finished(proc)
    assert reply == {
        "type": "refuse",
        "error": f"{tmp_path / 'f.bin'} is {kind}: it cannot be replaced by the copy",
    }
    assert code == 1
    assert lines == ["trio-multifd: error: " + reply["error"]]
    assert not (tmp_path / "f.bin").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a tmpfs at /dev/shm")
def test_a_size_the_file_system_takes_but_memory_cannot_map_is_refused() -> None:
    # tmpfs grows a file to 4 PiB on ftruncate; no address space maps that much.
    folder = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        with receiving(folder) as (proc, port):
            body = json.dumps(manifest(size=2**52, data_bytes=0, nonzero_bytes=0)).encode()
            with open_control(port, body) as sock:
                reply = read_message(sock)
            code, lines = finished(proc)
        assert reply is not None and reply["type"] == "refuse"
        assert reply["error"] == (f"cannot map a file of {2**52} bytes: Cannot allocate memory")
        assert code == 1
        assert lines == ["trio-multifd: error: " + reply["error"]]
        assert list(folder.iterdir()) == []
    finally:
        shutil.rmtree(folder)


@pytest.mark.skipif(
    not os.path.isdir("/dev/shm") or shutil.which("prlimit") is None,
    reason="needs a tmpfs at /dev/shm and prlimit",
)
def test_a_size_whose_page_bitmap_cannot_be_allocated_is_refused() -> None:
    # 16 TiB of holes on tmpfs: the file's mapping fits the address-space limit, its
    # known-zero bitmap (a byte per page, 4 GiB) does not.
    size = 16 << 40
    folder = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        limit = ["prlimit", f"--as={size + (3 << 30)}"]
        with receiving(folder, wrapper=limit) as (proc, port):
            body = json.dumps(manifest(size=size, data_bytes=0, nonzero_bytes=0)).encode()
            with open_control(port, body) as sock:
                reply = read_message(sock)
            code, lines = finished(proc)
        assert reply is not None and reply["type"] == "refuse"
        assert reply["error"] == (
            f"cannot receive a file of {size} bytes: block 'data': no memory for its"
            f" known-zero bitmap of {size // 4096} bytes (a byte per page): Cannot allocate"
            " memory"
        )
        assert code == 1
        assert lines == ["trio-multifd: error: " + reply["error"]]
        assert list(folder.iterdir()) == []
    finally:
        shutil.rmtree(folder)


def test_a_huge_sparse_file_costs_the_receiver_no_memory_per_page_up_front(
    tmp_path: Path,
) -> None:
    # 1 TiB of holes: 256 Mi pages, whose known-zero bitmap (a byte per page) is backed
    # only where pages arrive.
    with receiving(tmp_path) as (proc, port):
        body = json.dumps(manifest(size=1 << 40, data_bytes=0, nonzero_bytes=0)).encode()
        with open_control(port, body) as sock:
            assert read_message(sock) == {"type": "go"}
            status = Path(f"/proc/{proc.pid}/status").read_text()
        finished(proc)  # fails: the sender went away
    [rss_kib] = re.findall(r"VmRSS:\s+(\d+) kB", status)
    assert int(rss_kib) < 200 * 1024, status


def test_a_source_whose_name_is_not_utf8_arrives_under_a_printable_name(tmp_path: Path) -> None:
    source_dir, dest = tmp_path / "src", tmp_path / "dest"
    source_dir.mkdir()
    dest.mkdir()
    src = os.path.join(os.fsencode(source_dir), b"caf\xe9\x07.bin")
    with open(src, "wb") as file:
        file.write(b"data" * 3000)
    with receiving(dest) as (recv, port):
        proc = subprocess.run(
            [*_command("send"), os.fsdecode(src), f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert proc.returncode == 0, proc.stderr
        assert finished(recv)[0] == 0
    assert [p.name for p in dest.iterdir()] == ["caf\ufffd\ufffd.bin"]
    assert (dest / "caf\ufffd\ufffd.bin").read_bytes() == b"data" * 3000


@contextmanager
def answering_receiver(answer: bytes, *, close: bool = False) -> Iterator[int]:
    """A listener that answers the control stream's opening with ``answer`` (raw bytes),
    then closes it (``close``) or reads it until the sender leaves."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            # Read whole: the sender writes the magic and the manifest in two sends, and a
            # close with the manifest unread would be a reset, not the answer's end.
            conn.recv(len(control.CONTROL_MAGIC), socket.MSG_WAITALL)
            (length,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
            conn.recv(length, socket.MSG_WAITALL)
            conn.sendall(answer)
            with contextlib.suppress(ConnectionResetError):  # the sender leaves
                while not close and conn.recv(65536):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(TIMEOUT)
        listener.close()


@pytest.mark.parametrize(
    ("answer", "shown"),
    [
        (
            b"HTTP/1.1 400 Bad Request\r\n\r\n",
            "1213486160 bytes (limit 65536): it began with b'HTTP'",
        ),
        (b"SSH-2.0-OpenSSH_9.2p1\r\n", "1397966893 bytes (limit 65536): it began with b'SSH-'"),
        (
            b"\x8f\x13\xfe\x02" + bytes(60),
            "2400452098 bytes (limit 65536): it began with b'\\x8f\\x13\\xfe\\x02'",
        ),
    ],
    ids=["http", "ssh", "random"],
)
def test_a_receiver_that_answers_in_another_protocol_is_named_as_such(
    tmp_path: Path, answer: bytes, shown: str
) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x")
    with answering_receiver(answer) as port:
        proc = send(src, port)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"trio-multifd: error: the receiver sent a control message of {shown}, so it does"
        " not speak trio-multifd's framing"
    ]


@pytest.mark.parametrize(
    ("answer", "close", "error"),
    [
        (frame(b"[1]"), False, "bad control message from the receiver: not an object with a type"),
        (
            frame(b'{"ok": true}'),
            False,
            "bad control message from the receiver: not an object with a type",
        ),
        (
            frame(b'{"type": "\xff"}'),
            False,
            "bad control message from the receiver: UnicodeDecodeError: 'utf-8' codec can't"
            " decode byte 0xff in position 10: invalid start byte",
        ),
        (
            struct.pack(">I", 100) + b'{"ty',
            True,
            "the receiver closed the control stream before its go-ahead (it failed, was"
            " stopped, or uses TLS: then give --tls-ca)",
        ),
        (struct.pack(">I", 100) + b'{"ty', False, "no go-ahead from the receiver within 1.0s"),
        (
            frame(b'{"type": "verdict", "ok": true}'),
            False,
            "the receiver answered the manifest with a 'verdict' message, not a go-ahead or"
            " a refusal",
        ),
    ],
    ids=["list", "no-type", "not-utf8", "cut-closed", "cut-open", "verdict"],
)
def test_a_malformed_go_ahead_is_one_line_naming_the_receiver(
    tmp_path: Path, answer: bytes, close: bool, error: str
) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x")
    with answering_receiver(answer, close=close) as port:
        proc = send(src, port, "--idle-timeout", "1")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"trio-multifd: error: {error}"]


async def test_a_control_stream_that_wins_as_the_wait_is_cancelled_is_closed() -> None:
    # The winner is recorded in the same tick as a cancel from outside: the wait ends in
    # Cancelled, and the winner's stream must not be left open.
    class CancelAtLastByte(trio.abc.Stream):
        def __init__(self, inner: trio.abc.Stream, scope: trio.CancelScope, left: int) -> None:
            self.inner, self.scope, self.left, self.closed = inner, scope, left, False

        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            data = bytes(await self.inner.receive_some(max_bytes))
            self.left -= len(data)
            if self.left <= 0:
                self.scope.cancel()
            return data

        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            await self.inner.send_all(data)

        async def wait_send_all_might_not_block(self) -> None:
            await self.inner.wait_send_all_might_not_block()

        async def aclose(self) -> None:
            self.closed = True
            await self.inner.aclose()

    class OneListener(trio.abc.Listener[trio.abc.Stream]):
        def __init__(self, stream: trio.abc.Stream) -> None:
            self.stream: trio.abc.Stream | None = stream

        async def accept(self) -> trio.abc.Stream:
            if self.stream is None:
                await trio.sleep_forever()
            stream, self.stream = self.stream, None
            assert stream is not None
            return stream

        async def aclose(self) -> None:
            pass

    message = control.CONTROL_MAGIC + frame(json.dumps(manifest()).encode())
    peer, ours = trio.testing.memory_stream_pair()
    await peer.send_all(message)
    with trio.fail_after(TIMEOUT):
        with trio.CancelScope() as outside:
            stream = CancelAtLastByte(ours, outside, len(message))
            await control.accept_control([OneListener(stream)], TIMEOUT)
    assert outside.cancelled_caught
    assert stream.closed


async def test_a_refusal_to_a_sender_that_stopped_reading_is_given_up_after_its_patience(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # recv's refusals and rejections are bounded so by --idle-timeout.
    ours, _theirs = trio.testing.lockstep_stream_pair()
    start = trio.current_time()
    with trio.fail_after(60):
        error = await control.refusal(ours, "no room", patience=5)
    assert trio.current_time() - start == pytest.approx(5)
    assert str(error) == "no room"


async def test_a_rejection_to_a_sender_that_is_gone_leaves_this_sides_error_standing() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.aclose()
    with trio.fail_after(TIMEOUT):
        await control.tell(ours, {"type": "verdict", "ok": False, "error": "mismatch"}, 5)


def test_a_sender_reset_by_a_receiver_busy_with_another_copy_is_told_so(tmp_path: Path) -> None:
    # A recv takes one file: a second sender waits in the listen queue and is reset when
    # the first copy ends (a stray connection during the channels' handshakes is reset
    # at once, the same way for the sender).
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(os.urandom(64 * 4096))
    second.write_bytes(b"x" * 5000)
    out = tmp_path / "out"
    out.mkdir()
    with receiving(out) as (recv, port):
        busy = subprocess.Popen(
            _command("send", str(first), f"127.0.0.1:{port}"),
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "TRIO_MULTIFD_TEST_STALL": "2"},
        )
        with killed_if_left(busy):
            assert recv.stderr is not None
            # Halfway, where the first sender pauses: its channels are all up.
            assert any("50%" in line for line in recv.stderr)
            proc = send(second, port)
            assert busy.wait(TIMEOUT) == 0
    assert proc.returncode == 1
    [line] = proc.stderr.splitlines()
    assert line.startswith(
        "trio-multifd: error: the control stream failed before the receiver's go-ahead:"
    )
    assert line.endswith(
        " (the receiver failed, was stopped or is busy with another copy; or it uses TLS:"
        " then give --tls-ca)"
    )
