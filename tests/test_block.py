"""RAM blocks and the receiver's block table."""

from __future__ import annotations

import array
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import trio_multifd as m
from trio_multifd import _block
from trio_multifd._block import BlockTable, make_present

from .helpers import small_tmpfs, system_4k_pages


def header(name: str = "a", offsets: tuple[int, ...] = (0,)) -> m.PacketHeader:
    return m.PacketHeader(
        flags=0,
        pages_alloc=128,
        normal_pages=len(offsets),
        next_packet_size=4096 * len(offsets),
        packet_num=9,
        block_name=name,
        offsets=offsets,
    )


@pytest.mark.parametrize(
    "buffer",
    [
        bytes(8192),
        bytearray(8192),
        memoryview(bytearray(8192)),
        np.zeros(2048, dtype=np.uint32),
        array.array("Q", bytes(8192)),
    ],
)
def test_block_accepts_any_contiguous_buffer(buffer: object) -> None:
    block = m.RAMBlock("a", buffer)
    assert block.size == 8192 and block.page_count == 2
    assert block.view.format == "B" and block.view.ndim == 1


def test_block_over_mmap_writes_through() -> None:
    with mmap.mmap(-1, 8192) as mem:
        block = m.RAMBlock("a", mem)
        block.view[4096] = 7
        assert mem[4096] == 7
        block.view.release()


def test_block_of_bytes_is_read_only() -> None:
    assert not m.RAMBlock("a", bytes(4096)).writable
    assert m.RAMBlock("a", bytearray(4096)).writable


@pytest.mark.parametrize("name", ["", "x" * 256, "a\0b", "é" * 128])
def test_block_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="block name"):
        m.RAMBlock(name, bytearray(4096))


def test_block_name_of_bytes_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="name must be a str, got bytes"):
        m.RAMBlock(b"ram", bytearray(4096))  # type: ignore[arg-type]


@pytest.mark.parametrize("page_size", [4096.0, "4096", True])
def test_block_names_a_page_size_of_the_wrong_type_with_a_type_error(page_size: object) -> None:
    with pytest.raises(TypeError, match="page_size must be an integer"):
        m.RAMBlock("a", bytearray(8192), page_size=page_size)  # type: ignore[arg-type]


def test_block_takes_numpys_integer_as_page_size_and_keeps_an_int() -> None:
    block = m.RAMBlock("a", bytearray(8192), page_size=np.int64(4096))  # type: ignore[arg-type]
    assert type(block.page_size) is int
    assert block.page_count == 2


def test_block_name_of_255_bytes_is_accepted() -> None:
    assert m.RAMBlock("x" * 255, bytearray(4096)).name == "x" * 255


def test_block_rejects_non_contiguous_buffer() -> None:
    strided = np.zeros((64, 128), dtype=np.uint8)[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        m.RAMBlock("a", strided)


def test_block_rejects_length_not_a_multiple_of_page_size() -> None:
    with pytest.raises(ValueError, match="multiple of page_size"):
        m.RAMBlock("a", bytearray(5000))


def test_block_rejects_non_buffer() -> None:
    with pytest.raises(TypeError, match="buffer protocol"):
        m.RAMBlock("a", [1, 2, 3])


@pytest.mark.parametrize("flag", [False, True])
def test_a_bool_is_not_an_offset(flag: bool) -> None:
    with pytest.raises(TypeError, match="an offset must be an integer, got bool"):
        m.RAMBlock("a", bytearray(8192)).check_offset(flag)


def test_check_offset_wants_aligned_offsets_inside() -> None:
    block = m.RAMBlock("a", bytearray(8192))
    block.check_offset(4096)
    for bad in (-4096, 8192, 100):
        with pytest.raises(ValueError, match="page-aligned"):
            block.check_offset(bad)


def test_table_resolves_a_known_block() -> None:
    a, b = m.RAMBlock("a", bytearray(8192)), m.RAMBlock("b", bytearray(4096))
    table = BlockTable([a, b], page_size=4096)
    assert table.resolve(header("b")) == (b, [(0, 4096)], [])
    assert table.resolve(header("a", (4096, 0))) == (a, [(4096, 4096), (0, 4096)], [])


def test_table_rejects_unknown_block_naming_channel() -> None:
    table = BlockTable([m.RAMBlock("a", bytearray(4096))], page_size=4096)
    with pytest.raises(m.UnknownBlockError, match=r"channel 2, packet 9: .*'zz'") as info:
        table.resolve(header("zz"), channel=2)
    assert info.value.field == "ramblock"


def test_table_rejects_offset_past_last_page() -> None:
    table = BlockTable([m.RAMBlock("a", bytearray(8192))], page_size=4096)
    with pytest.raises(m.OffsetError, match="beyond") as info:
        table.resolve(header("a", (0, 8192)), channel=0)
    assert (info.value.value, info.value.limit) == (8192, 4096)


def test_an_offset_into_an_empty_block_says_it_has_no_pages() -> None:
    table = BlockTable([m.RAMBlock("a", bytearray())], page_size=4096)
    with pytest.raises(m.OffsetError, match="beyond block 'a': it has no pages") as info:
        table.resolve(header("a", (0,)), channel=0)
    assert (info.value.value, info.value.limit) == (0, None)


def test_table_rejects_unaligned_offset() -> None:
    # QEMU has no alignment check; an unaligned page would straddle two pages.
    table = BlockTable([m.RAMBlock("a", bytearray(8192))], page_size=4096)
    with pytest.raises(m.OffsetError, match="not aligned") as info:
        table.resolve(header("a", (0, 2048)), channel=1)
    assert info.value.value == 2048


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ([], "at least one block"),
        ([m.RAMBlock("a", bytes(4096))], "read-only"),
        ([m.RAMBlock("a", bytearray(8192), page_size=8192)], "page_size"),
        ([m.RAMBlock("a", bytearray(4096)), m.RAMBlock("a", bytearray(4096))], "two blocks"),
    ],
)
def test_table_rejects_bad_block_sets(blocks: list[m.RAMBlock], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BlockTable(blocks, page_size=4096)


def test_table_checks_zero_page_offsets_too() -> None:
    table = BlockTable([m.RAMBlock("a", bytearray(8192))], page_size=4096)
    packet = m.PacketHeader(
        flags=0,
        pages_alloc=128,
        normal_pages=1,
        next_packet_size=4096,
        packet_num=3,
        zero_pages=2,
        block_name="a",
        offsets=(0, 4096, 8192),
    )
    with pytest.raises(m.OffsetError, match="beyond") as info:
        table.resolve(packet, channel=0)
    assert info.value.value == 8192


def test_table_returns_runs_of_normal_and_zero_pages() -> None:
    table = BlockTable([m.RAMBlock("a", bytearray(8 * 4096))], page_size=4096)
    packet = m.PacketHeader(
        flags=0,
        pages_alloc=128,
        normal_pages=3,
        next_packet_size=3 * 4096,
        packet_num=3,
        zero_pages=2,
        block_name="a",
        offsets=(0, 4096, 5 * 4096, 2 * 4096, 3 * 4096),
    )
    _, normal, zero = table.resolve(packet)
    assert normal == [(0, 8192), (5 * 4096, 4096)]
    assert zero == [(2 * 4096, 8192)]


@pytest.fixture
def cut_mapping(tmp_path: Path) -> Iterator[mmap.mmap]:
    """A shared mapping of a 4-page file, cut to 1 page after it was mapped."""
    with open(tmp_path / "f", "w+b") as file:
        file.write(bytes(range(256)) * 64)
        file.flush()
        mapping = mmap.mmap(file.fileno(), 4 * 4096)
        file.truncate(4096)
        # Not closed here: a test's exception info may still pin the block's view.
        yield mapping


@system_4k_pages
@pytest.mark.parametrize("write", [False, True])
def test_pages_past_the_end_of_a_mapped_file_are_an_error_not_a_sigbus(
    cut_mapping: mmap.mmap, write: bool
) -> None:
    block = m.RAMBlock("a", cut_mapping)
    make_present(block, [(0, 4096)], write=write)  # still in the file
    with pytest.raises(m.MappingError) as caught:
        make_present(block, [(0, 4096), (8192, 8192)], write=write)
    assert str(caught.value) == (
        f"block 'a': cannot {'write' if write else 'read'} pages 0x2000..0x4000 of its"
        " mapped file: "
        + (
            "its file system is full or the file was truncated"
            if write
            else "the file was truncated, or its file system is full (tmpfs gives a hole a"
            " page when it is read)"
        )
    )
    assert block.view[:4096] == bytes(range(256)) * 16


@system_4k_pages
def test_pages_smaller_than_the_systems_are_faulted_in_by_whole_system_pages(
    cut_mapping: mmap.mmap,
) -> None:
    block = m.RAMBlock("a", cut_mapping, page_size=512)
    make_present(block, [(3584, 512)], write=False)  # the first system page's last
    with pytest.raises(m.MappingError, match=r"pages 0x1200\.\.0x1400 "):
        make_present(block, [(4608, 512)], write=False)  # inside the second, cut off


@system_4k_pages
def test_a_kernel_without_populate_leaves_the_plain_mapping(
    cut_mapping: mmap.mmap, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An advice the kernel does not know is refused with EINVAL, as 22 and 23 are before
    # Linux 5.14.
    monkeypatch.setattr(_block, "_MADV_POPULATE_READ", 0x7FFF)
    block = m.RAMBlock("a", cut_mapping)
    make_present(block, [(8192, 4096)], write=False)
    assert block._mapped_at is None
    make_present(block, [(8192, 4096)], write=True)  # no longer tried at all


def test_a_block_whose_view_was_released_is_not_faulted_in(cut_mapping: mmap.mmap) -> None:
    # Its mapping may be gone and the address another mapping's by now.
    block = m.RAMBlock("a", cut_mapping)
    block.view.release()
    with pytest.raises(ValueError, match="released"):
        make_present(block, [(0, 4096)], write=True)


@system_4k_pages
def test_a_slice_of_a_mapped_file_is_guarded_at_its_own_offsets(
    cut_mapping: mmap.mmap,
) -> None:
    # A memoryview slice starting half-way into the file's first page: its offset 2560
    # is byte 3072 of the file, the first page's last 1 KiB; its offset 3584 is inside
    # the second, cut off.
    block = m.RAMBlock("a", memoryview(cut_mapping)[512 : 512 + 3 * 4096], page_size=512)
    make_present(block, [(2560, 1024)], write=True)
    with pytest.raises(m.MappingError, match=r"pages 0xe00\.\.0x1000 "):
        make_present(block, [(3584, 512)], write=True)


@pytest.mark.parametrize("buffer", [bytearray(8192), bytes(8192)], ids=["bytearray", "bytes"])
def test_heap_buffers_are_not_faulted_in(buffer: bytes | bytearray) -> None:
    assert m.RAMBlock("a", buffer)._mapped_at is None


@pytest.mark.parametrize("flags", [mmap.MAP_PRIVATE, mmap.MAP_SHARED])
def test_anonymous_mappings_are_not_faulted_in(flags: int) -> None:
    # Nothing can cut them short; faulting them in would only cost time.
    assert m.RAMBlock("a", mmap.mmap(-1, 8192, flags=flags))._mapped_at is None


def test_a_memfd_mapping_is_guarded_as_a_file() -> None:
    # Anonymous to the eye, but a file that can be cut short (ftruncate) like any other.
    fd = os.memfd_create("block")
    try:
        os.ftruncate(fd, 2 * 4096)
        block = m.RAMBlock("a", mmap.mmap(fd, 2 * 4096))
        os.ftruncate(fd, 4096)
    finally:
        os.close(fd)
    make_present(block, [(0, 4096)], write=True)
    with pytest.raises(m.MappingError, match=r"the file was truncated$"):
        make_present(block, [(4096, 4096)], write=True)


def test_a_hole_read_on_a_full_tmpfs_is_a_mapping_error_that_names_the_full_file_system(
    tmp_path: Path,
) -> None:
    # tmpfs gives a hole a page when a shared mapping reads it: no truncation involved.
    with small_tmpfs(tmp_path) as small:
        size = 2 << 20  # twice the file system
        with open(small / "sparse", "w+b") as file:
            file.truncate(size)
            mapping = mmap.mmap(file.fileno(), size, prot=mmap.PROT_READ)
        block = m.RAMBlock("a", mapping)
        try:
            with pytest.raises(m.MappingError) as fault:
                make_present(block, [(0, size)], write=False)
        finally:
            block.view.release()
            mapping.close()  # the file system is unmounted next
    assert str(fault.value) == (
        "block 'a': cannot read pages 0x0..0x200000 of its mapped file: the file was"
        " truncated, or its file system is full (tmpfs gives a hole a page when it is read)"
    )
