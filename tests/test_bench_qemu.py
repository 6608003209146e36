"""The bench's optional QEMU baseline: QEMU's own multifd on the same data, same run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trio_multifd import _qemu_bench
from trio_multifd._bench import make_cases
from trio_multifd._qemu_bench import find_qemu, qemu_argv, run_qemu_once

TIMEOUT = 120
QEMU = find_qemu()
needs_qemu = pytest.mark.skipif(
    QEMU is None, reason="qemu-system-x86_64 is not installed (Debian: qemu-system-x86)"
)


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_multifd", "bench", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_qemu_runs_right_after_each_trio_multifd_run_of_a_method_it_has() -> None:
    cases = make_cases(
        channels=[1, 2],
        compressions=["none", "zstd", "lz4"],
        data=["random"],
        baselines=False,
        qemu=True,
    )
    names = [(c.impl, c.channels, c.compression) for c in cases]
    assert names == [
        ("trio_multifd", 1, "none"),
        ("qemu_multifd", 1, "none"),
        ("trio_multifd", 1, "zstd"),
        ("qemu_multifd", 1, "zstd"),
        ("trio_multifd", 1, "lz4"),
        ("trio_multifd", 2, "none"),
        ("qemu_multifd", 2, "none"),
        ("trio_multifd", 2, "zstd"),
        ("qemu_multifd", 2, "zstd"),
        ("trio_multifd", 2, "lz4"),
    ]


def test_both_sides_preallocate_and_the_destination_waits_for_its_migration() -> None:
    source = qemu_argv("qemu", ram_path="/r/src", size=64 << 20, qmp_path="/q", destination=False)
    target = qemu_argv("qemu", ram_path="/r/dst", size=64 << 20, qmp_path="/q", destination=True)
    assert "-S" in source and "-m" in source and source[source.index("-m") + 1] == "64M"
    for argv, path in ((source, "/r/src"), (target, "/r/dst")):
        backend = argv[argv.index("-object") + 1]
        assert f"mem-path={path}" in backend and "prealloc=on" in backend
    assert "-incoming" not in source
    assert target[target.index("-incoming") + 1] == "defer"


def test_a_qemu_that_exits_at_once_is_a_failed_run_not_a_hang() -> None:
    run = run_qemu_once("/bin/false", channels=1, compression="none", data="zero", size=1 << 20)
    assert run.verified is False
    assert run.error is not None and "QEMU exited with status 1" in run.error


def test_a_qemu_that_never_greets_fails_at_the_deadline(tmp_path: Path) -> None:
    # A stand-in for QEMU that opens its QMP socket and then says nothing (3 s: time for
    # its interpreter to start on a loaded machine, so the wait is for the greeting).
    fake = tmp_path / "silent-qemu"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import socket, sys, time\n"
        "path = sys.argv[sys.argv.index('-qmp') + 1][len('unix:'):].split(',')[0]\n"
        "listener = socket.socket(socket.AF_UNIX)\n"
        "listener.bind(path)\n"
        "listener.listen()\n"
        "time.sleep(60)\n"
    )
    fake.chmod(0o755)
    run = run_qemu_once(
        str(fake), channels=1, compression="none", data="zero", size=1 << 20, timeout=3
    )
    assert run.verified is False
    assert run.error == "QEMU run failed: QEMU sent no greeting before the run's deadline"


def test_a_size_qemu_cannot_take_is_a_failed_run() -> None:
    run = run_qemu_once("qemu", channels=1, compression="none", data="zero", size=4096)
    assert run.verified is False
    assert run.error == "QEMU's guest RAM must be a whole number of MiB"


def test_a_missing_qemu_binary_is_a_usage_error() -> None:
    proc = bench("--size", "1MiB", "--channels", "1", "--qemu", "/nonexistent/qemu")
    assert proc.returncode == 2
    assert "--qemu: no QEMU binary '/nonexistent/qemu' found" in proc.stderr


def test_qemu_needs_a_size_in_whole_mebibytes() -> None:
    # Any executable passes the check that the binary exists, which comes first.
    proc = bench("--size", "1028KiB", "--channels", "1", "--qemu", sys.executable)
    assert proc.returncode == 2
    assert "--qemu needs a --size that is a whole number of MiB" in proc.stderr


@needs_qemu
def test_bench_runs_qemu_on_the_same_data_and_reports_the_ratio(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--size", "16MiB", "--repeat", "1", "--channels", "2", "--data", "compressible"]
    args += ["--compression", "none,zstd", "--no-baselines", "--qemu", "--json", str(out)]
    proc = bench(*args)
    assert proc.returncode == 0, proc.stderr
    cases = json.loads(out.read_text())
    assert [(c["impl"], c["compression"]) for c in cases] == [
        ("trio_multifd", "none"),
        ("qemu_multifd", "none"),
        ("trio_multifd", "zstd"),
        ("qemu_multifd", "zstd"),
    ]
    for case in cases:
        # QEMU's destination RAM, compared with its source, holds the bench's data.
        assert case["verified"] is True, case
        assert case["gbps_median"] > 0
        if case["impl"] == "trio_multifd":
            assert isinstance(case["ratio_to_qemu"], float) and case["ratio_to_qemu"] > 0
        else:
            assert "ratio_to_qemu" not in case
            # Guest RAM counts in QEMU's peak RSS, as the data buffer does in ours.
            assert case["receiver_peak_rss_mib"] > 16
    trio_row = next(line for line in proc.stdout.splitlines() if "trio_multifd" in line)
    assert f"{cases[0]['ratio_to_qemu']:.2f}" in trio_row.split()


@needs_qemu
def test_a_source_that_cannot_connect_fails_the_run_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The source migrates to a closed port: its failure ends the run, the destination
    # (which would wait for ever) is not waited for.
    command = _qemu_bench._Qmp.command

    def closed_port(self: _qemu_bench._Qmp, name: str, **arguments: Any) -> Any:
        if name == "migrate":
            arguments["uri"] = "tcp:127.0.0.1:1"
        return command(self, name, **arguments)

    monkeypatch.setattr(_qemu_bench._Qmp, "command", closed_port)
    run = run_qemu_once(
        QEMU or "", channels=2, compression="none", data="random", size=16 << 20, timeout=30
    )
    assert run.verified is False
    assert run.error is not None and run.error.startswith("QEMU's source failed:"), run.error


@needs_qemu
def test_a_known_zero_destination_starts_zeroed_and_still_verifies() -> None:
    run = run_qemu_once(
        QEMU or "", channels=2, compression="zstd", data="zero", size=16 << 20, known_zero=True
    )
    assert run.verified is True, run.error
