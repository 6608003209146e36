"""The programs in ``examples/``: each one runs and verifies its transfer.

The docs include these files with ``literalinclude``, so the code a reader copies is the
code tested here. Each program runs in a fresh process with small sizes and a timeout.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio
import trio.testing

import trio_multifd

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"

# Each program with the arguments that keep it to a few seconds, and a line its output
# must hold.
RUNS: dict[str, tuple[list[str], str]] = {
    "tutorial_send_buffer.py": (["--size", "8"], "bytes verified: True"),
    "tutorial_send_buffer.py zstd": (
        ["--size", "8", "--compression", "zstd"],
        "bytes verified: True",
    ),
    "tutorial_numpy.py": (["--size", "8"], "readings verified: True"),
    "tutorial_numpy.py none": (["--size", "8", "--compression", "none"], "verified: True"),
    "howto_tls.py": ([], "receive_with_serve: 16777216 bytes over 4 TLS channels, verified: True"),
    "howto_multi_address.py": ([], "verified: True"),
    "howto_unix_socket.py": ([], "verified: True"),
    "howto_choose.py": (["--size", "2"], "zstd        4"),
    "howto_custom_method.py": ([], "verified: True"),
    "howto_errors.py": ([], "receiver: CompressionMismatchError: channel"),
    "howto_testing.py": ([], "test_a_silent_peer_times_out passed"),
    "precopy_migrate.py": (["--size", "4"], "copy verified: True"),
    "precopy_migrate.py give-up": (["--size", "4", "--give-up"], "receiver: PrecopyAbortedError"),
}


def run_example(name: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("run", sorted(RUNS))
def test_example_runs_and_verifies(run: str) -> None:
    name = run.split()[0]
    args, expected = RUNS[run]
    result = run_example(name, args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert expected in result.stdout, result.stdout


def test_the_errors_example_shows_each_outcome() -> None:
    result = run_example("howto_errors.py", [])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "  receiver: complete, verified: True" in lines
    assert "  sender: done, and the receiver confirmed it" in lines
    assert "  sender: cancelled; every channel closed with a reset" in lines
    assert any(line.startswith("  sender: TransportError: channel") for line in lines)


def test_every_example_is_run_here_and_included_in_the_docs() -> None:
    programs = {p.name for p in EXAMPLES.glob("*.py")}
    assert programs == {run.split()[0] for run in RUNS}
    # Included, not merely named: the code a reader sees is the code run here.
    included = {
        Path(path).name
        for doc in DOCS.rglob("*.rst")
        for path in re.findall(r"^\.\. literalinclude:: (\S+)$", doc.read_text(), re.MULTILINE)
        if (doc.parent / path).resolve().parent == EXAMPLES
    }
    assert not programs - included, f"not included in the docs: {programs - included}"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The testing how-to's functions are tests as they stand: run them in this suite too.
_howto_testing = _load("howto_testing")
_howto_errors = _load("howto_errors")


async def test_howto_memory_streams() -> None:
    await _howto_testing.test_a_buffer_crosses_memory_streams()


async def test_howto_timeout_with_autojump(autojump_clock: trio.testing.MockClock) -> None:
    await _howto_testing.test_a_silent_peer_times_out(autojump_clock)


async def test_howto_timeout_test_fails_rather_than_hangs(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The how-to's timeout test must be able to fail: with a receiver whose
    # handshake_timeout never fires, it raises instead of waiting for ever.
    opened = trio_multifd.open_receiver

    def without_timeout(*args: Any, **kwargs: Any) -> Any:
        return opened(*args, **{**kwargs, "handshake_timeout": None})

    monkeypatch.setattr(trio_multifd, "open_receiver", without_timeout)
    with trio.move_on_after(3600):
        with pytest.raises(trio.TooSlowError):
            await _howto_testing.test_a_silent_peer_times_out(autojump_clock)
        return
    pytest.fail("the how-to's timeout test hangs when the timeout never fires")


async def test_the_errors_example_ends_when_the_sender_gives_up_before_connecting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A sender cancelled before its handshakes reach the receiver: the receiver's own
    # deadline ends its wait for channels that will never come.
    monkeypatch.setattr(_howto_errors, "RECEIVER_DEADLINE", 0.5)
    with trio.fail_after(20):
        await _howto_errors.transfer(give_up_after=0)
