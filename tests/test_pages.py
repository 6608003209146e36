"""Page runs and zero-page detection."""

from __future__ import annotations

import random

from hypothesis import given, strategies as st

from trio_multifd._pages import page_runs, run_offsets, split_zero_runs

PAGE = 4096


def test_sequential_offsets_form_one_run() -> None:
    assert page_runs(list(range(0, 10 * PAGE, PAGE)), PAGE) == [(0, 10 * PAGE)]
    assert page_runs(tuple(range(PAGE, 3 * PAGE, PAGE)), PAGE) == [(PAGE, 2 * PAGE)]


def test_runs_follow_the_given_order() -> None:
    offsets = [3 * PAGE, 4 * PAGE, 0, PAGE, 9 * PAGE, 9 * PAGE]
    assert page_runs(offsets, PAGE) == [
        (3 * PAGE, 2 * PAGE),
        (0, 2 * PAGE),
        (9 * PAGE, PAGE),
        (9 * PAGE, PAGE),
    ]


def test_a_range_of_pages_is_one_run_without_iterating_it() -> None:
    assert page_runs(range(PAGE, 2**40, PAGE), PAGE) == [(PAGE, 2**40 - PAGE)]


def test_a_range_with_a_larger_step_is_one_run_per_page() -> None:
    assert page_runs(range(0, 6 * PAGE, 2 * PAGE), PAGE) == [
        (0, PAGE),
        (2 * PAGE, PAGE),
        (4 * PAGE, PAGE),
    ]


def test_no_offsets_no_runs() -> None:
    assert page_runs([], PAGE) == []


@given(st.lists(st.integers(0, 63), max_size=128))
def test_runs_cover_exactly_the_pages_in_order(pages: list[int]) -> None:
    offsets = [p * PAGE for p in pages]
    assert list(run_offsets(page_runs(offsets, PAGE), PAGE)) == offsets


@given(
    kinds=st.lists(
        st.sampled_from(["zero", "random", "first-zero", "last-byte"]), min_size=1, max_size=64
    ),
    seed=st.integers(0, 2**32),
    in_order=st.booleans(),
)
def test_zero_pages_are_exactly_the_all_zero_pages(
    kinds: list[str], seed: int, in_order: bool
) -> None:
    rng = random.Random(seed)
    memory = bytearray()
    for kind in kinds:
        page = bytearray(PAGE)
        if kind == "random":
            page[:] = rng.randbytes(PAGE)
        elif kind == "first-zero":
            page[:] = rng.randbytes(PAGE)
            page[0] = 0
            page[rng.randrange(1, PAGE)] = 1
        elif kind == "last-byte":
            page[-1] = 1
        memory += page
    # In order, the pages form one run, whose stretches of kinds are found at once.
    offsets = list(range(0, len(memory), PAGE))
    if not in_order:
        rng.shuffle(offsets)
    normal_runs, zero_runs = split_zero_runs(memoryview(memory), page_runs(offsets, PAGE), PAGE)
    normal = list(run_offsets(normal_runs, PAGE))
    zero = list(run_offsets(zero_runs, PAGE))
    assert sorted(normal + zero) == sorted(offsets)
    for offset in offsets:
        assert (offset in zero) == (memory[offset : offset + PAGE] == bytes(PAGE))
    # Order within each kind follows the queued order.
    assert normal == [o for o in offsets if o in set(normal)]
    assert zero == [o for o in offsets if o in set(zero)]
