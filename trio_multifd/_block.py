"""RAM blocks (named buffers of pages) and the receiver's table that checks packets
against them before any byte is written."""

from __future__ import annotations

import errno
import mmap
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn, SupportsIndex, final

import attrs
import cffi  # type: ignore[import-untyped]

from ._errors import MappingError, OffsetError, TransportError, UnknownBlockError
from ._pages import page_runs
from ._wire import BLOCK_NAME_SIZE, PacketHeader, as_integer, page_count_for

__all__ = ["BlockTable", "RAMBlock", "index_of", "make_present", "raise_mapping_fault"]

# Linux 5.14's madvise advice (Python 3.11's mmap module does not name them): fault the
# range in now, and report with an error what touching it would have made a SIGBUS.
_MADV_POPULATE_READ = 22
_MADV_POPULATE_WRITE = 23

# madvise through CFFI rather than mmap.madvise: the call releases the GIL. Populating a
# packet's pages of a fresh file takes ~0.5 ms in the kernel, which with the GIL held
# stalls every other thread of the transfer (the other decoding thread included).
_ffi = cffi.FFI()
_ffi.cdef("int madvise(void *addr, size_t length, int advice);")
# Linux only (see RAMBlock): dlopen(None) is the process's own symbols there.
_madvise: Any = _ffi.dlopen(None).madvise if sys.platform == "linux" else None


def index_of(offset: object) -> int:
    """Return ``offset`` as an ``int``; anything with ``__index__`` (numpy's integers)
    qualifies, floats and bools do not.

    Raises:
        TypeError: ``offset`` is not an integer, or is a ``bool``.
    """
    return as_integer("an offset", offset)


def _as_bytes_view(buffer: object) -> memoryview:
    try:
        view = memoryview(buffer)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"buffer must support the buffer protocol, got {type(buffer).__name__}"
        ) from None
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


@final
@attrs.define(eq=False, init=False)
class RAMBlock:
    """A named buffer of pages: what a multifd transfer moves.

    Args:
        name: 1 to 255 bytes of UTF-8 without NUL; the sender's and the receiver's
            blocks are matched by name.
        buffer: Any C-contiguous buffer (``bytes``, ``bytearray``, ``mmap``, a numpy
            array, a ``memoryview``). Its length must be a multiple of ``page_size``. The
            receiver's must be writable. Not copied: the block reads or writes it in place.
        page_size: Bytes per page: a power of two from 512 to 512 KiB.
        zeroed: Receiver only: the buffer is known to be all zero (a fresh ``mmap``, a
            sparse file), so a zero page is written only if the page was written before
            in this transfer. Keeps sparse files sparse and all-zero images cheap; over
            a shared file mapping, also advise ``mmap.MADV_RANDOM`` on it (see
            :doc:`methods`), else the kernel's read-ahead may allocate the holes around
            the pages written.

    A buffer whose memory is a mapped file (an ``mmap`` of a file, a ``memoryview`` or
    slice of one, a numpy ``memmap``: whatever the kernel's list of the process's
    mappings shows as a file's; not anonymous memory) has its pages of each packet
    faulted in before they are read or written (``MADV_POPULATE_READ`` /
    ``MADV_POPULATE_WRITE``, Linux 5.14 and later), so that a file truncated under the
    mapping, or a full file system, is found there and raised as a
    :class:`~trio_multifd.MappingError` rather than a ``SIGBUS`` that kills the process.
    That costs ~10-25 us per packet when its pages are already mapped, and saves a fault
    per page when they are not.
    A truncation between that and the access itself is not covered (see
    :doc:`failure-modes`). A kernel without them gets the plain mapping.

    Raises:
        TypeError: ``name`` is not a str, ``page_size`` not an integer, or ``buffer``
            does not support the buffer protocol.
        ValueError: A bad name, page size or buffer length.
    """

    name: str
    """The block's name, matched between sender and receiver."""
    view: memoryview
    """The block's bytes as a flat ``memoryview`` of unsigned bytes."""
    page_size: int
    """Bytes per page."""
    zeroed: bool
    """Whether the receiver may assume the buffer starts all zero."""
    # Where a buffer over a mapped file starts in memory; None for any other buffer.
    _mapped_at: int | None = attrs.field(repr=False)

    def __init__(
        self, name: str, buffer: object, *, page_size: int = 4096, zeroed: bool = False
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        encoded = name.encode()
        if not encoded or len(encoded) >= BLOCK_NAME_SIZE or b"\0" in encoded:
            raise ValueError(f"block name must be 1..255 bytes of UTF-8 without NUL: {name!r}")
        # Stored as a plain int: numpy's integers are taken, and compared on every queue.
        page_size = as_integer("page_size", page_size)
        page_count_for(page_size)
        view = _as_bytes_view(buffer)
        if len(view) % page_size:
            raise ValueError(
                f"block {name!r}: length {len(view)} is not a multiple of page_size {page_size}"
            )
        mapped_at = None
        # The advice is Linux's: elsewhere 22 and 23 mean something else or nothing.
        if sys.platform == "linux" and len(view):
            # Only the address is kept: the view pins the mapping while the block is used.
            with _ffi.from_buffer(view) as data:
                address = int(_ffi.cast("uintptr_t", data))
            if _maps_a_file(address):
                mapped_at = address
        self.__attrs_init__(
            name=name, view=view, page_size=page_size, zeroed=zeroed, mapped_at=mapped_at
        )

    @property
    def size(self) -> int:
        """The block's length in bytes."""
        return len(self.view)

    @property
    def page_count(self) -> int:
        """How many pages the block holds."""
        return len(self.view) // self.page_size

    @property
    def writable(self) -> bool:
        """Whether the buffer can be written (a receiver's must be)."""
        return not self.view.readonly

    def check_offset(self, offset: SupportsIndex) -> None:
        """Raise unless ``offset`` is a page-aligned offset in the block.

        Raises:
            TypeError: ``offset`` is not an integer (``int`` or anything with
                ``__index__``, such as numpy's integers), or is a ``bool``.
            ValueError: ``offset`` is not page-aligned or not inside the block.
        """
        value = index_of(offset)
        if value % self.page_size or not 0 <= value < len(self.view):
            raise ValueError(
                f"block {self.name!r}: offset {value} is not a page-aligned offset below"
                f" {len(self.view)}"
            )


def _maps_a_file(address: int) -> bool:
    """Whether the mapping at ``address`` may lose pages: anything but anonymous memory.

    Anonymous memory has no file to be cut short nor file system to fill, and faulting
    its pages in costs ~10-25 us per packet once they are there. It is told apart by the
    kernel's own list (inode 0, or shared anonymous memory's "/dev/zero (deleted)"), not
    by ``mmap.size()``, which also fails for a file mapped with ``trackfd=False``
    (Python 3.13). When the list cannot say, the pages are faulted in.
    """
    try:
        with open("/proc/self/maps", "rb") as maps:
            for line in maps:
                span, _perms, _offset, _device, inode, *path = line.split(maxsplit=5)
                start, end = (int(bound, 16) for bound in span.split(b"-"))
                if start <= address < end:
                    name = path[0].strip() if path else b""
                    return inode != b"0" and name != b"/dev/zero (deleted)"
    except (OSError, ValueError):
        pass
    return True


def make_present(block: RAMBlock, runs: Iterable[tuple[int, int]], *, write: bool) -> None:
    """Fault in ``runs`` (``(start, length)`` in bytes) of a block over a mapped file,
    for reading or for writing, before the engine touches them; nothing for other blocks.

    Raises:
        MappingError: The kernel cannot back a page: past the end of the mapped file
            (truncated), or no room for it on the file system.
    """
    mapped_at = block._mapped_at
    if mapped_at is None:
        return
    # The view pins the mapping: while it lives the address is the mapping's. Once
    # released (ValueError here, as any use of the block would raise), the address may
    # belong to another mapping, which madvise must not touch.
    block.view.nbytes  # noqa: B018
    advice = _MADV_POPULATE_WRITE if write else _MADV_POPULATE_READ
    mask = mmap.PAGESIZE - 1
    for start, length in runs:
        # A buffer need not start on a system page, nor its pages be as large: the
        # range grows to whole system pages.
        address = mapped_at + start
        aligned = address & ~mask
        while _madvise(_ffi.cast("void *", aligned), address + length - aligned, advice):
            error = _ffi.errno
            if error in (errno.EAGAIN, errno.EINTR):
                continue
            if error == errno.EINVAL:
                # A kernel before 5.14, or a mapping it cannot populate: as before.
                block._mapped_at = None
                return
            raise _mapping_error(block, start, length, write, error)


def raise_mapping_fault(
    block: RAMBlock, runs: Sequence[tuple[int, int]], *, write: bool, exc: TransportError
) -> NoReturn:
    """Re-raise ``exc``, from a socket call that moved ``runs`` of ``block`` straight
    between its pages and the kernel, as the :class:`MappingError` it stands for when its
    cause is EFAULT (same channel, ``exc`` as its cause); else as it is.

    A page cut from a mapped file after :func:`make_present` is not a SIGBUS inside a
    system call: the kernel's copy fails, and the call with EFAULT. Called from an
    ``except`` clause, so the packets that fail nothing pay nothing.
    """
    try:
        cause = exc.__cause__
        if (
            not runs
            or block._mapped_at is None
            or not isinstance(cause, OSError)
            or cause.errno != errno.EFAULT
        ):
            raise exc
        start = runs[0][0]
        length = runs[-1][0] + runs[-1][1] - start
        raise _mapping_error(
            block, start, length, write, errno.EFAULT, channel=exc.channel
        ) from exc
    finally:
        # This frame is in the traceback of what it raises: holding exc would make a
        # reference cycle, keeping the caller's frames (a channel's buffers) until the
        # cyclic collector runs.
        del exc


def _mapping_error(
    block: RAMBlock, start: int, length: int, write: bool, error: int, channel: int | None = None
) -> MappingError:
    if error == errno.EFAULT:
        cause = (
            "its file system is full or the file was truncated"
            if write
            # tmpfs gives a hole a page when a shared mapping reads it: a full tmpfs
            # fails a read too.
            else "the file was truncated, or its file system is full (tmpfs gives a hole"
            " a page when it is read)"
        )
    else:
        cause = os.strerror(error)
    return MappingError(
        f"block {block.name!r}: cannot {'write' if write else 'read'} pages"
        f" {start:#x}..{start + length:#x} of its mapped file: {cause}",
        channel=channel,
    )


@final
class BlockTable:
    """The receiver's blocks by name; checks a packet's block and offsets.

    Raises:
        TypeError: A block is not a :class:`RAMBlock`.
        ValueError: No blocks, two blocks share a name, a block's page size differs
            from ``page_size``, or a buffer is read-only.
    """

    def __init__(self, blocks: Iterable[RAMBlock], *, page_size: int) -> None:
        self._blocks: dict[str, RAMBlock] = {}
        self._mask = page_size - 1
        for block in blocks:
            if not isinstance(block, RAMBlock):
                raise TypeError(f"blocks must be RAMBlock, got {type(block).__name__}")
            if block.name in self._blocks:
                raise ValueError(f"two blocks are named {block.name!r}")
            if block.page_size != page_size:
                raise ValueError(
                    f"block {block.name!r} has page_size {block.page_size}, the transfer"
                    f" uses {page_size}"
                )
            if not block.writable:
                raise ValueError(f"block {block.name!r} is read-only: a receiver writes to it")
            self._blocks[block.name] = block
        if not self._blocks:
            raise ValueError("a receiver needs at least one block")

    @property
    def blocks(self) -> tuple[RAMBlock, ...]:
        """The blocks, in the order given."""
        return tuple(self._blocks.values())

    def resolve(
        self, header: PacketHeader, *, channel: int | None = None
    ) -> tuple[RAMBlock, list[tuple[int, int]], list[tuple[int, int]]]:
        """Check a packet with pages against its block, before anything is written.

        Returns:
            The block, then the packet's normal and zero pages as runs ``(start, length
            in bytes)`` of contiguous pages in their order (see
            :func:`~trio_multifd._pages.page_runs`), each run inside the block.

        Raises:
            UnknownBlockError: No block has the packet's name.
            OffsetError: An offset is beyond the block or not page-aligned.
        """
        block = self._blocks.get(header.block_name)
        if block is None:
            raise UnknownBlockError(
                f"packet names unknown block {header.block_name!r}",
                field="ramblock",
                value=header.block_name,
                limit=sorted(self._blocks),
                channel=channel,
                packet_num=header.packet_num,
            )
        size = block.page_size
        split = header.normal_pages
        normal = page_runs(header.offsets[:split], size)
        zero = page_runs(header.offsets[split:], size)
        # A run's pages follow its start page by page: its start says whether they are
        # aligned, its end whether they are all inside the block. O(runs), not O(pages).
        end = len(block.view)
        for start, length in (*normal, *zero):
            if start & self._mask:
                raise OffsetError(
                    f"offset {start:#x} in block {block.name!r} is not aligned to the page"
                    f" size {size}",
                    field="offset",
                    value=start,
                    limit=size,
                    channel=channel,
                    packet_num=header.packet_num,
                )
            if start + length > end:
                # The run's first page past the end (start and end are page multiples).
                bad = max(start, end)
                last = f"the last page starts at {end - size:#x}" if end else "it has no pages"
                raise OffsetError(
                    f"offset {bad:#x} is beyond block {block.name!r}: {last}",
                    field="offset",
                    value=bad,
                    limit=end - size if end else None,
                    channel=channel,
                    packet_num=header.packet_num,
                )
        return block, normal, zero
