"""``trio-multifd bench`` and ``demo``: correctness of what they report, never timing."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import pytest

from trio_multifd import _benchrun
from trio_multifd._bench import Case, CaseResult, format_table, make_cases
from trio_multifd._benchdata import DATA_KINDS, fill_data, text_pool
from trio_multifd._benchrun import RunResult, _slices, _spawn, check_run, failed_run, run_once
from trio_multifd._cli import main

PAGE = 4096
TIMEOUT = 120

FIELDS = {
    "impl": str,
    "channels": int,
    "compression": str,
    "data": str,
    "bytes": int,
    "gbps": list,
    "gbps_median": float,
    "verified": bool,
    "sender_cpu_s_per_gb": float,
    "receiver_cpu_s_per_gb": float,
    "sender_peak_rss_mib": float,
    "receiver_peak_rss_mib": float,
}


def test_bench_json_has_every_field_and_verifies(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trio_multifd",
            "bench",
            "--size",
            "8MiB",
            "--repeat",
            "1",
            "--channels",
            "1,2",
            "--compression",
            "none,zstd",
            "--data",
            "random",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    cases = json.loads(out.read_text())
    impls = sorted((c["impl"], c["channels"], c["compression"]) for c in cases)
    assert impls == [
        ("naive_trio", 1, "none"),
        ("raw_socket", 1, "none"),
        ("raw_socket_threads", 2, "none"),
        ("trio_multifd", 1, "none"),
        ("trio_multifd", 1, "zstd"),
        ("trio_multifd", 2, "none"),
        ("trio_multifd", 2, "zstd"),
    ]
    for case in cases:
        for field, kind in FIELDS.items():
            assert isinstance(case[field], kind), (field, case)
        assert case["verified"] is True
        assert "error" not in case
        assert case["bytes"] == 8 << 20
        assert case["data"] == "random"
        assert len(case["gbps"]) == 1
        assert case["gbps_median"] > 0
        assert case["sender_peak_rss_mib"] > 8
        if case["impl"] == "trio_multifd":
            assert case["raw_impl"] == (
                "raw_socket" if case["channels"] == 1 else "raw_socket_threads"
            )
            assert isinstance(case["ratio_to_raw"], float)
            assert case["ratio_to_raw"] > 0
            assert case["io_threads"] is None
        else:
            assert "ratio_to_raw" not in case
    # The table on stdout, progress on stderr.
    assert "trio_multifd" in proc.stdout
    assert "/qemu" not in proc.stdout  # QEMU's column only when --qemu ran it
    assert "[7/7]" in proc.stderr


def test_bench_known_zero_target_verifies_without_touching_zero_pages(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--size", "8MiB", "--repeat", "1", "--channels", "2", "--compression", "none"]
    args += ["--data", "zero-all", "--known-zero", "--no-baselines", "--json", str(out)]
    args += ["--io-threads", "2"]  # a thread per channel on each end
    proc = subprocess.run(
        [sys.executable, "-m", "trio_multifd", "bench", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    (case,) = json.loads(out.read_text())
    assert case["verified"] is True
    assert case["io_threads"] == 2
    # The 8 MiB target was never written: unlike the sender's 8 MiB of (written) source,
    # it does not count in the receiver's peak RSS.
    assert case["receiver_peak_rss_mib"] < case["sender_peak_rss_mib"] - 4
    assert case["receiver_rss_beyond_target_mib"] == case["receiver_peak_rss_mib"]


def test_demo_small(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "trio_multifd", "demo", "--size", "8MiB", "--channels", "2"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    for word in (
        "GB/s",
        "verified",
        "wire bytes",
        "compression ratio",
        "zero pages",
        "raw socket",
    ):
        assert word in proc.stdout
    # A quarter of the pages are zero pages.
    assert "512 of 2048 pages" in proc.stdout


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_data_kinds(kind: str) -> None:
    pages = 64
    buffer = bytearray(b"\x01" * pages * PAGE)
    fill_data(kind, memoryview(buffer))
    page_list = [bytes(buffer[i * PAGE : (i + 1) * PAGE]) for i in range(pages)]
    zero = [p == bytes(PAGE) for p in page_list]
    if kind == "random":
        assert not any(zero)
    elif kind == "zero-all":
        assert all(zero)
    elif kind == "zero":
        assert zero == [i % 16 != 0 for i in range(pages)]
    elif kind == "mixed":
        assert zero == [i % 4 == 0 for i in range(pages)]
    else:
        assert not any(zero)
        # 3 KiB of text per page.
        assert all(p[1024:].isascii() for p in page_list)


def test_slices_cover_everything() -> None:
    for size, parts in ((8 << 20, 4), (5 * PAGE, 4), (PAGE, 1), (3 * PAGE, 2)):
        ranges = _slices(size, parts)
        assert ranges[0][0] == 0
        assert ranges[-1][1] == size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        assert all(s % PAGE == 0 for s, _ in ranges)


def test_slices_are_as_many_as_the_channels_and_even_to_a_page() -> None:
    # raw_socket_threads opens one connection per slice: its case says how many.
    for size, parts in ((16 << 20, 255), (5 * PAGE, 4), (8 << 20, 3)):
        lengths = [end - start for start, end in _slices(size, parts)]
        assert len(lengths) == parts
        assert max(lengths) - min(lengths) <= PAGE


def test_case_order_puts_baselines_next_to_their_runs() -> None:
    cases = make_cases(
        channels=[1, 4], compressions=["none", "zstd"], data=["random"], baselines=True
    )
    names = [(c.impl, c.channels, c.compression) for c in cases]
    assert names == [
        ("naive_trio", 1, "none"),
        ("raw_socket", 1, "none"),
        ("trio_multifd", 1, "none"),
        ("trio_multifd", 1, "zstd"),
        ("raw_socket_threads", 4, "none"),
        ("trio_multifd", 4, "none"),
        ("trio_multifd", 4, "zstd"),
    ]
    assert all(
        c.impl == "trio_multifd"
        for c in make_cases(channels=[1], compressions=["none"], data=["zero"], baselines=False)
    )


def test_text_pool_is_text() -> None:
    pool = text_pool(10000)
    assert len(pool) == 10000
    assert pool.isascii()


def test_a_run_counts_only_with_equal_hashes_and_every_byte_of_pages_placed() -> None:
    assert check_run({"hash": "a"}, {"hash": "a", "placed": 8192}, 8192) is None
    assert check_run({"hash": "a"}, {"hash": "b", "placed": 8192}, 8192) == (
        "target differs from source (hash mismatch)"
    )
    # A known-zero target and zero data hash alike though no page moved.
    assert check_run({"hash": "a"}, {"hash": "a", "placed": 0}, 8192) == (
        "the receiver placed 0 of 8192 bytes of pages"
    )


def test_a_failed_run_has_no_speed_in_the_json_or_the_table() -> None:
    good = RunResult(
        seconds=0.5,
        size=10**9,
        sender_cpu_s=0.3,
        receiver_cpu_s=0.3,
        sender_rss_mib=1000.0,
        receiver_rss_mib=1000.0,
        verified=True,
    )
    wrong = attrs.evolve(good, seconds=0.1, verified=False, error="hash mismatch")
    result = CaseResult(Case("raw_socket", 1, "none", "random"), size=10**9)
    result.runs += [good, wrong, failed_run(10**9, "timed out")]
    obj = result.to_json()
    assert obj["gbps"] == [2.0, None, None]
    assert obj["gbps_median"] == 2.0
    assert obj["verified"] is False and obj["error"] == "hash mismatch"
    row = format_table([result]).splitlines()[2]
    assert "2.00-2.00" in row and row.endswith(" NO")


def test_a_raw_socket_threads_connection_that_breaks_off_fails_the_receiver() -> None:
    # Known-zero target and zero data: the bytes it lacks would hash like the source's,
    # so only the receiver's exit status can tell.
    size = 1 << 20
    spec = {
        "impl": "raw_socket_threads",
        "channels": 2,
        "compression": "none",
        "data": "zero-all",
        "size": size,
        "known_zero": True,
    }
    recv = _spawn("recv", spec)
    try:
        assert recv.stdout is not None
        port = json.loads(recv.stdout.readline())["port"]
        for index, (start, end) in enumerate(_slices(size, 2)):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(bytes([index]))
                # The second connection closes half-way through its slice.
                sock.sendall(bytes((end - start) // (2 if index else 1)))
        out, err = recv.communicate(timeout=TIMEOUT)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.communicate()
    assert recv.returncode == 1, out
    assert "ConnectionError: connection closed after 262144 of 524288 bytes" in err


@pytest.mark.parametrize("impl", ["raw_socket", "trio_multifd"])
def test_a_sender_that_fails_ends_the_run_with_its_error_not_a_timeout(impl: str) -> None:
    # A data kind the sender does not know stands for any sender failure; the receiver
    # would wait for it until the run's timeout.
    run = run_once(impl, channels=1, compression="none", data="bogus", size=1 << 20, timeout=30)
    assert run.verified is False
    assert run.error == "sender failed: ValueError: unknown data kind 'bogus'"


def test_a_bench_whose_receiver_dies_reports_the_case_unverified_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The receiver worker prints its port, takes the first connection, and is killed.
    dies = (
        "import json, os, signal, socket\n"
        "listener = socket.create_server(('127.0.0.1', 0))\n"
        "print(json.dumps({'port': listener.getsockname()[1]}), flush=True)\n"
        "listener.accept()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    spawn = _benchrun._spawn

    def spawn_dying_receiver(role: str, spec: dict[str, Any]) -> subprocess.Popen[str]:
        if role != "recv":
            return spawn(role, spec)
        return subprocess.Popen(
            [sys.executable, "-c", dies], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    monkeypatch.setattr(_benchrun, "_spawn", spawn_dying_receiver)
    out = tmp_path / "bench.json"
    tiny = ["--size", "1MiB", "--repeat", "1", "--channels", "1", "--compression", "none"]
    assert main(["bench", *tiny, "--data", "random", "--no-baselines", "--json", str(out)]) == 1
    [obj] = json.loads(out.read_text())
    assert obj["verified"] is False
    assert obj["error"].endswith("receiver failed: killed by SIGKILL")
    assert f"trio-multifd: error: trio_multifd ch=1 none random: {obj['error']}" in (
        capsys.readouterr().err.splitlines()
    )


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for the container's init to reap it does
    not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_bench_killed_outright_takes_its_workers_with_it() -> None:
    # The parent spawns a receiver worker, which then waits for ever for its sender.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from trio_multifd._benchrun import _spawn\n"
            "worker = _spawn('recv', {'impl': 'raw_socket', 'channels': 1, 'size': 4096})\n"
            "worker.stdout.readline()\n"
            "print(worker.pid, flush=True)\n"
            f"time.sleep({TIMEOUT})\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    worker = int(parent.stdout.readline())
    parent.kill()
    parent.communicate()
    try:
        deadline = time.monotonic() + 10
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(worker)
    finally:
        if _running(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_case_with_no_verified_run_reports_no_figures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    result = CaseResult(Case("trio_multifd", 1, "none", "random"), size=16 << 20)
    result.runs.append(failed_run(16 << 20, "sender failed: boom"))
    obj = result.to_json()
    # Not zero speed, zero CPU, or a peak RSS of minus the data: nothing was measured.
    for field in (
        "gbps_median",
        "sender_cpu_s_per_gb",
        "receiver_cpu_s_per_gb",
        "sender_peak_rss_mib",
        "receiver_peak_rss_mib",
        "sender_rss_beyond_data_mib",
        "receiver_rss_beyond_target_mib",
        "ratio_to_raw",
    ):
        assert obj[field] is None, field
    # The load is the machine's, failed run or not.
    assert obj["load_1m"] == [1.5]
    row = format_table([result]).splitlines()[2]
    assert row.split()[4:] == ["-", "-", "-/-", "-/-", "NO"]
