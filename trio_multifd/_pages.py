"""Page batches and the page-level helpers both sides share: runs of contiguous pages
and zero-page detection."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, final

import attrs

from ._wire import PACKET_SIZE

if TYPE_CHECKING:
    from ._block import RAMBlock

__all__ = ["ZEROS", "PageBatch", "page_runs", "split_zero_pages"]

_ZERO_BYTES = re.compile(b"\\x00+")

ZEROS = bytes(PACKET_SIZE)
"""One packet of zero bytes: compared against and copied from, never written."""


@final
@attrs.define(eq=False)
class PageBatch:
    """The pages queued for one packet: one block, up to ``page_count`` offsets.

    A fixed set of batches circulates between the sender's main side and its channel
    tasks (QEMU's batch swap), so no batch is allocated per packet.
    """

    block: RAMBlock | None = None
    offsets: list[int] = attrs.Factory(list)

    def clear(self) -> None:
        """Empty the batch for reuse (the list keeps its capacity)."""
        self.block = None
        self.offsets.clear()


def page_runs(offsets: tuple[int, ...] | list[int], page_size: int) -> list[tuple[int, int]]:
    """Group offsets, in their order, into runs ``(start, length in bytes)`` of pages
    that follow each other in memory, so each run moves as one buffer."""
    if not offsets:
        return []
    first = offsets[0]
    count = len(offsets)
    end = first + count * page_size
    # The common case (a sequential scan) is recognised with C-level comparisons only.
    if offsets[-1] == end - page_size and offsets == type(offsets)(range(first, end, page_size)):
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


def split_zero_pages(
    view: memoryview, offsets: list[int], page_size: int
) -> tuple[list[int], list[int]]:
    """Split ``offsets`` into (normal, zero) pages by their content in ``view``.

    Whole runs are compared against zeros first (memcmp speed). In a run that is not all
    zero, only pages whose first byte is zero can be zero pages: one strided read of the
    first bytes finds them (pages of random data cost nothing each), and each stretch of
    such pages is compared at once.
    """
    normal: list[int] = []
    zero: list[int] = []
    is_zero = ZEROS.startswith
    for start, length in page_runs(offsets, page_size):
        run = view[start : start + length]
        if is_zero(run):
            zero.extend(range(start, start + length, page_size))
            continue
        firsts = run[::page_size].tobytes()
        done = start
        # Only pages whose first byte is zero can be zero pages; each stretch of such
        # pages is compared in one go, and page by page only when it is mixed.
        for stretch in _ZERO_BYTES.finditer(firsts):
            first = start + stretch.start() * page_size
            end = start + stretch.end() * page_size
            normal.extend(range(done, first, page_size))
            if is_zero(view[first:end]):
                zero.extend(range(first, end, page_size))
            else:
                for page in range(first, end, page_size):
                    is_page_zero = is_zero(view[page : page + page_size])
                    (zero if is_page_zero else normal).append(page)
            done = end
        normal.extend(range(done, start + length, page_size))
    return normal, zero
