"""Access to the real QEMU 7.2 channel captures in ``../shared/captures`` (read-only).

The captures are not copied into the repository: tests that need them skip with a reason
when the folder is absent. ``TRIO_MULTIFD_CAPTURES`` may point at it explicitly.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import pytest

NOCOMP_SHA256 = "d456e3a9e578ff58300d83edbf2ccd2b84f95b0c064565bd8807363fdd5bef15"
ZSTD_SHA256 = "5f80af55f73dbb9a65de0a95fdc456f5a0727962c27a0ff97cb6bfe18aa77c37"
GUEST_RAM_SIZE = 64 * 2**20
PAGE = 4096


def _candidates() -> list[Path]:
    found = []
    if env := os.environ.get("TRIO_MULTIFD_CAPTURES"):
        found.append(Path(env))
    here = Path(__file__).resolve()
    found += [parent / "shared" / "captures" for parent in here.parents]
    found.append(Path("/work/shared/captures"))
    return found


@functools.cache
def captures_dir() -> Path | None:
    for candidate in _candidates():
        if (candidate / "qemu-7.2-nocomp" / "channel0.bin").is_file():
            return candidate
    return None


def load(kind: str) -> bytes:
    """Return the bytes of ``qemu-7.2-<kind>/channel0.bin``, or skip the test."""
    folder = captures_dir()
    if folder is None:
        pytest.skip("QEMU captures not found (../shared/captures or TRIO_MULTIFD_CAPTURES)")
    data = (folder / f"qemu-7.2-{kind}" / "channel0.bin").read_bytes()
    expected = {"nocomp": NOCOMP_SHA256, "zstd": ZSTD_SHA256}[kind]
    assert hashlib.sha256(data).hexdigest() == expected, f"capture {kind} is not the known file"
    return data


@functools.cache
def nocomp_guest_ram() -> bytes:
    """The 64 MiB guest RAM behind the ``nocomp`` capture, rebuilt as its README says."""
    return hashlib.shake_256(b"trio_multifd-capture-64m" + (0).to_bytes(4, "big")).digest(
        GUEST_RAM_SIZE
    )


def compressible_page(i: int) -> bytes:
    """Page ``i`` of the compressible guest RAM behind the ``zstd`` capture."""
    head = hashlib.shake_256(b"trio_multifd-capture-compressible" + i.to_bytes(8, "big")).digest(
        1024
    )
    text = (b"page %08d " % i) * (3072 // 14 + 1)
    return head + text[:3072]
