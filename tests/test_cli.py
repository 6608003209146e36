"""The ``trio-multifd`` command end to end: real processes, loopback TCP, small files."""

from __future__ import annotations

import argparse
import errno
import fcntl
import io
import itertools
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trustme
import xxhash

from trio_multifd import _extents as extents, _filecopy as fc
from trio_multifd._cli import _parser, _Reporter, main, parse_hostport, parse_size
from trio_multifd._extents import data_extents, file_checksum

from .helpers import small_tmpfs

PAGE = 4096
TIMEOUT = 60


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trio_multifd", *args]


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRIO_MULTIFD_TEST_CORRUPT_CHECKSUM", None)
    env.pop("TRIO_MULTIFD_TEST_STALL", None)
    env.update(extra or {})
    return env


@contextmanager
def receiving(
    dest: Path,
    *extra: str,
    env: Mapping[str, str] | None = None,
    wrapper: Sequence[str] = (),
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A ``recv`` process on 127.0.0.1 port 0 (run by ``wrapper``, such as ``prlimit``),
    and the port it printed."""
    proc = subprocess.Popen(
        [*wrapper, *_command("recv", str(dest), "--listen", "127.0.0.1:0", *extra)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(env),
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", line)
        assert match, line
        yield proc, int(match.group(1))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)


def random_file_and_out_dir(tmp_path: Path, size: int, name: str = "a.bin") -> tuple[Path, Path]:
    """A file of ``size`` random bytes to send, and an empty directory to receive it in."""
    src = tmp_path / name
    src.write_bytes(os.urandom(size))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return src, out_dir


def send(
    path: Path, port: int, *extra: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command("send", str(path), f"127.0.0.1:{port}", *extra),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(env),
    )


def make_sparse(path: Path) -> None:
    """8 MiB + 1234 bytes, mostly hole: random regions, explicitly written zero pages
    inside an allocated extent, and a random partial last page."""
    size = 2048 * PAGE + 1234
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(3 * PAGE)
        f.write(os.urandom(10 * PAGE))
        f.write(bytes(8 * PAGE))  # zero pages, allocated
        f.write(os.urandom(PAGE + 17))
        f.seek(1000 * PAGE)
        f.write(os.urandom(40 * PAGE))
        f.seek(size - 700)
        f.write(os.urandom(700))


def test_sparse_file_copies_identically_and_stays_sparse(tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    make_sparse(src)
    dest = tmp_path / "copy.img"
    # Three channels in two sending threads and one receiving thread.
    with receiving(dest, "--json", "--io-threads", "1") as (recv, port):
        sent = send(
            src, port, "--channels", "3", "--compression", "zstd", "--io-threads", "2", "--json"
        )
        out, err = recv.communicate(timeout=TIMEOUT)
    assert sent.returncode == 0, sent.stderr
    assert recv.returncode == 0, err
    assert dest.read_bytes() == src.read_bytes()
    import json

    result = json.loads(sent.stdout)
    assert result["ok"] is True
    assert result["size"] == src.stat().st_size
    assert result["zero_pages"] >= 8
    assert json.loads(out)["ok"] is True
    # Holes were skipped and zero pages never written: the copy allocates no more than
    # the source (which holds 8 written zero pages the copy does not).
    allocated = dest.stat().st_blocks * 512
    assert allocated <= src.stat().st_blocks * 512
    assert allocated < 1024 * 1024
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


def test_a_copy_whose_data_spreads_over_the_file_allocates_only_the_data(
    tmp_path: Path,
) -> None:
    # One page in four of 64 MiB, written in ascending order: on ext4 with large folios
    # (Linux 6.16+) the receiver's write faults read ahead in ever larger folios, and
    # without MADV_RANDOM each write dirtied, and so allocated, the holes of its folio
    # too (the copy took three times the source's blocks). Other file systems and
    # kernels allocate only the data either way.
    src = tmp_path / "disk.img"
    rng = random.Random(7)
    pages = 16384
    with open(src, "wb") as f:
        f.truncate(pages * PAGE)
        for page in sorted(rng.sample(range(pages), pages // 4)):
            f.seek(page * PAGE)
            f.write(rng.randbytes(PAGE))
        f.flush()
        data = extents.page_ranges(f.fileno(), pages * PAGE)
    dest = tmp_path / "copy.img"
    with receiving(dest) as (recv, port):
        sent = send(src, port, "--channels", "2")
        _, err = recv.communicate(timeout=TIMEOUT)
    assert sent.returncode == 0, sent.stderr
    assert recv.returncode == 0, err
    # Asked before any read: a page cache page over a hole may count as data.
    with open(dest, "rb") as copy:
        assert extents.page_ranges(copy.fileno(), pages * PAGE) == data
    assert dest.read_bytes() == src.read_bytes()


def test_empty_and_tiny_files(tmp_path: Path) -> None:
    for name, content in (("empty", b""), ("tiny", b"x" * 100), ("page", os.urandom(PAGE))):
        src = tmp_path / name
        src.write_bytes(content)
        dest = tmp_path / f"{name}.copy"
        with receiving(dest, "--quiet") as (recv, port):
            sent = send(src, port, "--channels", "1", "--quiet")
            recv.communicate(timeout=TIMEOUT)
        assert sent.returncode == 0, sent.stderr
        assert sent.stderr == ""
        assert dest.read_bytes() == content


def test_a_name_of_255_bytes_is_received_under_that_name(tmp_path: Path) -> None:
    name = "é" * 100 + "n" * 55  # 255 bytes in UTF-8, multi-byte characters at the cut
    src, out_dir = random_file_and_out_dir(tmp_path, 3 * PAGE + 5, name)
    with receiving(out_dir) as (recv, port):
        sender = send(src, port)
        recv.communicate(timeout=TIMEOUT)
    assert sender.returncode == 0, sender.stderr
    assert recv.returncode == 0
    assert [p.name for p in out_dir.iterdir()] == [name]
    assert (out_dir / name).read_bytes() == src.read_bytes()


def test_into_directory_with_tls(tmp_path: Path) -> None:
    receiver_tls, sender_tls = tls_files(tmp_path)
    src, out_dir = random_file_and_out_dir(tmp_path, 300 * PAGE + 5, "data.bin")
    with receiving(out_dir, *receiver_tls) as (recv, port):
        sent = send(src, port, "--channels", "2", *sender_tls)
        recv.communicate(timeout=TIMEOUT)
    assert sent.returncode == 0, sent.stderr
    assert recv.returncode == 0
    assert (out_dir / "data.bin").read_bytes() == src.read_bytes()


def tls_files(tmp_path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The receiver's and the sender's TLS options, from a fresh CA."""
    ca = trustme.CA()
    ca_file, cert_file = tmp_path / "ca.pem", tmp_path / "server.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    return ("--tls-cert", str(cert_file), "--tls-key", str(cert_file)), ("--tls-ca", str(ca_file))


def test_a_plain_sender_and_a_tls_receiver_each_hint_at_tls(tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(PAGE))
    receiver_tls, _ = tls_files(tmp_path)
    with receiving(tmp_path / "out.bin", *receiver_tls) as (recv, port):
        sender = send(src, port)
        _, err = recv.communicate(timeout=TIMEOUT)
    assert sender.returncode == 1 and recv.returncode == 1
    assert re.match(
        r"trio-multifd: error: control stream from 127\.0\.0\.1:\d+ failed: \[SSL",
        err.splitlines()[-1],
    )
    assert err.splitlines()[-1].endswith("(does the sender use TLS, with --tls-ca?)")
    # The receiver's close comes as an end of stream or, with the manifest unread, a reset.
    assert sender.stderr.splitlines()[-1].endswith(" uses TLS: then give --tls-ca)")


@pytest.mark.parametrize("quiet", [[], ["--quiet"], ["--json"]], ids=["", "quiet", "json"])
def test_a_sender_that_does_not_trust_the_receivers_certificate_is_noted_and_recv_waits_on(
    tmp_path: Path, quiet: list[str]
) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(PAGE + 5))
    receiver_tls, sender_tls = tls_files(tmp_path)
    wrong_ca = tmp_path / "wrong-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(wrong_ca))
    with receiving(tmp_path / "out.bin", *receiver_tls, *quiet) as (recv, port):
        for _ in range(3):  # a line for the first only: a flood cannot fill stderr
            refused = send(src, port, "--tls-ca", str(wrong_ca))
            assert refused.returncode == 1
            assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr
        sent = send(src, port, *sender_tls)
        out, err = recv.communicate(timeout=TIMEOUT)
    assert sent.returncode == 0, sent.stderr
    assert recv.returncode == 0, err
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
    [noted] = [line for line in err.splitlines() if "TLS handshake" in line]
    assert re.fullmatch(
        r"trio-multifd: warning: a connection from 127\.0\.0\.1:\d+ closed during the TLS"
        r" handshake \(a sender that does not trust this certificate\?\)",
        noted,
    ), noted
    if quiet == ["--json"]:
        assert json.loads(out)["ok"] is True


def test_a_tls_sender_and_a_plain_receiver_each_hint_at_tls(tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(PAGE))
    _, sender_tls = tls_files(tmp_path)
    with receiving(tmp_path / "out.bin") as (recv, port):
        sender = send(src, port, *sender_tls)
        _, err = recv.communicate(timeout=TIMEOUT)
    assert sender.returncode == 1 and recv.returncode == 1
    assert err.splitlines()[-1].endswith(
        ": a TLS handshake; give the receiver --tls-cert and --tls-key)"
    )
    assert sender.stderr.splitlines()[-1].startswith(
        f"trio-multifd: error: TLS handshake with 127.0.0.1:{port} failed: "
    )
    assert sender.stderr.splitlines()[-1].endswith(
        "(does the receiver use TLS, with --tls-cert and --tls-key?)"
    )


def test_wrong_checksum_is_rejected_and_nothing_is_kept(tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(64 * PAGE))
    dest = tmp_path / "b.bin"
    with receiving(dest) as (recv, port):
        sent = send(src, port, env={"TRIO_MULTIFD_TEST_CORRUPT_CHECKSUM": "1"})
        _, err = recv.communicate(timeout=TIMEOUT)
    assert sent.returncode == 1
    assert "checksum mismatch" in sent.stderr
    assert recv.returncode == 1
    assert "checksum mismatch" in err
    assert sorted(os.listdir(tmp_path)) == ["a.bin"]


def test_existing_destination_is_refused_without_force(tmp_path: Path) -> None:
    src, out_dir = random_file_and_out_dir(tmp_path, 8 * PAGE)
    (out_dir / "a.bin").write_bytes(b"keep me")
    with receiving(out_dir) as (recv, port):
        sent = send(src, port, "--json")
        recv.communicate(timeout=TIMEOUT)
    assert sent.returncode == 1
    assert recv.returncode == 1
    import json

    result = json.loads(sent.stdout)
    assert result["ok"] is False
    assert "exists" in result["error"]
    assert (out_dir / "a.bin").read_bytes() == b"keep me"
    with receiving(out_dir, "--force") as (recv, port):
        sent = send(src, port)
        recv.communicate(timeout=TIMEOUT)
    assert sent.returncode == 0, sent.stderr
    assert (out_dir / "a.bin").read_bytes() == src.read_bytes()


@pytest.mark.parametrize(("source_mode", "copy_mode"), [(0o600, 0o600), (0o4751, 0o751)])
def test_the_copy_takes_the_permission_bits_of_its_source_not_setuid(
    tmp_path: Path, source_mode: int, copy_mode: int
) -> None:
    src, out_dir = random_file_and_out_dir(tmp_path, 8 * PAGE)
    os.chmod(src, source_mode)
    with receiving(out_dir) as (recv, port):
        sent = send(src, port)
        recv.communicate(timeout=TIMEOUT)
    assert sent.returncode == 0, sent.stderr
    copy = out_dir / "a.bin"
    assert copy.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(copy.stat().st_mode) == copy_mode


def test_a_sender_asking_for_more_channels_than_max_channels_is_refused(
    tmp_path: Path,
) -> None:
    # Each zstd channel may make the receiver hold a 32 MiB window: the receiver, not
    # the sender, bounds how many there are.
    src, out_dir = random_file_and_out_dir(tmp_path, 8 * PAGE)
    with receiving(out_dir, "--max-channels", "2") as (recv, port):
        sent = send(src, port, "--channels", "3")
        _, recv_err = recv.communicate(timeout=TIMEOUT)
    assert sent.returncode == 1
    assert recv.returncode == 1
    assert "asks for 3 channels, more than this receiver's --max-channels 2" in sent.stderr
    assert "--max-channels 2" in recv_err
    assert list(out_dir.iterdir()) == []
    with receiving(out_dir, "--max-channels", "3") as (recv, port):
        sent = send(src, port, "--channels", "3")
        recv.communicate(timeout=TIMEOUT)
    assert sent.returncode == 0, sent.stderr
    assert (out_dir / "a.bin").read_bytes() == src.read_bytes()


@contextmanager
def stalled_sender(
    src: Path, port: int, out_dir: Path, *extra: str, stall: float = 3600
) -> Iterator[subprocess.Popen[str]]:
    """A ``send`` that pauses halfway (after a SYNC: half the pages are in place, its file
    mapped) for ``stall`` seconds, by default far longer than TIMEOUT (a test then ends
    in time only if the sender stops for another reason), yielded once the receiver has
    made its temporary file."""
    sender = subprocess.Popen(
        _command("send", str(src), f"127.0.0.1:{port}", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env({"TRIO_MULTIFD_TEST_STALL": str(stall)}),
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not any(p.endswith(".part") for p in os.listdir(out_dir)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield sender
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.communicate()


def test_receiver_killed_mid_transfer(tmp_path: Path) -> None:
    src, out_dir = random_file_and_out_dir(tmp_path, 1024 * PAGE)
    with (
        receiving(out_dir / "a.bin") as (recv, port),
        stalled_sender(src, port, out_dir) as sender,
    ):
        time.sleep(0.5)
        recv.send_signal(signal.SIGKILL)
        recv.wait(timeout=TIMEOUT)
        _, err = sender.communicate(timeout=TIMEOUT)
    assert sender.returncode == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("trio-multifd: error: the receiver went away"), err
    assert "Traceback" not in err
    assert not (out_dir / "a.bin").exists()


@pytest.mark.parametrize(
    ("signum", "line"),
    [
        (
            signal.SIGTERM,
            "the sender stopped mid-transfer: it was cancelled (Ctrl-C, SIGTERM or its"
            " application)",
        ),
        (
            signal.SIGINT,
            "the sender stopped mid-transfer: it was cancelled (Ctrl-C, SIGTERM or its"
            " application)",
        ),
        # Its channels end cleanly after the stall's SYNC, as a finished sender's do.
        (signal.SIGKILL, "the sender went away (its control stream closed mid-transfer)"),
    ],
    ids=["sigterm", "sigint", "sigkill"],
)
def test_a_sender_stopped_mid_transfer_is_named_so_by_the_receiver(
    tmp_path: Path, signum: signal.Signals, line: str
) -> None:
    src, out_dir = random_file_and_out_dir(tmp_path, 1024 * PAGE)
    with (
        receiving(out_dir / "a.bin") as (recv, port),
        stalled_sender(src, port, out_dir) as sender,
    ):
        half_received(recv)
        sender.send_signal(signum)
        sender.communicate(timeout=TIMEOUT)
        _, err = recv.communicate(timeout=TIMEOUT)
    assert recv.returncode == 1
    assert err.strip().splitlines()[-1] == f"trio-multifd: error: {line}"
    assert list(out_dir.iterdir()) == []


def can_lease(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_a_source_truncated_while_it_is_sent_stops_the_copy_with_a_clear_error(
    tmp_path: Path,
) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(1024 * PAGE))
    if not can_lease(src):
        pytest.skip("this file system has no file leases")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with receiving(out_dir) as (recv, port), stalled_sender(src, port, out_dir) as sender:
        os.truncate(src, PAGE)  # waits for the sender to give its lease up
        _, err = sender.communicate(timeout=TIMEOUT)
        _, recv_err = recv.communicate(timeout=TIMEOUT)
    assert sender.returncode == 1, err  # not killed by SIGBUS
    reason = (
        f"{src} was opened for writing or truncated by another process while it was being"
        " sent: the copy stopped (its content would no longer match the checksum)"
    )
    assert err.splitlines()[-1] == f"trio-multifd: error: {reason}"
    assert recv.returncode == 1, recv_err
    # Told by the sender's abort message.
    assert recv_err.splitlines()[-1] == (
        f"trio-multifd: error: the sender stopped mid-transfer: {reason}"
    )
    assert list(out_dir.iterdir()) == []
    assert src.stat().st_size == PAGE


def half_received(recv: subprocess.Popen[str], reported: str = "50%") -> None:
    """Return once ``recv`` reports half the pages in place (``reported``, the tenth that
    half of them reach): a stalled sender has then begun its pause, and sends no page
    before it ends."""
    assert recv.stderr is not None
    for line in recv.stderr:
        if line.startswith(f"receiving: {reported}"):
            return
    raise AssertionError("the receiver ended before half the pages arrived")


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_destination_filled_during_the_copy_is_a_clear_error_not_a_crash(
    tmp_path: Path, compression: str
) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(192 * PAGE))  # 768 KiB: passes the free-space check
    with small_tmpfs(tmp_path) as small:
        with (
            receiving(small) as (recv, port),
            stalled_sender(src, port, small, "--compression", compression, stall=3) as sender,
        ):
            half_received(recv)
            with pytest.raises(OSError, match="No space left") as filled:  # another writer
                (small / "filler").write_bytes(bytes(1 << 20))
            assert filled.value.errno == errno.ENOSPC
            _, err = recv.communicate(timeout=TIMEOUT)
            sender.communicate(timeout=TIMEOUT)
        # Exit status 1, not -SIGBUS: the decoder (zstd) or the socket (none) would
        # have written to pages the file system has no room for.
        assert recv.returncode == 1, err
        assert re.fullmatch(
            r"trio-multifd: error: transfer failed: channel \d, packet \d+: block 'data':"
            r" cannot write pages 0x[0-9a-f]+\.\.0x[0-9a-f]+ of its mapped file: its file"
            r" system is full or the file was truncated",
            err.splitlines()[-1],
        ), err
        assert sender.returncode == 1
        assert [p.name for p in small.iterdir()] == ["filler"]


def test_a_destination_filled_before_the_last_partial_page_is_an_error_both_ends_name(
    tmp_path: Path,
) -> None:
    src = tmp_path / "a.bin"
    # Zero pages, which the receiver never writes, then a partial page, which it writes
    # with pwrite once the pages are in: only that needs room.
    src.write_bytes(bytes(64 * PAGE) + b"tail" * 25)
    with small_tmpfs(tmp_path) as small:
        with (
            receiving(small) as (recv, port),
            stalled_sender(src, port, small, stall=3) as sender,
        ):
            half_received(recv, "40%")  # 32 of the 65 pages: the tail page comes last
            with pytest.raises(OSError, match="No space left"):  # another writer
                (small / "filler").write_bytes(bytes(2 << 20))
            _, recv_err = recv.communicate(timeout=TIMEOUT)
            _, send_err = sender.communicate(timeout=TIMEOUT)
        error = "cannot write the copy's last partial page: No space left on device"
        assert recv.returncode == 1
        assert recv_err.splitlines()[-1] == f"trio-multifd: error: {error}"
        assert sender.returncode == 1
        assert send_err.splitlines()[-1] == (
            f"trio-multifd: error: the receiver rejected the copy: {error}"
        )
        assert [p.name for p in small.iterdir()] == ["filler"]


def test_a_source_truncated_without_a_lease_is_a_clear_error_not_a_crash(
    tmp_path: Path,
) -> None:
    src, out_dir = random_file_and_out_dir(tmp_path, 1024 * PAGE)
    # Open for writing here: the sender can take no lease and runs unprotected.
    with open(src, "r+b") as writer:
        with (
            receiving(out_dir) as (recv, port),
            stalled_sender(src, port, out_dir, stall=3) as sender,
        ):
            half_received(recv)
            writer.truncate(PAGE)
            _, err = sender.communicate(timeout=TIMEOUT)
            recv.communicate(timeout=TIMEOUT)
    assert sender.returncode == 1, err  # not -SIGBUS
    assert re.fullmatch(
        r"trio-multifd: error: transfer failed: channel \d: block 'data': cannot read"
        r" pages 0x[0-9a-f]+\.\.0x[0-9a-f]+ of its mapped file: the file was truncated, or"
        r" its file system is full \(tmpfs gives a hole a page when it is read\)",
        err.splitlines()[-1],
    ), err
    assert recv.returncode == 1
    assert list(out_dir.iterdir()) == []


def test_a_destination_without_room_for_the_data_is_refused_before_any_page(
    tmp_path: Path,
) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(4 << 20))
    with small_tmpfs(tmp_path) as small:
        with receiving(small) as (recv, port):
            sender = send(src, port)
            _, err = recv.communicate(timeout=TIMEOUT)
        needs = f"its data needs {4 << 20} bytes, the file system has"
        assert recv.returncode == 1
        assert needs in err.splitlines()[-1]
        assert sender.returncode == 1
        assert "the receiver refused: not enough space" in sender.stderr
        assert list(small.iterdir()) == []


def test_written_zero_pages_need_no_room_at_the_destination(tmp_path: Path) -> None:
    src = tmp_path / "thick.img"  # 4 MiB allocated, all but one page zeros
    src.write_bytes(bytes(2 << 20) + os.urandom(PAGE) + bytes((2 << 20) - PAGE))
    with small_tmpfs(tmp_path) as small:
        with receiving(small) as (recv, port):
            sender = send(src, port)
            recv.communicate(timeout=TIMEOUT)
        assert sender.returncode == 0, sender.stderr
        assert recv.returncode == 0
        assert (small / "thick.img").read_bytes() == src.read_bytes()


def test_the_scan_counts_each_page_that_is_not_all_zero_once(tmp_path: Path) -> None:
    path = tmp_path / "s"
    make_sparse(path)
    content = path.read_bytes()
    expected = sum(1 for p in range(0, len(content), PAGE) if any(content[p : p + PAGE]))
    fd = os.open(path, os.O_RDONLY)
    try:
        checksum, pages = extents.scan(fd, len(content), lambda: None, count_pages=True)
    finally:
        os.close(fd)
    assert checksum == xxhash.xxh3_128(content).hexdigest()
    assert pages == expected == 10 + 2 + 40 + 1  # random, the 17 bytes' page, tail


def test_a_page_split_between_two_reads_is_counted_once() -> None:
    data = bytearray(3 * PAGE)
    # Read at offset 100: data[i] is the file's byte 100 + i.
    data[PAGE - 100] = 1  # the file's page 1
    data[2 * PAGE - 100 + 50] = 1  # its page 2
    counted, last = extents.nonzero_pages(data, PAGE, 100, -1)  # pages 0 (zero) and 1
    assert (counted, last) == (1, 1)
    counted, last = extents.nonzero_pages(data, 2 * PAGE, 100, 1)  # page 1 again, and 2
    assert (counted, last) == (1, 2)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["send"],
        ["send", "x"],
        ["send", "x", "localhost"],
        ["send", "x", "localhost:http"],
        ["send", "x", "localhost:1", "--channels", "0"],
        ["send", "x", "localhost:1", "--compression", "lz4"],
        ["send", "x", "localhost:1", "--level", "3"],
        ["send", "x", "localhost:1", "--compression", "zstd", "--level", "99"],
        ["send", "x", "localhost:1", "--io-threads", "0"],
        ["recv", "x", "--listen", "127.0.0.1:0", "--io-threads", "256"],
        ["recv", "x"],
        ["recv", "", "--listen", "127.0.0.1:0"],
        ["send", "", "127.0.0.1:1"],
        ["recv", "x", "--listen", "127.0.0.1:99999"],
        ["recv", "x", "--listen", "127.0.0.1:0", "--tls-cert", "c.pem"],
        ["bench", "--size", "1000"],
        ["bench", "--size", "lots"],
        ["bench", "--channels", "0"],
        ["bench", "--compression", "lz4"],
        ["bench", "--data", "ones"],
        ["bench", "--repeat", "0"],
        ["bench", "--io-threads", "0"],
        ["demo", "--size", "4097"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["send", "x", "localhost:1", "--json", "--channels", "0"],
            "argument --channels: channels must be 1..255, got 0",
        ),
        (["send", "x", "--js"], "the following arguments are required: HOST:PORT"),
        (["recv", "x", "--json"], "the following arguments are required: --listen"),
        (
            ["--debug", "recv", "x", "--listen", "127.0.0.1:0", "--json", "--tls-cert", "c"],
            "--tls-cert and --tls-key go together",
        ),
        (["send", "x", "localhost:1", "--json", "--nope"], "unrecognized arguments: --nope"),
    ],
)
def test_a_usage_error_with_json_prints_one_object_too(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert json.loads(out) == {"ok": False, "command": argv[argv.index("x") - 1], "error": error}
    assert err.splitlines()[-1].endswith(f": error: {error}")


@pytest.mark.parametrize(
    "argv",
    [
        ["send", "x", "localhost:1", "--channels", "0"],
        ["send", "x", "localhost:1", "--", "--json"],
        ["bench", "--json", "b.json", "--size", "1000"],
        ["nope", "--json"],
    ],
)
def test_a_usage_error_without_send_or_recvs_json_prints_nothing_on_stdout(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("command", ["bench", "demo"])
def test_a_size_beyond_the_machines_memory_is_a_usage_error_before_any_run(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # 1 EiB: no process started (a worker would fail to map it, or be killed filling it).
    assert main([command, "--size", "1048576T"]) == 2
    err = capsys.readouterr().err
    assert f"error: --size {1 << 60}: a run holds the data twice" in err


@pytest.mark.parametrize("where", ["missing/bench.json", "."])
def test_bench_json_path_that_cannot_be_written_is_a_usage_error_before_any_run(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = ["--size", "64K", "--repeat", "1", "--channels", "1", "--compression", "none"]
    tiny += ["--data", "zero-all", "--no-baselines"]
    assert main(["bench", "--json", str(tmp_path / where), *tiny]) == 2
    err = capsys.readouterr().err
    assert "--json: cannot write" in err
    assert "repeat 1" not in err  # no run started


def test_runtime_error_is_one_line_exit_1(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    proc = subprocess.run(
        _command("send", str(missing), "127.0.0.1:9"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"trio-multifd: error: cannot open {missing}: No such file or directory"
    ]


@pytest.mark.parametrize("command", ["send", "recv"])
def test_a_missing_tls_file_is_named_once_in_one_line(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "missing.pem"
    source = tmp_path / "a.bin"
    source.write_bytes(bytes(PAGE))
    if command == "send":
        argv = ["send", str(source), "127.0.0.1:9", "--tls-ca", str(missing)]
    else:
        # One PEM file for both the chain and the key: named once.
        argv = ["recv", str(tmp_path), "--listen", "127.0.0.1:0"]
        argv += ["--tls-cert", str(missing), "--tls-key", str(missing)]
    proc = subprocess.run(_command(*argv), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"trio-multifd: error: cannot load TLS file {missing}: No such file or directory"
    ]


def test_an_error_naming_a_path_with_a_newline_is_one_line_the_json_keeps_the_name(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "two\nlines"
    proc = subprocess.run(
        _command("send", str(missing), "127.0.0.1:9", "--json"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert failed_json(proc) == f"cannot open {missing}: No such file or directory"
    assert proc.stderr.splitlines() == [
        f"trio-multifd: error: cannot open {tmp_path}/two\\nlines: No such file or directory"
    ]


def test_the_report_of_a_copy_to_a_path_with_a_newline_is_one_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 5000)
    dest = tmp_path / "two\nlines"
    with receiving(dest) as (recv, port):
        assert send(src, port, "-q").returncode == 0
        _out, err = recv.communicate(timeout=TIMEOUT)
    assert dest.read_bytes() == src.read_bytes()
    report = err.splitlines()[-1]
    assert report.startswith(f"received {tmp_path}/two\\nlines: 5000 bytes "), err


def test_progress_off_a_terminal_prints_one_line_for_each_jump_at_the_tenth_reached() -> None:
    err = io.StringIO()
    reporter = _Reporter("sending", quiet=False, err=err)
    for done in (0, 350, 390, 1000, 1000):
        reporter(done, 1000)
    assert [line.split(" (")[0] for line in err.getvalue().splitlines()] == [
        "sending: 30%",
        "sending: 100%",
    ]


def test_json_with_debug_prints_the_object_and_the_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    proc = subprocess.run(
        _command("send", str(missing), "127.0.0.1:9", "--json", "--debug"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert failed_json(proc) == f"cannot open {missing}: No such file or directory"
    assert "Traceback (most recent call last):" in proc.stderr


def test_connection_refused_json(tmp_path: Path) -> None:
    src = tmp_path / "a"
    src.write_bytes(b"a")
    with receiving(tmp_path / "b") as (_recv, port):
        pass  # killed: the port is free again
    error = failed_json(send(src, port, "--json"))
    assert error.startswith(f"could not connect to 127.0.0.1:{port}: ")
    assert error.endswith("Connection refused")  # the reason, not "1 sub-exception"


@pytest.mark.parametrize("source", ["a directory", "a fifo", "/dev/zero"])
def test_only_a_regular_file_is_sent(tmp_path: Path, source: str) -> None:
    path = {"a directory": str(tmp_path), "a fifo": str(tmp_path / "fifo")}.get(source, source)
    if source == "a fifo":
        os.mkfifo(path)  # with no writer: opening it must not wait for one
    proc = subprocess.run(
        _command("send", path, "127.0.0.1:9"), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"trio-multifd: error: {path} is not a regular file"]


def test_a_fifo_is_refused_without_being_opened(tmp_path: Path) -> None:
    # Opening it would let a writer waiting for a reader through, to a closed pipe.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer_through = threading.Event()

    def writer() -> None:
        with open(fifo, "wb"):  # waits for a reader
            writer_through.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        proc = subprocess.run(
            _command("send", str(fifo), "127.0.0.1:9"),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert proc.stderr.splitlines() == [f"trio-multifd: error: {fifo} is not a regular file"]
        assert not writer_through.wait(0.5)
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # lets the writer go
        thread.join(TIMEOUT)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")
def test_a_source_the_sender_cannot_map_is_an_error_naming_it(tmp_path: Path) -> None:
    src, out_dir = tmp_path / "big.img", tmp_path / "out"
    out_dir.mkdir()
    with open(src, "wb") as file:
        file.truncate(4 << 30)  # a hole: only the mapping needs the address space
        file.write(b"data")
    with receiving(out_dir) as (recv, port):
        sent = subprocess.run(
            ["prlimit", f"--as={2 << 30}", *_command("send", str(src), f"127.0.0.1:{port}")],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=_env(),
        )
        recv.communicate(timeout=TIMEOUT)
    assert sent.returncode == 1
    assert sent.stderr.splitlines() == [
        f"trio-multifd: error: cannot map {src}: Cannot allocate memory"
    ]
    assert list(out_dir.iterdir()) == []


def test_a_file_holding_more_than_its_size_is_refused(tmp_path: Path) -> None:
    # /proc's files have size 0: the copy would be empty and pass its checksum.
    proc = subprocess.run(
        _command("send", "/proc/version", "127.0.0.1:9"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "trio-multifd: error: /proc/version holds more than its size of 0 bytes (a file of"
        " /proc, or one that grows): it cannot be sent"
    ]


SYSFS_FILE = Path("/sys/devices/system/cpu/online")


@pytest.mark.skipif(not SYSFS_FILE.exists(), reason="no sysfs here")
def test_a_file_holding_less_than_its_size_is_refused_by_name() -> None:
    # sysfs's files have size 4096 whatever they hold: the read ends early.
    proc = subprocess.run(
        _command("send", str(SYSFS_FILE), "127.0.0.1:9"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 1
    [line] = proc.stderr.splitlines()
    assert line.startswith(
        f"trio-multifd: error: {SYSFS_FILE} holds less than its size of 4096 bytes: it ended"
        " at byte "
    )


def failed_json(proc: subprocess.CompletedProcess[str]) -> str:
    """The error of a command that failed with ``--json``: exit 1, one object."""
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["ok"] is False
    assert isinstance(result["error"], str)
    return result["error"]


def test_parsers() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("64K") == 64 * 1024
    assert parse_size("8MiB") == 8 << 20
    assert parse_size("1GiB") == parse_size("1g") == 1 << 30
    assert parse_hostport("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_hostport("[::1]:80") == ("::1", 80)


@pytest.mark.parametrize(
    "text", ["[]:0", ":80", "host", "host:", "host:65536", "host:\u0668\u0660"]
)
def test_a_bad_host_and_port_is_a_usage_error(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected HOST:PORT"):
        parse_hostport(text)


@pytest.mark.parametrize(
    "command", [["demo"], ["bench"], ["send", "x", "h:1"], ["recv", "x", "--listen", "h:1"]]
)
def test_debug_goes_before_or_after_the_command(command: list[str]) -> None:
    parser = _parser()
    assert parser.parse_args(["--debug", *command]).debug
    assert parser.parse_args([*command, "--debug"]).debug
    assert not parser.parse_args(command).debug


@pytest.mark.parametrize(
    "argv", [["demo", "--bogus"], ["send", "x", "h:1", "extra"], ["bench", "--repeat", "0"]]
)
def test_a_usage_error_past_the_command_shows_its_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"usage: trio-multifd {argv[0]} ")


def test_extents_and_checksum(tmp_path: Path) -> None:
    path = tmp_path / "s"
    make_sparse(path)
    dense = tmp_path / "d"
    dense.write_bytes(path.read_bytes())
    size = path.stat().st_size
    fds = [os.open(p, os.O_RDONLY) for p in (path, dense)]
    try:
        extents = list(data_extents(fds[0], size))
        assert extents[0][0] == 0 or extents[0][0] <= 3 * PAGE
        assert sum(e - s for s, e in extents) < size // 2
        expected = xxhash.xxh3_128(path.read_bytes()).hexdigest()
        assert file_checksum(fds[0], size) == file_checksum(fds[1], size) == expected
    finally:
        for fd in fds:
            os.close(fd)


def test_a_file_system_whose_seek_data_does_not_move_is_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lseek = os.lseek

    def noop_llseek(fd: int, pos: int, how: int) -> int:
        # As Linux's noop_llseek: the file position (0), whatever the offset and whence.
        return 0 if how in (os.SEEK_DATA, os.SEEK_HOLE) else lseek(fd, pos, how)

    monkeypatch.setattr(os, "lseek", noop_llseek)
    path = tmp_path / "f"
    path.write_bytes(b"x" * (3 * PAGE))
    with path.open("rb") as file:
        found = list(itertools.islice(data_extents(file.fileno(), 3 * PAGE), 3))
    assert found == [(0, 3 * PAGE)]


def test_the_checksum_calls_its_hook_before_every_chunk_even_in_holes(tmp_path: Path) -> None:
    path = tmp_path / "hole"
    with path.open("wb") as f:
        f.truncate(1 << 40)  # hashing 1 TiB of zeros would take about a minute
    calls = 0

    def stop_at_the_third_chunk() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt

    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(KeyboardInterrupt):
            file_checksum(fd, 1 << 40, stop_at_the_third_chunk)
    finally:
        os.close(fd)
    assert calls == 3


async def test_a_cancel_stops_the_senders_checksum_of_a_large_file(tmp_path: Path) -> None:
    path = tmp_path / "hole"
    with path.open("wb") as f:
        f.truncate(1 << 40)
    # The outer deadline only guards against a hang: the checksum alone would take
    # about a minute, and the cancel comes long before the sender connects anywhere.
    with trio.fail_after(TIMEOUT / 2):
        with trio.move_on_after(0.2) as waiting:
            await fc.send_file(str(path), "127.0.0.1", 9)
    assert waiting.cancelled_caught
