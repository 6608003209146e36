"""The files ``trio-multifd send`` reads and ``recv`` writes: where their data is
(``SEEK_DATA``/``SEEK_HOLE``), which pages hold it, and their checksum. Plain functions
over a file descriptor; :func:`scan_in_thread` runs a scan in a worker thread.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable, Iterator

import trio

from ._errors import CopyError
from ._pages import ZEROS, split_zero_runs

__all__ = [
    "CHECKSUM",
    "PAGE",
    "data_extents",
    "file_checksum",
    "nonzero_pages",
    "page_ranges",
    "scan",
    "scan_in_thread",
]

PAGE = 4096
"""The page size of a file copy."""
CHECKSUM = "xxh3_128"
"""The whole-file checksum's algorithm, as the manifest names it."""


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, end)`` byte ranges holding data, by ``SEEK_DATA``/``SEEK_HOLE``
    (the rest of the file from where the file system cannot tell)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to the end
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, size
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        if start < pos or end <= start:
            # A file system that ignores the whence (Linux's noop_llseek returns the file
            # position) or a FUSE server's wrong answer: without progress the loop would
            # never end.
            yield pos, size
            return
        yield start, min(end, size)
        pos = end


def file_checksum(fd: int, size: int, between_chunks: Callable[[], object] = lambda: None) -> str:
    """xxh3_128 of the file's content, holes hashed as zeros without reading them (on
    tmpfs even a read of a hole allocates memory).

    ``between_chunks`` runs before each chunk of up to 4 MiB: run in a worker thread, pass
    ``trio.from_thread.check_cancelled`` so that a cancel (Ctrl-C) stops the checksum of a
    large file at once instead of when it ends."""
    return scan(fd, size, between_chunks, count_pages=False)[0]


def scan(
    fd: int,
    size: int,
    between_chunks: Callable[[], object],
    *,
    count_pages: bool,
    name: str = "the file",
) -> tuple[str, int]:
    """:func:`file_checksum`, and with ``count_pages`` how many of the file's pages hold
    a byte that is not zero: the pages a receiver writes (it skips zero pages).
    ``name`` says which file in an error."""
    import xxhash

    digest = xxhash.xxh3_128()
    buffer = bytearray(4 * 1024 * 1024)
    view = memoryview(buffer)
    zeros = memoryview(bytes(len(buffer)))
    pages = 0
    last_page = -1  # a page split between two reads is counted once
    pos = 0
    # The sentinel extent at the end makes the trailing hole one more stretch of zeros.
    for start, end in [*data_extents(fd, size), (size, size)]:
        while pos < end:
            between_chunks()
            if pos < start:
                n = min(len(zeros), start - pos)
                digest.update(zeros[:n])
            else:
                n = os.preadv(fd, [view[: min(len(buffer), end - pos)]], pos)
                if not n:
                    # Truncated meanwhile, or a file of /sys: 4096 bytes by its size,
                    # fewer to read.
                    raise CopyError(
                        f"{name} holds less than its size of {size} bytes: it ended at"
                        f" byte {pos} while being read (truncated meanwhile, or a file of"
                        " /sys)"
                    )
                digest.update(view[:n])
                if count_pages:
                    counted, last_page = nonzero_pages(buffer, n, pos, last_page)
                    pages += counted
            pos += n
    return digest.hexdigest(), pages


def nonzero_pages(data: bytearray, length: int, pos: int, last_page: int) -> tuple[int, int]:
    """How many pages of the file hold a nonzero byte among ``data[:length]``, read at
    offset ``pos``, page ``last_page`` not counted again; and the last page counted.

    Whole pages are judged by the sender's own zero-page test (:func:`split_zero_runs`),
    so the count is what the sender will send as normal pages; a page cut by the start
    or end of the read (an extent not aligned to pages) counts if its part here is not
    all zero."""
    view = memoryview(data)[:length]
    head = min(length, -pos % PAGE)  # the part of a page begun before this read
    body_end = head + (length - head) // PAGE * PAGE
    counted = 0

    def count_part(start: int, stop: int) -> None:
        nonlocal counted, last_page
        page = (pos + start) // PAGE
        if start < stop and page != last_page and not ZEROS.startswith(view[start:stop]):
            counted += 1
            last_page = page

    count_part(0, head)
    if body_end > head:
        body = body_end - head
        # Runs of a packet at most, as the sender's: each is compared with ZEROS at once.
        runs = [(run, min(len(ZEROS), body - run)) for run in range(0, body, len(ZEROS))]
        normal, _ = split_zero_runs(view[head:body_end], runs, PAGE)
        for run_start, size in normal:
            first = (pos + head + run_start) // PAGE
            counted += size // PAGE - (first == last_page)
            last_page = first + size // PAGE - 1
    count_part(body_end, length)
    return counted, last_page


async def scan_in_thread(
    fd: int,
    size: int,
    *,
    count_pages: bool,
    name: str,
    check: Callable[[], None] = lambda: None,
) -> tuple[str, int]:
    def between_chunks() -> None:
        trio.from_thread.check_cancelled()
        check()

    return await trio.to_thread.run_sync(
        functools.partial(scan, fd, size, between_chunks, count_pages=count_pages, name=name)
    )


def page_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """Data extents widened to whole pages, merged."""
    ranges: list[tuple[int, int]] = []
    for start, end in data_extents(fd, size):
        start = start // PAGE * PAGE
        end = -(-end // PAGE) * PAGE
        if ranges and start <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(end, ranges[-1][1]))
        else:
            ranges.append((start, end))
    return ranges
