"""Page batches and the page-level helpers both sides share: runs of contiguous pages
and zero-page detection."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, final

import attrs

from ._wire import PACKET_SIZE

if TYPE_CHECKING:
    from ._block import RAMBlock

__all__ = ["ZEROS", "PageBatch", "Run", "page_runs", "run_offsets", "split_zero_runs"]

_ZERO_BYTES = re.compile(b"\\x00+")

ZEROS = bytes(PACKET_SIZE)
"""One packet of zero bytes: compared against and copied from, never written."""


Run = tuple[int, int]
"""A run of pages that follow each other in memory: ``(start, length in bytes)``."""


@final
@attrs.frozen
class PageBatch:
    """Pages of one block queued for sending: the offsets of one packet or more.

    The sender queues batches; its worker threads carve packets of at most
    ``page_count`` pages off the batch at the head of the queue. A ``range`` of offsets
    stays a ``range`` (O(1) to queue and to carve, however many pages it covers).
    """

    block: RAMBlock
    offsets: Sequence[int]


def page_runs(offsets: Sequence[int], page_size: int) -> list[Run]:
    """Group offsets, in their order, into runs of pages that follow each other in
    memory, so each run moves as one buffer."""
    if not offsets:
        return []
    first = offsets[0]
    count = len(offsets)
    end = first + count * page_size
    # The common case (a sequential scan) is recognised with C-level comparisons only,
    # and a range in O(1).
    if isinstance(offsets, range):
        if offsets.step == page_size:
            return [(first, count * page_size)]
    elif offsets[-1] == end - page_size and list(offsets) == list(range(first, end, page_size)):
        return [(first, count * page_size)]
    runs = []
    start = prev = first
    for offset in offsets[1:]:
        if offset != prev + page_size:
            runs.append((start, prev + page_size - start))
            start = offset
        prev = offset
    runs.append((start, prev + page_size - start))
    return runs


def run_offsets(runs: list[Run], page_size: int) -> Sequence[int]:
    """The offsets of the pages of ``runs``, in order (the inverse of :func:`page_runs`)."""
    if len(runs) == 1:
        start, length = runs[0]
        return range(start, start + length, page_size)
    return list(itertools.chain.from_iterable(range(s, s + n, page_size) for s, n in runs))


def _append(runs: list[Run], start: int, length: int) -> None:
    # Pages that follow the previous run extend it.
    if runs:
        last, last_length = runs[-1]
        if last + last_length == start:
            runs[-1] = (last, last_length + length)
            return
    runs.append((start, length))


def split_zero_runs(
    view: memoryview, runs: list[Run], page_size: int
) -> tuple[list[Run], list[Run]]:
    """Split runs of pages into (normal, zero) runs by the pages' content in ``view``,
    keeping their order.

    Whole runs are compared against zeros first (memcmp speed). In a run that is not all
    zero, only pages whose first byte is zero can be zero pages: one strided read of the
    first bytes finds them (pages of random data cost nothing each), and each stretch of
    such pages is compared at once.
    """
    normal: list[Run] = []
    zero: list[Run] = []
    is_zero = ZEROS.startswith
    for start, length in runs:
        run = view[start : start + length]
        if is_zero(run):
            _append(zero, start, length)
            continue
        done = start
        # Only pages whose first byte is zero can be zero pages; each stretch of such
        # pages is compared in one go, and page by page only when it is mixed.
        for stretch in _ZERO_BYTES.finditer(run[::page_size].tobytes()):
            first = start + stretch.start() * page_size
            end = start + stretch.end() * page_size
            if first > done:
                _append(normal, done, first - done)
            if is_zero(view[first:end]):
                _append(zero, first, end - first)
            else:
                for page in range(first, end, page_size):
                    is_page_zero = is_zero(view[page : page + page_size])
                    _append(zero if is_page_zero else normal, page, page_size)
            done = end
        if start + length > done:
            _append(normal, done, start + length - done)
    return normal, zero
