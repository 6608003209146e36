"""The receiver's SYNC barrier (``RoundBarrier``), as plain state: no streams, no Trio."""

from __future__ import annotations

import pytest

from trio_multifd import TransferIncompleteError
from trio_multifd._rounds import RoundBarrier


def test_a_round_completes_when_the_last_channel_reaches_its_sync() -> None:
    barrier = RoundBarrier(3)
    assert barrier.arrive(0, final_round=False) == (1, False)
    assert barrier.arrive(2, final_round=False) == (1, False)
    assert barrier.completed == 0
    assert barrier.arrive(1, final_round=False) == (1, True)
    assert barrier.completed == 1


def test_a_channel_ahead_by_rounds_completes_each_as_the_others_catch_up() -> None:
    barrier = RoundBarrier(2)
    assert [barrier.arrive(0, final_round=False) for _ in range(3)] == [
        (1, False),
        (2, False),
        (3, False),
    ]
    assert barrier.arrive(1, final_round=False) == (1, True)
    assert barrier.arrive(1, final_round=False) == (2, True)
    assert barrier.completed == 2


def test_a_round_is_final_only_when_every_channel_marked_it() -> None:
    barrier = RoundBarrier(2)
    barrier.arrive(0, final_round=True)
    barrier.arrive(1, final_round=False)
    barrier.arrive(0, final_round=True)
    barrier.arrive(1, final_round=True)
    assert barrier.final_rounds == {2}


def test_every_final_round_is_remembered() -> None:
    barrier = RoundBarrier(1)
    for final in (True, False, True):
        barrier.arrive(0, final_round=final)
    assert barrier.final_rounds == {1, 3}


def test_all_ended_once_every_channel_ended() -> None:
    barrier = RoundBarrier(2)
    barrier.arrive(0, final_round=False)
    barrier.arrive(1, final_round=False)
    assert barrier.end(0) == 1
    assert not barrier.all_ended
    assert barrier.end(1) == 1
    assert barrier.all_ended


def test_pages_after_the_last_sync_make_an_end_an_incomplete_transfer() -> None:
    barrier = RoundBarrier(1)
    barrier.arrive(0, final_round=False)
    barrier.count_pages(0, 5)
    with pytest.raises(TransferIncompleteError, match="5 pages after its last SYNC"):
        barrier.end(0)


def test_a_sync_clears_the_pages_before_it() -> None:
    barrier = RoundBarrier(1)
    barrier.count_pages(0, 5)
    barrier.arrive(0, final_round=False)
    assert barrier.end(0) == 1


def test_an_end_while_another_channel_waits_at_a_later_sync_is_incomplete() -> None:
    barrier = RoundBarrier(2)
    barrier.arrive(1, final_round=False)
    with pytest.raises(TransferIncompleteError, match="channel 1 waits at SYNC 1"):
        barrier.end(0)


def test_a_sync_past_another_channels_end_is_incomplete() -> None:
    barrier = RoundBarrier(2)
    barrier.end(0)
    with pytest.raises(TransferIncompleteError, match="channel 0 ended after round 0"):
        barrier.arrive(1, final_round=False)
    assert barrier.completed == 0


def test_a_rounds_pages_are_those_its_channels_brought_before_their_sync() -> None:
    # Channel 0 runs ahead into round 2 before channel 1 completes round 1: its pages of
    # round 2 are not round 1's.
    barrier = RoundBarrier(2)
    barrier.count_pages(0, 5)
    barrier.arrive(0, final_round=False)
    barrier.count_pages(0, 7)
    barrier.count_pages(1, 3)
    barrier.arrive(1, final_round=False)
    assert (barrier.completed, barrier.completed_pages) == (1, 8)
    barrier.arrive(0, final_round=False)
    barrier.arrive(1, final_round=False)
    assert (barrier.completed, barrier.completed_pages) == (2, 7)
