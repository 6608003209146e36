"""The sender's packet batching (``_batching``), as plain state: no streams, no Trio."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import trio_multifd as m
from trio_multifd._batching import JobLine, PacketGatherer, SyncTokens, checked_offsets
from trio_multifd._pages import PageBatch

from .helpers import PAGE

A = m.RAMBlock("a", bytearray(16 * PAGE))
B = m.RAMBlock("b", bytearray(16 * PAGE))


def pages(*numbers: int) -> list[int]:
    return [n * PAGE for n in numbers]


def test_a_range_is_checked_by_its_ends_and_kept_as_it_is() -> None:
    offsets = range(15 * PAGE, -1, -3 * PAGE)
    assert checked_offsets(A, offsets) is offsets


def test_a_range_past_the_block_is_refused() -> None:
    with pytest.raises(ValueError, match=f"offset {16 * PAGE} is not a page-aligned"):
        checked_offsets(A, range(0, 17 * PAGE, PAGE))


def test_a_range_step_of_part_of_a_page_is_refused() -> None:
    with pytest.raises(ValueError, match=f"a range step of {PAGE // 2} is not a multiple"):
        checked_offsets(A, range(0, PAGE, PAGE // 2))


def test_other_offsets_become_a_list_of_ints() -> None:
    class Index:
        def __init__(self, value: int) -> None:
            self.value = value

        def __index__(self) -> int:
            return self.value

    checked = checked_offsets(A, (Index(PAGE), Index(0)))
    assert checked == [PAGE, 0]
    assert [type(o) for o in checked] == [int, int]


@pytest.mark.parametrize("bad", [-PAGE, 16 * PAGE, PAGE + 1])
def test_the_bad_offset_of_a_list_is_named(bad: int) -> None:
    with pytest.raises(ValueError, match=f"offset {bad} is not a page-aligned"):
        checked_offsets(A, [0, PAGE, bad, 2 * PAGE])


def test_an_offset_that_is_no_integer_is_refused() -> None:
    with pytest.raises(TypeError, match="an offset must be an integer, got float"):
        checked_offsets(A, [0, 1.0])  # type: ignore[list-item]


def test_pages_added_one_by_one_gather_until_they_fill_a_packet() -> None:
    gatherer = PacketGatherer(3)
    assert gatherer.add(A, pages(0)) == ()
    assert gatherer.add(A, pages(1)) is None
    assert gatherer.add(A, pages(2)) == (PageBatch(A, pages(0, 1, 2)),)


def test_pages_of_another_block_send_the_gathered_ones_first() -> None:
    gatherer = PacketGatherer(3)
    gatherer.add(A, pages(0, 1))
    assert gatherer.add(B, pages(5)) == (PageBatch(A, pages(0, 1)),)
    assert gatherer.end_round() == (PageBatch(B, pages(5)),)


def test_whole_packets_are_batched_at_once_and_the_rest_gathered() -> None:
    gatherer = PacketGatherer(3)
    # A range stays a range: a list of the same offsets would not compare equal.
    assert gatherer.add(A, range(0, 7 * PAGE, PAGE)) == (PageBatch(A, range(0, 6 * PAGE, PAGE)),)
    assert gatherer.end_round() == (PageBatch(A, pages(6)),)


def test_a_started_packet_is_topped_up_before_the_whole_packets() -> None:
    gatherer = PacketGatherer(3)
    gatherer.add(A, pages(0))
    assert gatherer.add(A, range(PAGE, 8 * PAGE, PAGE)) == (
        PageBatch(A, pages(0, 1, 2)),
        PageBatch(A, range(3 * PAGE, 6 * PAGE, PAGE)),
    )
    assert gatherer.end_round() == (PageBatch(A, pages(6, 7)),)


def test_a_batch_does_not_share_the_callers_list() -> None:
    offsets = pages(0, 1, 2, 3)
    batches = PacketGatherer(3).add(A, offsets)
    offsets[0] = 9 * PAGE
    assert batches == (PageBatch(A, pages(0, 1, 2)),)


def test_every_page_added_is_unsynced_until_the_round_ends() -> None:
    gatherer = PacketGatherer(3)
    gatherer.add(A, pages(0, 0))
    gatherer.add(A, range(0, 4 * PAGE, PAGE))
    assert gatherer.unsynced == 6
    gatherer.end_round()
    assert gatherer.unsynced == 0
    assert gatherer.end_round() == ()


def test_packets_are_carved_off_the_head_batch_in_order() -> None:
    line: JobLine[SyncTokens] = JobLine(3, limit=100)
    line.put(PageBatch(A, range(0, 7 * PAGE, PAGE)))
    carved = [line.take(1) for _ in range(4)]
    assert carved == [
        PageBatch(A, range(0, 3 * PAGE, PAGE)),
        PageBatch(A, range(3 * PAGE, 6 * PAGE, PAGE)),
        PageBatch(A, range(6 * PAGE, 7 * PAGE, PAGE)),
        None,
    ]
    assert not line.has_jobs


def test_the_line_has_room_once_at_most_limit_pages_are_not_taken() -> None:
    line: JobLine[SyncTokens] = JobLine(3, limit=4)
    line.put(PageBatch(A, pages(0, 1, 2, 3, 4)))
    assert (line.queued, line.has_room) == (5, False)
    line.take(1)
    assert (line.queued, line.has_room) == (2, True)


def test_a_round_leaves_once_every_channel_took_its_token() -> None:
    line: JobLine[SyncTokens] = JobLine(3, limit=100)
    tokens = SyncTokens(untaken=3, remaining=3)
    line.put(tokens)
    assert line.take(2) is tokens  # a taker serving two channels takes two tokens
    assert line.has_jobs
    assert line.take(1) is tokens
    assert not line.has_jobs


def test_a_round_comes_between_the_batches_queued_around_it() -> None:
    line: JobLine[SyncTokens] = JobLine(3, limit=100)
    tokens = SyncTokens(untaken=1, remaining=1)
    for job in (PageBatch(A, pages(0, 1, 2, 3)), tokens, PageBatch(B, pages(0))):
        line.put(job)
    assert [line.take(1) for _ in range(4)] == [
        PageBatch(A, pages(0, 1, 2)),
        PageBatch(A, pages(3)),
        tokens,
        PageBatch(B, pages(0)),
    ]
    assert line.queued == 0


def test_a_round_is_written_when_its_last_channel_writes() -> None:
    tokens = SyncTokens(untaken=3, remaining=3)
    assert not tokens.write(2)
    assert tokens.write(1)


def test_the_batching_core_and_what_it_imports_use_neither_trio_nor_threads() -> None:
    package = Path(m.__file__).parent
    todo, seen = ["_batching"], set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for node in ast.walk(ast.parse((package / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                todo.append(node.module or "__init__")
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names = (
                    [alias.name for alias in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                for name in names:
                    assert name.split(".")[0] not in {"trio", "threading"}, (module, name)
    assert seen >= {"_batching", "_block", "_pages", "_wire"}
