"""The ``trio-multifd`` command: ``demo``, ``send``, ``recv`` and ``bench``.

Exit status: 0 on success, 1 when the work failed (one line on stderr, or a traceback
with ``--debug``), 2 for a usage error, 130 when interrupted (Ctrl-C), 143 when ``send`` or
``recv`` was stopped by SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TextIO, TypeVar

_T = TypeVar("_T")

__all__ = ["main", "parse_hostport", "parse_size"]

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_METHODS = ("none", "zlib", "zstd")


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``8MiB``, ``1G``, ``1GiB``: a byte count (K/M/G are binary)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MiB, 64K, 1G)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def _page_size_arg(text: str) -> int:
    size = parse_size(text)
    if size <= 0 or size % 4096:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 4096: {text!r}")
    return size


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6addr]:PORT`` for IPv6)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    # ASCII digits only: str.isdigit() takes other scripts' digits (and int() too).
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _path_arg(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("PATH must not be empty")
    return text


def _list_of(
    kind: Callable[[str], Any], choices: Sequence[Any] | None = None
) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            items = [kind(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad list: {text!r}") from None
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        for item in items:
            if choices is not None and item not in choices:
                raise argparse.ArgumentTypeError(
                    f"{item!r} is not one of {', '.join(map(str, choices))}"
                )
        return list(dict.fromkeys(items))

    return parse


def _one_to_255(what: str, value: int) -> int:
    if not 1 <= value <= 255:
        raise argparse.ArgumentTypeError(f"{what} must be 1..255, got {value}")
    return value


def _channels_arg(text: str) -> int:
    return _one_to_255("channels", int(text))


def _io_threads_arg(text: str) -> int:
    return _one_to_255("io-threads", int(text))


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _channel_list(text: str) -> list[int]:
    values: list[int] = _list_of(int)(text)
    return [_one_to_255("channels", value) for value in values]


class _Parser(argparse.ArgumentParser):
    """Keeps the message of its usage error (``send --json`` and ``recv --json`` print
    it on stdout as well), and its commands' parsers."""

    usage_error: str | None = None
    commands: dict[str, _Parser]

    def error(self, message: str) -> NoReturn:
        self.usage_error = message
        super().error(message)


def _parser() -> _Parser:
    from ._benchdata import DATA_KINDS
    from ._filecopy import MAX_CHANNELS
    from ._qemu_bench import QEMU_BINARY

    parser = _Parser(
        prog="trio-multifd",
        description="QEMU multifd-compatible page transfer over parallel streams.",
    )
    parser.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # --debug after the command as well as before it. SUPPRESS: argparse copies a
    # command's defaults over the namespace, which would undo a --debug given before it.
    debug = _Parser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print tracebacks on errors",
    )

    demo = sub.add_parser(
        "demo",
        parents=[debug],
        help="a loopback transfer between two processes, verified, with its baseline",
        description="Send mixed data (a quarter zero pages, a quarter random, half"
        " text-like) to a receiver process over 127.0.0.1, verify it, print the figures.",
    )
    demo.add_argument(
        "--size", type=_page_size_arg, default=256 << 20, help="bytes to send (default 256MiB)"
    )
    demo.add_argument("--channels", type=_channels_arg, default=4, help="default 4")
    demo.add_argument("--compression", choices=_METHODS, default="zstd", help="default zstd")
    demo.add_argument("--level", type=int, default=None, help="compression level")

    common = _Parser(add_help=False, parents=[debug])
    common.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    common.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout (ok, figures or error)",
    )
    common.add_argument(
        "--io-threads",
        type=_io_threads_arg,
        default=None,
        metavar="N",
        help="worker threads moving the channels' packets (default: one per core with"
        " compression, else half the cores)",
    )
    common.add_argument(
        "--idle-timeout",
        type=_seconds_arg,
        default=60.0,
        metavar="SECONDS",
        help="give up when the peer makes no progress for this long (default 60)",
    )

    send = sub.add_parser(
        "send",
        parents=[common],
        help="send a file to a `recv`",
        description="Send the file PATH to a `trio-multifd recv` at"
        " HOST:PORT through N parallel channels.",
    )
    send.add_argument("path", metavar="PATH", type=_path_arg)
    send.add_argument("address", metavar="HOST:PORT", type=parse_hostport)
    send.add_argument("--channels", type=_channels_arg, default=4, help="default 4")
    send.add_argument("--compression", choices=_METHODS, default="none", help="default none")
    send.add_argument(
        "--level",
        type=int,
        default=None,
        help="compression level (zlib 0-9, zstd 0-20; default 1)",
    )
    send.add_argument(
        "--tls-ca", metavar="FILE", help="use TLS; trust this CA file (the host name is checked)"
    )

    recv = sub.add_parser(
        "recv",
        parents=[common],
        help="receive one file, then exit",
        description="Listen at HOST:PORT, receive one file into PATH (a"
        " file name, or a directory for the sender's file name), exit.",
    )
    recv.add_argument("path", metavar="PATH", type=_path_arg)
    recv.add_argument(
        "--listen",
        metavar="HOST:PORT",
        type=parse_hostport,
        required=True,
        help="where to listen; port 0 picks a free port (printed on stderr)",
    )
    recv.add_argument("--force", action="store_true", help="replace an existing file")
    recv.add_argument(
        "--max-channels",
        type=_channels_arg,
        default=MAX_CHANNELS,
        metavar="N",
        help=f"refuse a sender asking for more channels (default {MAX_CHANNELS})",
    )
    recv.add_argument("--tls-cert", metavar="FILE", help="use TLS with this certificate chain")
    recv.add_argument("--tls-key", metavar="FILE", help="the certificate's private key")

    bench = sub.add_parser(
        "bench",
        parents=[debug],
        help="measure against raw sockets, naive Trio and (--qemu) QEMU's multifd",
        description="Two fresh processes per run over 127.0.0.1 TCP; trio_multifd against"
        " raw_socket, raw_socket_threads and naive_trio on the same data, and with --qemu"
        " against QEMU's own multifd.",
    )
    bench.add_argument(
        "--size",
        type=_page_size_arg,
        default=256 << 20,
        help="bytes per run, a multiple of 4096 (default 256MiB)",
    )
    bench.add_argument(
        "--channels",
        type=_channel_list,
        default=[1, 2, 4, 8],
        help="channel counts (default 1,2,4,8)",
    )
    bench.add_argument(
        "--compression",
        type=_list_of(str, _METHODS),
        default=["none", "zlib", "zstd"],
        help="methods (default none,zlib,zstd)",
    )
    bench.add_argument(
        "--data",
        type=_list_of(str, DATA_KINDS),
        default=["random", "compressible", "zero"],
        help=f"data kinds among {','.join(DATA_KINDS)} (default random,compressible,zero)",
    )
    bench.add_argument("--level", type=int, default=None, help="compression level")
    bench.add_argument(
        "--known-zero",
        action="store_true",
        help="receivers start from fresh memory, trio_multifd's target a known-zero block",
    )
    bench.add_argument(
        "--io-threads",
        type=_io_threads_arg,
        default=None,
        metavar="N",
        help="worker threads of each trio_multifd end (default: the library's)",
    )
    bench.add_argument("--repeat", type=int, default=5, help="repeats (default 5)")
    bench.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the baselines (default yes)",
    )
    bench.add_argument(
        "--qemu",
        nargs="?",
        const=QEMU_BINARY,
        default=None,
        metavar="BINARY",
        help="also run QEMU's own multifd after each trio_multifd case of a method QEMU has"
        f" (none, zlib, zstd), on the same data (BINARY default {QEMU_BINARY}; --size a"
        " whole number of MiB)",
    )
    bench.add_argument(
        "--json", metavar="PATH", dest="json_path", help="write the results as a JSON array"
    )
    parser.commands = {"demo": demo, "send": send, "recv": recv, "bench": bench}
    for command in parser.commands.values():
        command.set_defaults(command_parser=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trio-multifd`` command line; return the exit status.

    ``send`` and ``recv`` return with SIGINT and SIGTERM ignored: the process is about to
    exit with the status that its report gave, and a late signal must not change it."""
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # A usage error past the command shows the command's usage, not the top level's.
        command: argparse.ArgumentParser = args.command_parser
        if extra:
            command.error(f"unrecognized arguments: {' '.join(extra)}")
        _validate(command, args)
    except SystemExit as exc:
        errors = [p.usage_error for p in (parser, *parser.commands.values()) if p.usage_error]
        wants_json = _json_command(sys.argv[1:] if argv is None else list(argv))
        if errors and wants_json:
            _json_failure(wants_json, errors[0])
        return exc.code if isinstance(exc.code, int) else 2
    debug = bool(args.debug)
    try:
        if args.command == "demo":
            from ._demo import run_demo

            return run_demo(
                size=args.size,
                channels=args.channels,
                compression=args.compression,
                level=args.level,
            )
        if args.command == "bench":
            return _bench(args)
        return _copy(args)
    except KeyboardInterrupt:
        sys.stderr.write("trio-multifd: interrupted\n")
        return 130
    except Exception as exc:
        if debug:
            raise
        from ._filecopy import describe

        sys.stderr.write(f"trio-multifd: error: {_one_line(describe(exc))}\n")
        return 1


def _json_command(argv: list[str]) -> str | None:
    """``send`` or ``recv`` when ``argv``, which did not parse, asks for ``--json``
    (spelt out, or abbreviated as argparse allows), else ``None``."""
    words = [word for word in argv if not word.startswith("-")]
    if not words or words[0] not in ("send", "recv"):
        return None
    after = argv[argv.index(words[0]) + 1 :]
    after = after[: after.index("--")] if "--" in after else after
    if any(word.startswith("--j") and "--json".startswith(word) for word in after):
        return words[0]
    return None


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks argparse cannot express; each failure is a usage error (exit 2)."""
    from ._methods import get_method

    if args.command in ("bench", "demo"):
        # Both processes of a run hold the data (the source, the target), filled.
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if 2 * args.size > memory:
            parser.error(
                f"--size {args.size}: a run holds the data twice (the source and the copy,"
                f" in two processes), more than this machine's {memory} bytes of memory"
            )
    if args.command == "bench":
        if args.repeat < 1:
            parser.error("--repeat must be at least 1")
        if args.size < 4096 * max(args.channels):
            parser.error("--size must hold at least one page per channel")
        if args.json_path is not None:
            # Written after every run: found out now, not once the results are in.
            problem = _unwritable(args.json_path)
            if problem:
                parser.error(f"--json: cannot write {args.json_path!r}: {problem}")
        if args.qemu is not None:
            from ._qemu_bench import find_qemu

            found = find_qemu(args.qemu)
            if found is None:
                parser.error(
                    f"--qemu: no QEMU binary {args.qemu!r} found (Debian: apt install"
                    " qemu-system-x86)"
                )
            args.qemu = found
            if args.size % (1 << 20):
                parser.error("--qemu needs a --size that is a whole number of MiB")
    if args.command == "recv" and bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    level = getattr(args, "level", None)
    if level is not None:
        methods = args.compression if isinstance(args.compression, list) else [args.compression]
        for name in methods:
            if name == "none" and len(methods) == 1:
                parser.error("--level needs --compression zlib or zstd")
            if name != "none":
                try:
                    get_method(name).check_level(level)
                except ValueError as exc:
                    parser.error(str(exc))


def _unwritable(path: str) -> str | None:
    """Why a file could not be written at ``path``, or ``None``."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "it is a directory"
    if not os.path.isdir(folder):
        return f"no directory {folder!r}"
    if not os.access(path if os.path.exists(path) else folder, os.W_OK):
        return "permission denied"
    return None


def _bench(args: argparse.Namespace) -> int:
    from ._bench import format_table, run_bench

    def progress(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    progress(
        f"bench: {args.size} bytes per run, {args.repeat} repeats, {os.cpu_count()} CPUs,"
        f" load {os.getloadavg()[0]:.2f}"
    )
    results = run_bench(
        size=args.size,
        channels=args.channels,
        compressions=args.compression,
        data=args.data,
        repeat=args.repeat,
        baselines=args.baselines,
        level=args.level,
        known_zero=args.known_zero,
        io_threads=args.io_threads,
        qemu=args.qemu,
        progress=progress,
    )
    objects = [r.to_json() for r in results]
    sys.stdout.write(format_table(results) + "\n")
    loads = [load for obj in objects for load in obj["load_1m"]]
    to_qemu = " (/qemu: to QEMU's multifd, same method)" if args.qemu else ""
    sys.stdout.write(
        f"{args.size / (1 << 20):g} MiB per run, medians of the verified runs of"
        f" {args.repeat}; ratio = median of"
        f" per-repeat ratios to the baseline with as many connections{to_qemu};"
        f" RSS+ = peak RSS beyond"
        f" the data buffer; load {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} CPUs\n"
    )
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(objects, f, indent=1)
            f.write("\n")
    failed = [obj for obj in objects if not obj["verified"]]
    for obj in failed:
        sys.stderr.write(
            f"trio-multifd: error: {obj['impl']} ch={obj['channels']} {obj['compression']}"
            f" {obj['data']}: {obj.get('error', 'not verified')}\n"
        )
    return 1 if failed else 0


class _Reporter:
    """Progress on stderr: a rich bar on a terminal, a line per 10% otherwise."""

    def __init__(self, what: str, *, quiet: bool, err: TextIO) -> None:
        self.what = what
        self.quiet = quiet
        self.err = err
        self.tty = err.isatty()
        self.next_tenth = 1
        self.started = 0.0
        self._progress: Any = None
        self._task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if not self.started:
            self.started = time.monotonic()
        if self.tty:
            if self._progress is None:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    DownloadColumn,
                    Progress,
                    TimeRemainingColumn,
                    TransferSpeedColumn,
                )

                self._progress = Progress(
                    "[progress.description]{task.description}",
                    BarColumn(),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    TimeRemainingColumn(),
                    console=Console(file=self.err),
                    transient=False,
                )
                self._progress.start()
                self._task = self._progress.add_task(self.what, total=max(total, 1))
            self._progress.update(self._task, completed=done)
            return
        tenth = min(done * 10 // total, 10) if total else 0
        if tenth >= self.next_tenth:
            # One line for the tenth reached: a call that passes several (a fast copy)
            # would otherwise print each with the same figures under its own percentage.
            elapsed = time.monotonic() - self.started
            rate = done / elapsed / 1e6 if elapsed > 0 else 0.0
            self.err.write(f"{self.what}: {tenth * 10}% ({done} bytes, {rate:.0f} MB/s)\n")
            self.err.flush()
            self.next_tenth = tenth + 1

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _copy(args: argparse.Namespace) -> int:
    err = sys.stderr
    reporter = _Reporter(
        "sending" if args.command == "send" else "receiving",
        quiet=args.quiet or args.json,
        err=err,
    )

    def announce(host: str, port: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        err.write(f"listening on {shown}:{port}\n")
        err.flush()

    def notice(line: str) -> None:
        # Also with --quiet and --json (stdout keeps its one object): a sender that
        # fails at its end leaves recv waiting, whose user would otherwise see nothing.
        err.write(f"trio-multifd: warning: {_one_line(line)}\n")
        err.flush()

    # Ctrl-C and SIGTERM cancel the copy (see _until_stopped) and are ignored outside the
    # run, to the process's exit: none can cut the final report short, kill the process
    # between the two, or give it an exit status (-2, -15) that contradicts its report.
    # Restoring the old handlers on return left that window open up to the exit.
    for signum in _STOPS:
        signal.signal(signum, signal.SIG_IGN)
    return _run_copy(args, reporter, announce, notice)


def _run_copy(
    args: argparse.Namespace,
    reporter: _Reporter,
    announce: Callable[[str, int], None],
    notice: Callable[[str], None],
) -> int:
    import trio

    from . import _filecopy as fc

    err = sys.stderr

    async def copy() -> fc.Summary:
        # Loaded in a thread the copy's cancellation abandons: a FIFO or a hung mount
        # given as a TLS file must not make the process deaf to Ctrl-C and SIGTERM.
        tls = await trio.to_thread.run_sync(_tls_context, args, abandon_on_cancel=True)
        if args.command == "send":
            host, port = args.address
            return await fc.send_file(
                args.path,
                host,
                port,
                channels=args.channels,
                compression=args.compression,
                level=args.level,
                tls=tls,
                progress=reporter,
                idle_timeout=args.idle_timeout,
                io_threads=args.io_threads,
            )
        host, port = args.listen
        return await fc.receive_file(
            args.path,
            host,
            port,
            force=args.force,
            max_channels=args.max_channels,
            tls=tls,
            progress=reporter,
            announce=announce,
            notice=notice,
            idle_timeout=args.idle_timeout,
            io_threads=args.io_threads,
        )

    try:
        summary = trio.run(_until_stopped, copy)
    except BaseException as exc:
        reporter.stop()
        if isinstance(exc, _Stopped):
            if args.json:
                _json_failure(args.command, str(exc))
            err.write(f"trio-multifd: {exc}\n")
            return 128 + exc.signum
        if not isinstance(exc, Exception):
            raise
        message = fc.describe(exc)
        if args.json:
            _json_failure(args.command, message)
        if args.debug:
            raise
        err.write(f"trio-multifd: error: {_one_line(message)}\n")
        return 1
    reporter.stop()
    result = summary.to_json(args.command)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    elif not args.quiet:
        verb = "sent" if args.command == "send" else "received"
        err.write(
            f"{verb} {_one_line(summary.path)}: {summary.size} bytes ({summary.data_bytes} in data"
            f" extents) in {summary.seconds:.2f} s, {result['gbps']:.2f} GB/s; wire"
            f" {summary.wire_bytes} bytes, {summary.zero_pages} zero pages;"
            f" xxh3_128 {summary.checksum}\n"
        )
    return 0


_STOPS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


class _Stopped(Exception):
    """Ctrl-C or SIGTERM stopped the copy; the message is the one word the CLI prints."""

    def __init__(self, signum: int) -> None:
        super().__init__(_STOPS[signal.Signals(signum)])
        self.signum = signum


async def _until_stopped(work: Callable[[], Awaitable[_T]]) -> _T:
    """``work()``, cancelled by Ctrl-C or SIGTERM rather than interrupted anywhere: the
    receiver still removes its partial file (service managers stop a process with
    SIGTERM, and only SIGKILL should leave a temporary file behind), and a copy already
    checked and named when the signal comes is reported as done, never half one way."""
    import trio

    stopped_by: int | None = None
    done: list[_T] = []
    # Entered before work() runs its first synchronous steps: no signal is missed.
    with trio.open_signal_receiver(*_STOPS) as signals:
        try:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    nonlocal stopped_by
                    async for signum in signals:
                        stopped_by = stopped_by or signum
                        nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                done.append(await work())
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup:
            if stopped_by is None:
                raise
    if done:
        return done[0]
    assert stopped_by is not None  # work() neither returned nor raised: it was cancelled
    raise _Stopped(stopped_by)


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context the options ask for; a file that cannot be loaded is named."""
    from ._control import client_context, server_context
    from ._errors import CopyError

    try:
        if args.command == "send":
            return client_context(args.tls_ca) if args.tls_ca else None
        return server_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    except (OSError, ssl.SSLError) as exc:
        files = [args.tls_ca] if args.command == "send" else [args.tls_cert, args.tls_key]
        named = files[0] if len(set(files)) == 1 else ", ".join(files)
        what = "file" if len(set(files)) == 1 else "files"
        raise CopyError(
            f"cannot load TLS {what} {named}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


def _one_line(text: str) -> str:
    """``text`` with each character that is not printable escaped: a path may hold a
    newline (a file system takes any byte but NUL and ``/``), and an error is one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _json_failure(command: str, message: str) -> None:
    sys.stdout.write(json.dumps({"ok": False, "command": command, "error": message}) + "\n")
    sys.stdout.flush()
