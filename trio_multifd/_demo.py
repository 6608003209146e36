"""``trio-multifd demo``: one loopback transfer between two processes, checked, with its
raw-socket baseline."""

from __future__ import annotations

import sys
from typing import TextIO

from ._benchrun import run_once

__all__ = ["run_demo"]

MIB = 1024 * 1024


def run_demo(
    *,
    size: int = 256 * MIB,
    channels: int = 4,
    compression: str = "zstd",
    level: int | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Send ``size`` bytes of mixed data (a quarter zero pages, a quarter random, half
    text-like) to a receiver process and print the figures; return the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    what = (
        f"{size / MIB:g} MiB of mixed data (1/4 zero pages, 1/4 random, 1/2 text-like),"
        f" {channels} channel{'s' if channels > 1 else ''}, {compression}"
    )
    err.write(f"demo: sending {what} to a receiver process over 127.0.0.1...\n")
    err.flush()
    run = run_once(
        "trio_multifd",
        channels=channels,
        compression=compression,
        level=level,
        data="mixed",
        size=size,
    )
    if not run.verified:
        err.write(f"trio-multifd: error: demo transfer failed: {run.error}\n")
        return 1
    err.write("demo: the same data over one raw socket (the baseline)...\n")
    err.flush()
    raw = run_once("raw_socket", channels=1, compression="none", data="mixed", size=size)
    wire = int(run.sender.get("wire_bytes", 0))
    pages = size // 4096
    zero = int(run.sender.get("zero_pages", 0))
    ratio = size / wire if wire else 0.0
    lines = [
        f"trio_multifd: {what}",
        f"  throughput    {run.gbps:.2f} GB/s ({run.seconds * 1000:.0f} ms for {size} bytes)",
        "  verified      yes: the receiver's copy hashes like the source (xxh3_128)",
        f"  wire bytes    {wire} ({wire / MIB:.1f} MiB): compression ratio {ratio:.2f}x",
        f"  zero pages    {zero} of {pages} pages sent as offsets only",
        f"  CPU           sender {run.sender_cpu_s:.2f} s, receiver {run.receiver_cpu_s:.2f} s",
    ]
    if raw.verified:
        lines.append(
            f"  raw socket    {raw.gbps:.2f} GB/s on the same data (1 connection, blocking"
            f" sendall / recv_into, no compression): trio_multifd at {run.gbps / raw.gbps:.2f}x"
        )
    else:
        lines.append(f"  raw socket    baseline failed: {raw.error}")
    out.write("\n".join(lines) + "\n")
    out.flush()
    return 0
