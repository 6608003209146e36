"""The benchmark's data: the kinds of page data it moves, generated the same way in
every process (and in QEMU's guest RAM), the receivers' pre-fill pattern, and the hash
both ends compare."""

from __future__ import annotations

import os
import random

__all__ = [
    "DATA_KINDS",
    "MIB",
    "PAGE",
    "PATTERN",
    "digest",
    "fill_data",
    "fill_pattern",
    "text_pool",
]

PAGE = 4096


MIB = 1024 * 1024


PATTERN = 0xA5


DATA_KINDS = ("random", "compressible", "zero", "zero-all", "mixed")
"""Data kinds: ``random`` fresh random bytes; ``compressible`` per 4 KiB page 1 KiB random
+ 3 KiB text; ``zero`` 15 pages in 16 all zero (the 16th random); ``zero-all`` every page
zero; ``mixed`` (the demo's) a quarter zero pages, a quarter random, half text."""


_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "this",
    "which",
    "or",
    "be",
    "are",
    "it",
    "an",
    "not",
    "have",
    "had",
    "were",
    "but",
    "all",
    "their",
    "been",
    "has",
    "one",
    "more",
    "when",
    "will",
    "would",
    "there",
    "can",
    "page",
    "memory",
    "block",
    "channel",
    "packet",
    "sync",
    "transfer",
    "receiver",
    "sender",
    "stream",
    "buffer",
    "kernel",
    "migration",
    "device",
    "virtual",
    "machine",
    "guest",
    "host",
    "network",
    "socket",
    "thread",
    "process",
    "table",
    "offset",
    "length",
    "header",
    "payload",
    "checksum",
    "compression",
    "level",
    "window",
    "dictionary",
    "entropy",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "10",
    "16",
    "32",
    "64",
    "128",
    "256",
    "512",
    "1024",
    "4096",
    "=",
    "(",
    ")",
    "{",
    "}",
    ";",
    ":",
    ",",
    ".",
    "->",
    "/",
]


def text_pool(size: int, seed: int = 0) -> bytes:
    """Text-like bytes (words, numbers, punctuation, line breaks): what logs, source code
    and heap strings look like to a compressor."""
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < size:
        line = " ".join(rng.choices(_WORDS, k=rng.randint(4, 14))) + "\n"
        parts.append(line)
        length += len(line)
    return "".join(parts).encode()[:size]


def fill_data(kind: str, view: memoryview, *, seed: int = 0) -> None:
    """Write ``kind`` data over all of ``view`` (a multiple of 4 KiB). Every page is
    written, zero pages included, so the data sits in real memory."""
    if kind not in DATA_KINDS:
        raise ValueError(f"unknown data kind {kind!r}")
    size = len(view)
    rng = random.Random(seed)
    pool = text_pool(MIB, seed) if kind in ("compressible", "mixed") else b""
    zeros = bytes(PAGE)
    chunk = 256 * PAGE
    for base in range(0, size, chunk):
        end = min(base + chunk, size)
        if kind == "random":
            view[base:end] = os.urandom(end - base)
            continue
        if kind == "zero-all":
            view[base:end] = bytes(end - base)
            continue
        noise = os.urandom(end - base)
        for page in range(base, end, PAGE):
            index = page // PAGE
            rel = page - base
            if kind == "compressible":
                view[page : page + 1024] = noise[rel : rel + 1024]
                at = rng.randrange(len(pool) - 3 * 1024)
                view[page + 1024 : page + PAGE] = pool[at : at + 3 * 1024]
            elif kind == "zero":
                view[page : page + PAGE] = noise[rel : rel + PAGE] if index % 16 == 0 else zeros
            else:  # mixed: a quarter zero, a quarter random, half text
                quarter = index % 4
                if quarter == 0:
                    view[page : page + PAGE] = zeros
                elif quarter == 1:
                    view[page : page + PAGE] = noise[rel : rel + PAGE]
                else:
                    at = rng.randrange(len(pool) - PAGE)
                    view[page : page + PAGE] = pool[at : at + PAGE]


def fill_pattern(view: memoryview) -> None:
    """Fill ``view`` with the non-zero pattern byte (pre-touching every page)."""
    block = bytes([PATTERN]) * MIB
    for base in range(0, len(view), MIB):
        end = min(base + MIB, len(view))
        view[base:end] = block[: end - base]


def digest(view: memoryview) -> str:
    """The hash both ends of a run compare (xxh3_128)."""
    import xxhash

    return xxhash.xxh3_128(view).hexdigest()
