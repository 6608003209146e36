"""Compression methods: round trips, QEMU's framing and bytes, bombs, corruption, registry."""

from __future__ import annotations

import functools
import itertools
import os
import random
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from trio_multifd._errors import DecompressionError, UnsupportedCompressionError
from trio_multifd._methods import (
    Decoder,
    Encoder,
    Method,
    get_method,
    method_for_flag,
    methods,
    register_method,
    unregister_method,
)
from trio_multifd._methods._zstd import MAX_WINDOW_SIZE, _ZstdChunkerEncoder
from trio_multifd._wire import HANDSHAKE_SIZE, PACKET_SIZE, decode_packet_header, header_size

from . import captures

PAGE = 4096
PAGE_COUNT = PACKET_SIZE // PAGE
IMAGE_PAGES = 1024
BOMB_SIZE = 64 * 2**20

COMPRESSED = ["zlib", "zstd"]


def runs_of(buffer: bytearray | memoryview, pages: Sequence[int]) -> list[memoryview]:
    """The views of ``pages`` (sorted page indexes) grouped into contiguous runs."""
    view = memoryview(buffer)
    runs: list[memoryview] = []
    start = end = pages[0]
    for page in pages[1:]:
        if page != end + 1:
            runs.append(view[start * PAGE : (end + 1) * PAGE])
            start = page
        end = page
    runs.append(view[start * PAGE : (end + 1) * PAGE])
    return runs


def page_views(buffer: bytearray, pages: Sequence[int]) -> list[memoryview]:
    """One view per page: the finest grouping a decoder can be given."""
    view = memoryview(buffer)
    return [view[p * PAGE : (p + 1) * PAGE] for p in pages]


def fill_page(image: bytearray, page: int, rng: random.Random) -> None:
    """Give ``page`` new content: random, compressible or zero, like guest memory."""
    kind = rng.randrange(3)
    if kind == 0:
        data = rng.randbytes(PAGE)
    elif kind == 1:
        data = (b"page %08d %d " % (page, rng.randrange(1000)) * PAGE)[:PAGE]
    else:
        data = bytes(PAGE)
    image[page * PAGE : (page + 1) * PAGE] = data


def make_image(rng: random.Random) -> bytearray:
    image = bytearray(IMAGE_PAGES * PAGE)
    for page in range(IMAGE_PAGES):
        fill_page(image, page, rng)
    return image


def encode_pages(encoder: Encoder, image: bytearray, pages: Sequence[int]) -> bytes:
    return bytes(encoder.encode(runs_of(image, pages)))


def random_pages(rng: random.Random, count: int) -> list[int]:
    return sorted(rng.sample(range(IMAGE_PAGES), count))


@functools.cache
def zlib_bomb() -> bytes:
    """One zlib packet payload (a channel's first) that inflates to 64 MiB of zeros."""
    deflate = zlib.compressobj(9)
    zeros = bytes(2**20)
    parts = [deflate.compress(zeros) for _ in range(BOMB_SIZE // len(zeros))]
    return b"".join([*parts, deflate.flush(zlib.Z_SYNC_FLUSH)])


@functools.cache
def zstd_bomb() -> bytes:
    """One zstd packet payload (a channel's first) that decodes to 64 MiB of zeros."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = bytes(2**20)
    parts = [compressor.compress(zeros) for _ in range(BOMB_SIZE // len(zeros))]
    return b"".join([*parts, compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)])


BOMBS: dict[str, Callable[[], bytes]] = {"zlib": zlib_bomb, "zstd": zstd_bomb}


# -- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "level"),
    [("zlib", 0), ("zlib", 1), ("zlib", 6), ("zlib", 9), ("zstd", 0), ("zstd", 1), ("zstd", 9)],
)
def test_round_trip_over_many_packets_on_one_stream(name: str, level: int) -> None:
    rng = random.Random(f"{name}-{level}")
    method = get_method(name)
    encoder, decoder = method.new_encoder(level), method.new_decoder()
    source = make_image(rng)
    target = bytearray(len(source))
    counts = [1, PAGE_COUNT, 2, PAGE_COUNT - 1] + [rng.randint(1, PAGE_COUNT) for _ in range(16)]
    for packet, count in enumerate(counts):
        pages = random_pages(rng, count)
        payload = encode_pages(encoder, source, pages)
        assert len(payload) <= method.payload_bound(count * PAGE)
        # The decoder's grouping need not be the encoder's: every other packet gets one
        # view per page.
        runs = page_views(target, pages) if packet % 2 else runs_of(target, pages)
        decoder.decode_into(payload, runs)
        for page in pages:
            assert (
                target[page * PAGE : (page + 1) * PAGE] == source[page * PAGE : (page + 1) * PAGE]
            )
        # Pages change between rounds, as a running guest's do.
        for page in rng.sample(range(IMAGE_PAGES), 64):
            fill_page(source, page, rng)
    encoder.close()
    decoder.close()


@pytest.mark.parametrize("name", ["none", *COMPRESSED])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_any_grouping_of_the_pages_into_runs_decodes(name: str, data: st.DataObject) -> None:
    method = get_method(name)
    encoder, decoder = method.new_encoder(None), method.new_decoder()
    for _ in range(data.draw(st.integers(1, 3))):
        count = data.draw(st.integers(1, 16))
        seed = data.draw(st.integers(0, 2**32))
        # Every page distinct, so a page decoded into the wrong run shows; each page is
        # half a page twice over, so the compressing methods do compress.
        rng = random.Random(seed)
        source = bytearray(b"".join(rng.randbytes(PAGE // 2) * 2 for _ in range(count)))
        cuts = sorted(data.draw(st.sets(st.integers(1, count - 1))) if count > 1 else set())
        bounds = [0, *cuts, count]
        target = bytearray(len(source))
        view = memoryview(target)
        runs = [view[a * PAGE : b * PAGE] for a, b in itertools.pairwise(bounds)]
        decoder.decode_into(encoder.encode([memoryview(source)]), runs)
        assert target == source


def test_none_method_joins_and_copies() -> None:
    method = get_method("none")
    source = bytearray(random.Random(1).randbytes(3 * PAGE))
    payload = method.new_encoder(None).encode(runs_of(source, [0, 2]))
    assert payload == source[:PAGE] + source[2 * PAGE :]
    target = bytearray(3 * PAGE)
    method.new_decoder().decode_into(payload, runs_of(target, [0, 2]))
    assert target[:PAGE] == source[:PAGE]
    assert target[2 * PAGE :] == source[2 * PAGE :]
    assert target[PAGE : 2 * PAGE] == bytes(PAGE)


# -- QEMU's framing -----------------------------------------------------------------------


def capture_packets() -> Iterator[tuple[list[int], bytes]]:
    """The whole packets with pages in the zstd capture: (page offsets, payload)."""
    stream = memoryview(captures.load("zstd"))
    head = header_size(PAGE_COUNT)
    at = HANDSHAKE_SIZE
    while at + head <= len(stream):
        header = decode_packet_header(stream[at : at + head], page_count=PAGE_COUNT, channel=0)
        if not header.normal_pages:
            # QEMU reads a payload only with normal pages (next_packet_size may be stale).
            at += head
            continue
        if at + head + header.next_packet_size > len(stream):
            return
        assert header.compression == 0x4
        payload = bytes(stream[at + head : at + head + header.next_packet_size])
        yield list(header.offsets[: header.normal_pages]), payload
        at += head + header.next_packet_size


def test_one_decoder_decodes_every_page_of_the_real_qemu_zstd_capture() -> None:
    ram = bytearray(captures.GUEST_RAM_SIZE)
    decoder = get_method("zstd").new_decoder()
    seen: list[int] = []
    for offsets, payload in capture_packets():
        assert all(offset % PAGE == 0 for offset in offsets)
        decoder.decode_into(payload, runs_of(ram, [offset // PAGE for offset in offsets]))
        seen += offsets
    assert len(seen) == 3968
    assert len(set(seen)) == len(seen)
    for offset in seen:
        assert ram[offset : offset + PAGE] == captures.compressible_page(offset // PAGE), offset


def test_our_zstd_frame_header_is_qemus() -> None:
    """QEMU 7.2 at level 1 and our level-1 encoder start the channel's one frame alike."""
    _, qemu_first = next(capture_packets())
    pages = bytearray(b"".join(captures.compressible_page(i) for i in range(PAGE_COUNT)))
    ours = bytes(get_method("zstd").new_encoder(1).encode([memoryview(pages)]))
    # Magic, frame header descriptor (no content size, no checksum, no dictionary, not
    # single-segment) and window descriptor (512 KiB).
    assert ours[:6] == qemu_first[:6] == bytes.fromhex("28b52ffd0048")
    params = zstandard.get_frame_parameters(ours)
    assert params.content_size == zstandard.CONTENTSIZE_UNKNOWN
    assert not params.has_checksum


def qemu_send_prepare(name: str) -> Callable[[Sequence[memoryview]], bytes]:
    """QEMU's send_prepare loop, in Python: every page fed on its own with no flush, then
    the flush that QEMU asks for with the last page."""
    if name == "zlib":
        deflate = zlib.compressobj(1)

        def prepare(pages: Sequence[memoryview]) -> bytes:
            parts = [deflate.compress(page) for page in pages]
            return b"".join([*parts, deflate.flush(zlib.Z_SYNC_FLUSH)])

    else:
        cstream = zstandard.ZstdCompressor(level=1).compressobj()

        def prepare(pages: Sequence[memoryview]) -> bytes:
            parts = [cstream.compress(page) for page in pages]
            return b"".join([*parts, cstream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)])

    return prepare


@pytest.mark.parametrize("name", COMPRESSED)
def test_encoder_output_is_qemus_page_by_page_stream(name: str) -> None:
    """Byte for byte what QEMU's loop makes with the same library."""
    rng = random.Random(name)
    image = make_image(rng)
    encoder = get_method(name).new_encoder(1)
    prepare = qemu_send_prepare(name)
    for count in (1, 7, PAGE_COUNT, 40):
        pages = random_pages(rng, count)
        assert encode_pages(encoder, image, pages) == prepare(page_views(image, pages))


@pytest.mark.parametrize("level", [0, 3, 9, 19])
def test_zstd_encoder_compresses_at_its_level(level: int) -> None:
    # The same stream as zstandard's own objects at that level, and not the level-1 one.
    rng = random.Random(level)
    text = b"".join(b"page %d of a text-like image; " % i for i in range(PAGE_COUNT * PAGE // 24))
    image = bytearray(text[: IMAGE_PAGES * PAGE].ljust(IMAGE_PAGES * PAGE, b"."))
    encoder = get_method("zstd").new_encoder(level)
    reference = zstandard.ZstdCompressor(level=level).compressobj()
    level_one = zstandard.ZstdCompressor(level=1).compressobj()
    pages = random_pages(rng, PAGE_COUNT)
    views = page_views(image, pages)
    payload = encode_pages(encoder, image, pages)
    expected = b"".join(
        [*map(reference.compress, views), reference.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)]
    )
    baseline = b"".join(
        [*map(level_one.compress, views), level_one.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)]
    )
    assert payload == expected
    assert payload != baseline


@pytest.mark.parametrize("level", [1, 9])
def test_zstd_fallback_encoder_makes_the_same_stream(level: int) -> None:
    # Without zstandard's CFFI module the C backend's chunker encodes: the same bytes.
    rng = random.Random(level)
    image = make_image(rng)
    ours = get_method("zstd").new_encoder(level)
    fallback = _ZstdChunkerEncoder(level)
    for count in (PAGE_COUNT, 1, 33, 7, PAGE_COUNT):
        pages = random_pages(rng, count)
        assert encode_pages(ours, image, pages) == encode_pages(fallback, image, pages)


def test_zstd_encoder_refuses_to_encode_once_closed() -> None:
    encoder = get_method("zstd").new_encoder(1)
    encoder.close()
    encoder.close()
    with pytest.raises(ValueError, match="closed"):
        encoder.encode([memoryview(bytes(PAGE))])


def test_zstd_payloads_decode_with_a_plain_streaming_decoder() -> None:
    rng = random.Random(5)
    image = make_image(rng)
    encoder = get_method("zstd").new_encoder(1)
    plain = zstandard.ZstdDecompressor().decompressobj()
    for index, count in enumerate((PAGE_COUNT, 1, 33, PAGE_COUNT)):
        pages = random_pages(rng, count)
        payload = encode_pages(encoder, image, pages)
        # One frame per channel: only the first payload starts one.
        assert payload.startswith(zstandard.FRAME_HEADER) == (index == 0)
        assert plain.decompress(payload) == b"".join(runs_of(image, pages))


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_zlib_payloads_are_a_zlib_stream_cut_at_sync_flushes(level: int) -> None:
    rng = random.Random(level)
    image = make_image(rng)
    encoder = get_method("zlib").new_encoder(level)
    plain = zlib.decompressobj()
    for index, count in enumerate((PAGE_COUNT, 1, 33, PAGE_COUNT)):
        pages = random_pages(rng, count)
        payload = encode_pages(encoder, image, pages)
        if index == 0:
            # deflateInit's header: deflate with a 32 KiB window, then the level's hint.
            assert payload[0] == 0x78
            assert int.from_bytes(payload[:2], "big") % 31 == 0
        assert payload.endswith(b"\x00\x00\xff\xff")
        assert plain.decompress(payload) == b"".join(runs_of(image, pages))
        assert not plain.unconsumed_tail
        assert not plain.eof


def test_zlib_decoder_reads_a_stream_fed_page_by_page_like_qemu() -> None:
    rng = random.Random(3)
    image = make_image(rng)
    deflate = zlib.compressobj(1)
    decoder = get_method("zlib").new_decoder()
    target = bytearray(len(image))
    for count in (PAGE_COUNT, 2, 77):
        pages = random_pages(rng, count)
        views = page_views(image, pages)
        parts = [deflate.compress(page) for page in views]
        payload = b"".join([*parts, deflate.flush(zlib.Z_SYNC_FLUSH)])
        decoder.decode_into(payload, page_views(target, pages))
        assert [bytes(v) for v in page_views(target, pages)] == [bytes(v) for v in views]


# -- bounds -------------------------------------------------------------------------------

BOUND_COUNTS = [1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128]


@pytest.mark.parametrize(
    ("name", "level"), [("zlib", 0), ("zlib", 1), ("zlib", 9), ("zstd", 1), ("zstd", 3)]
)
def test_payload_bound_holds_for_incompressible_pages(name: str, level: int) -> None:
    method = get_method(name)
    rng = random.Random(f"bound-{name}-{level}")
    running = method.new_encoder(level)
    for count in BOUND_COUNTS:
        pages = memoryview(rng.randbytes(count * PAGE))
        bound = method.payload_bound(count * PAGE)
        # A channel's first payload also carries the stream's header.
        assert len(method.new_encoder(level).encode([pages])) <= bound
        assert len(running.encode([pages])) <= bound


@pytest.mark.parametrize("name", COMPRESSED)
def test_payload_bound_covers_the_libraries_worst_case_formulas(name: str) -> None:
    method = get_method(name)
    for n in [*range(0, 8 * PAGE, 97), *range(0, PACKET_SIZE + 1, PAGE)]:
        zlib_bound = n + (n >> 12) + (n >> 14) + (n >> 25) + 13
        zstd_bound = n + (n >> 8) + ((128 * 1024 - n) >> 11 if n < 128 * 1024 else 0)
        # Plus a stream header and a flush (zlib 2 + 5 bytes; zstd 18 + a block header
        # for each of at most five blocks).
        assert method.payload_bound(n) >= max(zlib_bound + 7, zstd_bound + 18 + 5 * 3)


def test_payload_bounds_of_none_and_negative_sizes() -> None:
    assert get_method("none").payload_bound(PACKET_SIZE) == PACKET_SIZE
    for method in methods().values():
        with pytest.raises(ValueError, match="negative"):
            method.payload_bound(-1)


# -- bombs --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMPRESSED)
def test_bomb_into_one_page_fails_in_bounded_memory(name: str) -> None:
    bomb = BOMBS[name]()
    assert len(bomb) < 100_000
    decoder = get_method(name).new_decoder()
    target = bytearray(PAGE)
    tracemalloc.start()
    try:
        with pytest.raises(DecompressionError) as caught:
            decoder.decode_into(bomb, [memoryview(target)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20
    error = caught.value
    assert error.field == "payload"
    assert error.limit == PAGE
    assert isinstance(error.value, int)
    # Decoding stopped at the first byte past the page.
    assert error.value == PAGE + 1


_RSS_SCRIPT = """
import zstandard
from trio_multifd._errors import DecompressionError
from trio_multifd._methods import get_method

zeros = bytes(2**20)
cstream = zstandard.ZstdCompressor(level=1).compressobj()
bomb = b"".join([cstream.compress(zeros) for _ in range(64)])
bomb += cstream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
del zeros

def peak():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

decoder = get_method("zstd").new_decoder()
page = memoryview(bytearray(4096))
before = peak()
try:
    decoder.decode_into(bomb, [page])
except DecompressionError:
    pass
else:
    raise SystemExit("the bomb was accepted")
bounded = peak() - before
# The control: an unbounded decode of the same bytes shows up in the same measure.
before = peak()
unbounded = len(zstandard.ZstdDecompressor().decompressobj().decompress(bomb))
print(bounded, peak() - before, unbounded)
"""


def memory_figures(script: str) -> list[int]:
    """The integers ``script`` prints, run in a fresh process: zstd's own buffers are
    invisible to tracemalloc, so these tests read /proc/self/status there."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux's /proc/self/status")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return [int(figure) for figure in result.stdout.split()]


def test_zstd_bomb_does_not_grow_the_resident_set() -> None:
    # The peak resident set (VmHWM) of a fresh process. Not getrusage's ru_maxrss: Linux
    # carries the parent's peak into it across exec, which would hide any growth below
    # pytest's own peak.
    bounded, unbounded_growth, unbounded = memory_figures(_RSS_SCRIPT)
    assert unbounded == BOMB_SIZE
    assert unbounded_growth > 32 * 2**20
    assert bounded < 8 * 2**20


_CLOSE_SCRIPT = """
import zstandard
from trio_multifd._methods import get_method

def resident():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024

# The largest window allowed, filled by 64 packets of four 128 KiB run-length blocks.
header = zstandard.FRAME_HEADER + bytes([0x00, 15 << 3])
packet = b"".join((2**17 << 3 | 1 << 1).to_bytes(3, "little") + bytes([i]) for i in range(4))
decoder = get_method("zstd").new_decoder()
pages = memoryview(bytearray(2**19))
before = resident()
for n in range(64):
    decoder.decode_into(header + packet if n == 0 else packet, [pages])
filled = resident()
decoder.close()
print(filled - before, resident() - before)
"""


def test_closing_a_zstd_decoder_frees_its_window_while_the_decoder_lives_on() -> None:
    # The receiver closes each channel's decoder, but a failed transfer's reference
    # cycles keep the decoder itself until the cyclic collector runs.
    filled, closed = memory_figures(_CLOSE_SCRIPT)
    assert filled > 24 * 2**20
    assert closed < 4 * 2**20


def test_a_closed_zstd_decoder_refuses_to_decode() -> None:
    decoder = get_method("zstd").new_decoder()
    decoder.close()
    with pytest.raises(ValueError, match="closed"):
        decoder.decode_into(zstd_frame(19, bytes(PAGE)), [memoryview(bytearray(PAGE))])


# -- corruption and wrong sizes -----------------------------------------------------------


def text_stream(name: str, seed: int, packets: int) -> tuple[list[list[int]], list[bytes]]:
    """A channel's first payloads and their pages, all compressible: damage then hits
    entropy-coded data rather than stored bytes."""
    rng = random.Random(seed)
    image = bytearray(IMAGE_PAGES * PAGE)
    for page in range(IMAGE_PAGES):
        text = b"page %08d %d " % (page, rng.randrange(1000))
        image[page * PAGE : (page + 1) * PAGE] = (text * PAGE)[:PAGE]
    encoder = get_method(name).new_encoder(1)
    page_lists = [random_pages(rng, rng.randint(1, PAGE_COUNT)) for _ in range(packets)]
    return page_lists, [encode_pages(encoder, image, pages) for pages in page_lists]


def decode_or_reject(decoder: Decoder, payload: bytes, pages: Sequence[int]) -> bool:
    """Decode into a scratch target; False for a DecompressionError, nothing else."""
    target = bytearray(IMAGE_PAGES * PAGE)
    try:
        decoder.decode_into(payload, runs_of(target, pages))
    except DecompressionError as error:
        rejected = error
    else:
        return True
    assert rejected.field == "payload"
    return False


@pytest.mark.parametrize("name", COMPRESSED)
def test_random_bytes_raise_decompression_error(name: str) -> None:
    rng = random.Random(name)
    for size in (0, 1, 5, 100, 4096, 70_000):
        decoder = get_method(name).new_decoder()
        assert not decode_or_reject(decoder, rng.randbytes(size), [0])


@pytest.mark.parametrize("name", COMPRESSED)
def test_bit_flips_raise_nothing_but_decompression_error(name: str) -> None:
    page_lists, payloads = text_stream(name, 11, 3)
    rng = random.Random(name)
    rejected = 0
    for _ in range(60):
        decoder = get_method(name).new_decoder()
        for pages, payload in zip(page_lists[:2], payloads[:2], strict=True):
            assert decode_or_reject(decoder, payload, pages)
        damaged = bytearray(payloads[2])
        bit = rng.randrange(len(damaged) * 8)
        damaged[bit // 8] ^= 1 << (bit % 8)
        # Without a checksum a flipped literal decodes to other bytes of the right size.
        rejected += not decode_or_reject(decoder, bytes(damaged), page_lists[2])
    assert rejected > 0


@pytest.mark.parametrize("name", COMPRESSED)
def test_truncated_payloads_raise_decompression_error(name: str) -> None:
    rng = random.Random(2)
    pages = list(range(8))
    source = bytearray(rng.randbytes(8 * PAGE))
    payload = encode_pages(get_method(name).new_encoder(1), source, pages)
    # zlib's payload ends with the flush's empty block: cut into the pages' bytes.
    for end in (0, 1, len(payload) // 2, len(payload) - 6):
        decoder = get_method(name).new_decoder()
        assert not decode_or_reject(decoder, payload[:end], pages)


@pytest.mark.parametrize("name", ["none", *COMPRESSED])
def test_payload_of_the_wrong_size_raises_with_sizes(name: str) -> None:
    method = get_method(name)
    source = bytearray(random.Random(4).randbytes(2 * PAGE))
    payload = bytes(method.new_encoder(None).encode([memoryview(source)]))
    too_many = bytearray(3 * PAGE)
    with pytest.raises(DecompressionError) as short:
        method.new_decoder().decode_into(payload, [memoryview(too_many)])
    assert (short.value.field, short.value.value, short.value.limit) == (
        "payload",
        2 * PAGE,
        3 * PAGE,
    )
    too_few = bytearray(PAGE)
    with pytest.raises(DecompressionError) as surplus:
        method.new_decoder().decode_into(payload, [memoryview(too_few)])
    assert surplus.value.limit == PAGE
    assert isinstance(surplus.value.value, int)
    assert surplus.value.value > PAGE


@pytest.mark.parametrize("name", COMPRESSED)
def test_a_decoder_is_unusable_after_an_error(name: str) -> None:
    page_lists, payloads = text_stream(name, 8, 2)
    decoder = get_method(name).new_decoder()
    assert not decode_or_reject(decoder, payloads[0][: len(payloads[0]) // 2], page_lists[0])
    runs = runs_of(bytearray(IMAGE_PAGES * PAGE), page_lists[1])
    with pytest.raises(DecompressionError, match="earlier error") as refused:
        decoder.decode_into(payloads[1], runs)
    assert refused.value.limit == sum(len(run) for run in runs)


def test_zlib_output_of_a_match_past_the_pages_is_a_surplus() -> None:
    # One page plus 553 bytes of a long match: inflate stops at the page with the
    # match's tail held back inside it, to come out with the next packet's first bytes.
    deflate = zlib.compressobj(9)
    payload = deflate.compress(b"a" * (PAGE + 553)) + deflate.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(DecompressionError) as surplus:
        get_method("zlib").new_decoder().decode_into(payload, [memoryview(bytearray(PAGE))])
    assert surplus.value.limit == PAGE
    assert isinstance(surplus.value.value, int)
    assert surplus.value.value > PAGE


def test_zlib_payload_that_ends_the_stream_is_rejected() -> None:
    source = bytes(random.Random(6).randbytes(PAGE))
    deflate = zlib.compressobj(1)
    # Even with what looks like a sync flush after the stream's end.
    payload = deflate.compress(source) + deflate.flush(zlib.Z_FINISH) + b"\x00\x00\xff\xff"
    with pytest.raises(DecompressionError, match="ends the channel's stream"):
        get_method("zlib").new_decoder().decode_into(payload, [memoryview(bytearray(PAGE))])


def test_zlib_stream_asking_for_a_preset_dictionary_is_named() -> None:
    # inflate stops at the header's FDICT bit with a bare "Error 2 while decompressing".
    deflate = zlib.compressobj(1, zdict=b"dictionary" * 10)
    payload = deflate.compress(random.Random(7).randbytes(PAGE)) + deflate.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(DecompressionError, match=r"preset dictionary \(FDICT\)") as caught:
        get_method("zlib").new_decoder().decode_into(payload, [memoryview(bytearray(PAGE))])
    assert (caught.value.field, caught.value.limit) == ("payload", PAGE)


@pytest.mark.parametrize("name", COMPRESSED)
@pytest.mark.parametrize("damage", ["a stray byte", "the end cut off"])
def test_a_payload_that_does_not_end_where_qemu_flushes_fails_on_its_own_packet(
    name: str, damage: str
) -> None:
    # A stray byte after the flush starts a block that yields nothing yet: without the
    # check, the packet passed and the next one, well formed, failed in its place.
    rng = random.Random(12)
    image = bytearray(rng.randbytes(4 * PAGE))
    encoder = get_method(name).new_encoder(1)
    first, second = (encode_pages(encoder, image, pages) for pages in ([0, 1], [2, 3]))
    damaged = first + b"\x00" if damage == "a stray byte" else first[:-1]
    decoder = get_method(name).new_decoder()
    target = bytearray(4 * PAGE)
    with pytest.raises(DecompressionError, match=f"{name} payload .*end"):
        decoder.decode_into(damaged, runs_of(target, [0, 1]))
    assert target == bytes(4 * PAGE)  # checked before a byte is decoded
    # The undamaged stream decodes, the second packet included.
    decoder = get_method(name).new_decoder()
    decoder.decode_into(first, runs_of(target, [0, 1]))
    decoder.decode_into(second, runs_of(target, [2, 3]))
    assert target == image


@pytest.mark.parametrize(
    "cut",
    [
        # A dynamic block's header cut after 48 bits whose last four bytes read 00 00 ff ff:
        # the pages decode in full, but the stream stopped inside a block.
        b"\x04\x00",
        # The first 3 bytes of a real dynamic block's header, then 00 00 ff ff: what would
        # end the stream there (an empty last block, the trailer) is no valid header.
        bytes.fromhex("ecd8c9"),
    ],
)
def test_a_zlib_payload_cut_in_a_block_header_that_reads_like_a_flush_fails_on_its_own(
    cut: bytes,
) -> None:
    image = random.Random(13).randbytes(2 * PAGE)
    deflate = zlib.compressobj(1)
    first, second = (
        deflate.compress(image[start : start + PAGE]) + deflate.flush(zlib.Z_SYNC_FLUSH)
        for start in (0, PAGE)
    )
    decoder = get_method("zlib").new_decoder()
    target = bytearray(2 * PAGE)
    with pytest.raises(DecompressionError, match="zlib payload ends inside a block"):
        decoder.decode_into(first + cut + b"\x00\x00\xff\xff", runs_of(target, [0]))
    assert target == bytes(2 * PAGE)  # checked before a byte is written
    # The undamaged stream decodes, the second packet included.
    decoder = get_method("zlib").new_decoder()
    decoder.decode_into(first, runs_of(target, [0]))
    decoder.decode_into(second, runs_of(target, [1]))
    assert target == image


def test_a_zstd_channel_whose_first_payload_is_no_frame_is_rejected() -> None:
    raw_block = (PAGE << 3).to_bytes(3, "little") + bytes(PAGE)
    with pytest.raises(DecompressionError, match="does not start with a zstd frame header"):
        get_method("zstd").new_decoder().decode_into(raw_block, [memoryview(bytearray(PAGE))])


def test_a_zstd_first_payload_cut_inside_its_frame_header_names_the_header() -> None:
    # The descriptor asks for an 8-byte content size after the window byte: 14 bytes.
    cut = zstandard.FRAME_HEADER + bytes([0xC0, 0x38]) + bytes(3)
    with pytest.raises(DecompressionError, match=r"ends inside its frame header \(9 of its 14"):
        get_method("zstd").new_decoder().decode_into(cut, [memoryview(bytearray(PAGE))])


def zstd_frame(window_log: int, content: bytes) -> bytes:
    """A hand-made frame start: the window's exponent, then one raw, not-last block."""
    descriptor = (window_log - 10) << 3
    block = (len(content) << 3).to_bytes(3, "little")
    return zstandard.FRAME_HEADER + bytes([0x00, descriptor]) + block + content


def test_zstd_window_is_capped_at_qemus_largest() -> None:
    content = random.Random(9).randbytes(PAGE)
    assert (
        zstandard.ZstdCompressionParameters.from_level(20).window_log
        == MAX_WINDOW_SIZE.bit_length() - 1
    )
    target = bytearray(PAGE)
    get_method("zstd").new_decoder().decode_into(zstd_frame(25, content), [memoryview(target)])
    assert target == content
    with pytest.raises(DecompressionError, match="corrupt zstd payload"):
        get_method("zstd").new_decoder().decode_into(
            zstd_frame(26, content), [memoryview(bytearray(PAGE))]
        )


def test_zstd_decoder_refuses_more_than_a_packet_and_stays_usable() -> None:
    decoder = get_method("zstd").new_decoder()
    with pytest.raises(ValueError, match="at most"):
        decoder.decode_into(b"", [memoryview(bytearray(PACKET_SIZE + PAGE))])
    content = random.Random(10).randbytes(PAGE)
    target = bytearray(PAGE)
    decoder.decode_into(zstd_frame(19, content), [memoryview(target)])
    assert target == content


def test_zstd_payload_that_ends_its_frame_is_rejected_not_misread() -> None:
    # QEMU never ends its frame: a last block is refused before decoding.
    content = random.Random(11).randbytes(PAGE)
    ended = zstandard.ZstdCompressor(level=1).compress(content)
    with pytest.raises(DecompressionError, match="ends the channel's zstd frame"):
        get_method("zstd").new_decoder().decode_into(ended, [memoryview(bytearray(PAGE))])


def test_zstd_decodes_pages_in_several_runs_through_its_scratch() -> None:
    encoder = get_method("zstd").new_encoder(1)
    decoder = get_method("zstd").new_decoder()
    source = bytearray(random.Random(13).randbytes(6 * PAGE))
    for _ in range(3):
        payload = bytes(encoder.encode([memoryview(source)]))
        target = bytearray(b"\xa5" * 9 * PAGE)
        view = memoryview(target)
        runs = [view[0 : 2 * PAGE], view[3 * PAGE : 4 * PAGE], view[6 * PAGE : 9 * PAGE]]
        decoder.decode_into(payload, runs)
        assert b"".join(runs) == source
        assert target[2 * PAGE : 3 * PAGE] == b"\xa5" * PAGE
        assert target[4 * PAGE : 6 * PAGE] == b"\xa5" * 2 * PAGE


# -- levels -------------------------------------------------------------------------------


def test_builtin_methods_describe_qemus() -> None:
    described = {
        name: (m.flag, m.levels, m.default_level, m.compresses, m.qemu_compatible)
        for name, m in methods().items()
    }
    assert described == {
        "none": (0x0, None, None, False, True),
        "zlib": (0x2, range(10), 1, True, True),
        "zstd": (0x4, range(21), 1, True, True),
    }


@pytest.mark.parametrize(
    ("name", "level", "expected"),
    [
        ("zlib", None, 1),
        ("zlib", 0, 0),
        ("zlib", 9, 9),
        ("zstd", None, 1),
        ("zstd", 0, 0),
        ("zstd", 20, 20),
        ("none", None, None),
    ],
)
def test_check_level_accepts_and_defaults(
    name: str, level: int | None, expected: int | None
) -> None:
    assert get_method(name).check_level(level) == expected


@pytest.mark.parametrize(
    ("name", "level", "message"),
    [
        ("zlib", 10, "from 0 to 9, got 10"),
        ("zlib", -1, "from 0 to 9"),
        ("zstd", 21, "from 0 to 20, got 21"),
        ("zstd", -5, "from 0 to 20"),
        ("none", 0, "takes no level"),
        ("none", 1, "takes no level"),
    ],
)
def test_check_level_rejects(name: str, level: int, message: str) -> None:
    method = get_method(name)
    with pytest.raises(ValueError, match=message):
        method.check_level(level)
    with pytest.raises(ValueError, match=message):
        method.new_encoder(level)


def test_check_level_rejects_non_integers() -> None:
    with pytest.raises(TypeError):
        get_method("zlib").check_level(True)
    with pytest.raises(TypeError):
        get_method("zstd").check_level(1.0)  # type: ignore[arg-type]


# -- registry -----------------------------------------------------------------------------


class _XorEncoder(Encoder):
    def encode(self, runs: Sequence[memoryview]) -> bytes:
        return bytes(b ^ 0x5A for run in runs for b in run)


class _XorDecoder(Decoder):
    def decode_into(
        self, payload: bytes | bytearray | memoryview, runs: Sequence[memoryview]
    ) -> None:
        data = bytes(b ^ 0x5A for b in payload)
        at = 0
        for run in runs:
            run[:] = data[at : at + len(run)]
            at += len(run)


class XorMethod(Method):
    name: ClassVar[str] = "xor-test"
    flag: ClassVar[int] = 0x6
    levels: ClassVar[range | None] = None
    default_level: ClassVar[int | None] = None
    compresses: ClassVar[bool] = True

    def payload_bound(self, page_bytes: int) -> int:
        return page_bytes

    def new_encoder(self, level: int | None = None) -> Encoder:
        self.check_level(level)
        return _XorEncoder()

    def new_decoder(self) -> Decoder:
        return _XorDecoder()


def variant(**attributes: object) -> Method:
    """An instance of a subclass of XorMethod with other class attributes."""
    return type("Variant", (XorMethod,), attributes)()  # type: ignore[no-any-return]


@pytest.fixture
def registered() -> Iterator[list[str]]:
    """Names to unregister after the test, whatever it registered."""
    names: list[str] = []
    yield names
    for name in names:
        unregister_method(name)


def test_lookups_by_name_and_flag() -> None:
    for name, flag in (("none", 0x0), ("zlib", 0x2), ("zstd", 0x4)):
        method = get_method(name)
        assert method.name == name
        assert method_for_flag(flag) is method
    assert list(methods()) == ["none", "zlib", "zstd"]


def test_a_method_name_that_is_no_str_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="a method name is a str, got int"):
        get_method(2)  # type: ignore[arg-type]


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown compression method 'lz4'.*none, zlib, zstd"):
        get_method("lz4")


@pytest.mark.parametrize(
    ("name", "shown"), [("qpl", "QPL"), ("UADK", "UADK"), ("qatzip", "QATZIP")]
)
def test_hardware_names_are_explained(name: str, shown: str) -> None:
    with pytest.raises(ValueError, match=f"hardware-accelerated {shown}, which trio_multifd"):
        get_method(name)


@pytest.mark.parametrize(("flag", "shown"), [(0x8, "QPL"), (0x10, "UADK"), (0x20, "QATZIP")])
def test_hardware_flags_are_unsupported_compression(flag: int, shown: str) -> None:
    with pytest.raises(UnsupportedCompressionError, match=shown) as caught:
        method_for_flag(flag)
    assert (caught.value.field, caught.value.value) == ("flags", flag)
    assert caught.value.limit == (0x0, 0x2, 0x4)


@pytest.mark.parametrize("flag", [0x6, 0xA, 0x3E])
def test_unregistered_flags_are_unsupported_compression(flag: int) -> None:
    with pytest.raises(UnsupportedCompressionError, match="names no known method") as caught:
        method_for_flag(flag)
    assert caught.value.field == "flags"


@pytest.mark.parametrize("flag", [0x1, 0x40, 0x3F, -2])
def test_flag_lookup_outside_the_field_is_misuse(flag: int) -> None:
    with pytest.raises(ValueError, match="compression field"):
        method_for_flag(flag)


def test_register_a_third_party_method(registered: list[str]) -> None:
    method = XorMethod()
    register_method(method)
    registered.append(method.name)
    assert get_method("xor-test") is method
    assert method_for_flag(0x6) is method
    assert methods()["xor-test"] is method
    source = bytearray(random.Random(7).randbytes(2 * PAGE))
    target = bytearray(2 * PAGE)
    payload = method.new_encoder(None).encode([memoryview(source)])
    method.new_decoder().decode_into(payload, page_views(target, [0, 1]))
    assert target == source
    unregister_method("xor-test")
    registered.clear()
    with pytest.raises(UnsupportedCompressionError):
        method_for_flag(0x6)
    with pytest.raises(ValueError, match="unknown"):
        get_method("xor-test")


def test_methods_is_a_read_only_snapshot(registered: list[str]) -> None:
    snapshot = methods()
    with pytest.raises(TypeError):
        snapshot["x"] = XorMethod()  # type: ignore[index]
    register_method(XorMethod())
    registered.append("xor-test")
    assert "xor-test" not in snapshot
    assert "xor-test" in methods()


def test_names_and_flags_must_not_clash(registered: list[str]) -> None:
    register_method(XorMethod())
    registered.append("xor-test")
    with pytest.raises(ValueError, match="named 'xor-test' is registered"):
        register_method(variant(flag=0xA))
    with pytest.raises(ValueError, match="0x6 is taken by 'xor-test'"):
        register_method(variant(name="other"))
    with pytest.raises(ValueError, match="0x2 is taken by 'zlib'"):
        register_method(variant(name="other", flag=0x2))
    with pytest.raises(ValueError, match="named 'zstd' is registered"):
        register_method(variant(name="zstd", flag=0xC))


@pytest.mark.parametrize("flag", [0x0, 0x1, 0x40, 0x3F, 0x100, -2])
def test_flags_outside_the_field_are_rejected(flag: int) -> None:
    with pytest.raises(ValueError, match="flag must be"):
        register_method(variant(flag=flag))


@pytest.mark.parametrize("flag", [0x8, 0x10, 0x20])
def test_hardware_flags_need_a_qemu_compatible_method(flag: int, registered: list[str]) -> None:
    with pytest.raises(ValueError, match="qemu_compatible"):
        register_method(variant(flag=flag))
    method = variant(name="qemu-compatible", flag=flag, qemu_compatible=True)
    register_method(method)
    registered.append("qemu-compatible")
    assert method_for_flag(flag) is method


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"name": ""}, "must not be empty"),
        ({"compresses": False}, "uncompressed"),
        ({"default_level": 1}, "default level without levels"),
        ({"levels": range(1, 4), "default_level": 0}, "not in range"),
        ({"levels": range(1, 4)}, "not in range"),
    ],
)
def test_inconsistent_methods_are_rejected(attributes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        register_method(variant(**attributes))
    assert "xor-test" not in methods()


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"name": b"xor"}, "name must be a str"),
        ({"flag": 2.0}, "flag must be an int"),
        ({"flag": True}, "flag must be an int, got bool"),
    ],
)
def test_a_method_whose_name_or_flag_has_the_wrong_type_is_a_type_error(
    attributes: dict[str, object], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        register_method(variant(**attributes))
    assert "xor-test" not in methods()


def test_register_takes_only_methods() -> None:
    with pytest.raises(TypeError, match="Method instance"):
        register_method(XorMethod)  # type: ignore[arg-type]


@pytest.mark.parametrize("attribute", ["name", "flag", "levels", "default_level", "compresses"])
def test_a_method_without_one_of_its_class_attributes_is_a_type_error(attribute: str) -> None:
    body = {key: value for key, value in vars(XorMethod).items() if key != attribute}
    partial = type("Partial", (Method,), body)()
    with pytest.raises(TypeError, match=f"Partial does not set .*{attribute}"):
        register_method(partial)
    assert "xor-test" not in methods()


@pytest.mark.parametrize("name", ["none", "zlib", "zstd"])
def test_builtins_cannot_be_unregistered(name: str) -> None:
    with pytest.raises(ValueError, match="built-in"):
        unregister_method(name)
    assert name in methods()


def test_unregister_unknown_name() -> None:
    with pytest.raises(ValueError, match="no compression method named 'nope'"):
        unregister_method("nope")


def test_levels_of_a_third_party_method_are_checked(registered: list[str]) -> None:
    method = variant(name="levelled", flag=0xE, levels=range(1, 4), default_level=2)
    register_method(method)
    registered.append("levelled")
    assert method.check_level(None) == 2
    with pytest.raises(ValueError, match="from 1 to 3, got 4"):
        method.check_level(4)
